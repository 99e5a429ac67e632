"""Unit (no lab): lab up and down hold one lock across processes (lab/engine.py), so
that two test workers never both start the private dockerd nor one stop it under the
other. The lock is a real flock on a file in a temporary directory."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from overlaylab.lab import engine, lifecycle


def test_a_lab_change_waits_for_the_lock_another_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "PRIVATE_RUN", tmp_path)
    monkeypatch.setattr(engine, "LOCK", tmp_path / "labs.lock")
    done: list[str] = []
    change = engine.exclusive(lambda name: done.append(name))
    with open(tmp_path / "labs.lock", "a") as other:  # another process's hold: its own open file
        fcntl.flock(other, fcntl.LOCK_EX)
        worker = threading.Thread(target=change, args=("e2eha",))
        worker.start()
        worker.join(0.5)
        assert done == [], "the change ran while another held the lock"
    worker.join(10)
    assert done == ["e2eha"]


def test_lab_up_and_down_are_the_locked_ones() -> None:
    assert lifecycle.up.__wrapped__ and lifecycle.down.__wrapped__  # type: ignore[attr-defined]
