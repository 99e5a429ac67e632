"""Unit, real processes on loopback (no lab): the preflight's port probe's own commands
(checks/probe.py) run by bash on this machine, with systemd's socket activation as the
listener, as on a host. Each listener reports its bind; one that cannot bind is said
not probed, with why; a datagram that arrives after the senders finished is still
counted (the grace), and one never sent is not."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import cast

import pytest

from overlaylab import ports as table
from overlaylab.checks import probe as ports
from overlaylab.cluster import Node

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate (package systemd) is missing"
)


class Local:
    """What the commands read of a node: its name and cluster address."""

    def __init__(self, name: str) -> None:
        self.name, self.advertise_ip = name, "127.0.0.1"


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bash(command: str) -> str:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def probe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "probe"
    monkeypatch.setattr(ports, "DIR", str(directory))
    monkeypatch.setattr(ports, "BIND_WAIT", 1.0)
    monkeypatch.setattr(ports, "GRACE", 2.0)
    return directory


def test_a_listener_reports_its_bind_and_a_late_datagram_is_still_heard(probe_dir: Path) -> None:
    udp, tcp = (
        table.Port("udp", free_port(socket.SOCK_DGRAM), "t", table.KERNEL, "t"),
        table.Port("tcp", free_port(socket.SOCK_STREAM), "t", table.DOCKERD, "t"),
    )
    out = bash(ports.listen_command(cast(Node, Local("receiver")), [udp, tcp])).splitlines()
    try:
        assert f"L udp {udp.number}" in out and f"L tcp {tcp.number}" in out, out
        sent = bash(ports.send_command(cast(Node, Local("sender")), [("receiver", "127.0.0.1", tcp)]))
        assert sent.split() == ["T", "receiver", str(tcp.number), "ok"]
        # the datagram leaves a second after the collect starts: within the grace (2 s here)
        late = f"sleep 1; echo late-sender > /dev/udp/127.0.0.1/{udp.number}"
        subprocess.Popen(["bash", "-c", late])
        heard = bash(ports.collect_command({udp: ["late-sender"]}))
    finally:
        bash(ports.collect_command({}))  # the listeners go in any case
    lines = heard.splitlines()
    at = lines.index(f"F udp-{udp.number}")
    assert "late-sender" in lines[at + 1 :], heard
    assert not probe_dir.exists()  # the collect removes the listeners' directory


def test_a_listener_that_cannot_bind_is_not_probed_and_says_why(probe_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = table.Port("tcp", taken.getsockname()[1], "t", table.DOCKERD, "t")
        try:
            out = bash(ports.listen_command(cast(Node, Local("receiver")), [port]))
        finally:
            bash(ports.collect_command({}))
    line = next(line for line in out.splitlines() if line.startswith(f"N tcp {port.number} "))
    assert "did not bind" in line and "Address already in use" in line and "held by" in line, out
    assert f"L tcp {port.number}" not in out
