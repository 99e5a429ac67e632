"""Unit (no lab): lab up and down hold one lock across processes (lab/engine.py), so that
two test workers never both start the private dockerd nor one stop it under the other.
The lock is a real flock on a file in a temporary directory, held by a second process;
up and down themselves are called, and stopped at their first line (the root check)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from overlaylab.lab import engine, lifecycle
from overlaylab.lab import preflight as lab_preflight

HOLDER = """
import fcntl, sys
with open(sys.argv[1], "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()  # until the test lets go
"""


class Entered(Exception):
    """up or down got past the lock: their first line ran."""


@pytest.mark.parametrize("change", [lifecycle.up, lifecycle.down], ids=["up", "down"])
def test_a_lab_change_waits_while_another_process_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[str], object]
) -> None:
    monkeypatch.setattr(engine, "PRIVATE_RUN", tmp_path)
    monkeypatch.setattr(engine, "LOCK", tmp_path / "labs.lock")
    entered = threading.Event()

    def first_line() -> None:
        entered.set()
        raise Entered

    monkeypatch.setattr(lab_preflight, "require_root", first_line)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "labs.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        raised: list[BaseException] = []

        def call() -> None:
            try:
                change("e2elock")
            except Entered as exc:
                raised.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        assert not entered.wait(1.0), f"lab {change.__name__} ran while another process held the lock"
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
        assert entered.wait(10), f"lab {change.__name__} did not run once the lock was free"
        worker.join(10)
        assert raised and not worker.is_alive()
    finally:
        holder.kill()
        holder.wait()
