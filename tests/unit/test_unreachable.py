"""Unit tests (loopback only, no lab): status and verify carry on past a host that does not
answer, while every other task stops; a bad host key stops every task."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from overlaylab import cluster
from overlaylab.errors import InputError
from overlaylab.inventory import Host, Inventory


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_host_that_does_not_answer_is_left_out_only_when_the_task_carries_on(tmp_path: Path) -> None:
    host = Host("gone", "127.0.0.1", "manager", "eth1", port=closed_port())
    inv = Inventory(path=Path("inv.yaml"), cluster="t", hosts=(host,), known_hosts=tmp_path / "known_hosts")
    nodes, gone = cluster.connect_reachable(inv, [host], False, None, tolerate=True)
    assert nodes == [] and list(gone) == ["gone"] and "SSH failed" in gone["gone"]
    with pytest.raises(InputError, match=r"gone \(127\.0\.0\.1\): SSH failed"):
        cluster.connect_all(inv, [host])
