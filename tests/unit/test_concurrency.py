"""Unit (no hosts): the cap on hosts worked on at once (`--parallel`), as cluster.parallel
applies it, and a bad value refused with exit 2 before any connection."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from overlaylab import cluster, run
from overlaylab.errors import InputError
from overlaylab.inventory import Host, Inventory
from overlaylab.options import Options


@pytest.fixture(autouse=True)
def default_cap() -> object:
    yield
    cluster.set_parallel(cluster.MAX_PARALLEL)


def most_at_once(items: int) -> int:
    lock, now, most = threading.Lock(), [0], [0]

    def work(_: str) -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)
        with lock:
            now[0] -= 1

    assert cluster.parallel([f"h{i}" for i in range(items)], work, key=str) == {}
    return most[0]


def test_parallel_work_never_exceeds_the_cap() -> None:
    assert most_at_once(12) == cluster.MAX_PARALLEL
    cluster.set_parallel(3)
    assert most_at_once(12) == 3


def test_a_cap_under_1_is_refused_with_exit_2_before_any_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="--parallel: 0 must be at least 1"):
        cluster.set_parallel(0)
    monkeypatch.setattr(cluster, "connect_all", lambda *a, **k: pytest.fail("connected"))
    inv = Inventory(path=Path("inv.yaml"), cluster="lab", hosts=(Host("m", "m.example", "manager", "eth1"),))
    assert run.run_task("verify", inv, Options(parallel=0, json=True), lambda *a: 0) == 2
