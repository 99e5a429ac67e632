"""Unit, real processes on loopback (no lab): the preflight's port probe's own commands
(checks/probe.py) run by bash on this machine, with systemd's socket activation as the
listener, as on a host. Each listener reports its bind; one that cannot bind is said
not probed, with why; a datagram that arrives after the senders finished is still
counted (the grace), and one never sent is not."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

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


def test_a_refused_connect_is_told_from_one_that_connects() -> None:
    """send_command(): a connect to a port where nothing listens on loopback is `refused` (a
    reset), not `fail` (no answer: a dropped path); one to a listener is `ok`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as up:
        up.bind(("127.0.0.1", 0))
        up.listen()
        listening = table.Port("tcp", up.getsockname()[1], "t", table.DOCKERD, "t")
        closed = table.Port("tcp", free_port(socket.SOCK_STREAM), "t", table.DOCKERD, "t")
        sent = bash(
            ports.send_command(
                cast(Node, Local("sender")), [("up", "127.0.0.1", listening), ("closed", "127.0.0.1", closed)]
            )
        )
    assert sorted(sent.splitlines()) == sorted([f"T up {listening.number} ok", f"T closed {closed.number} refused"]), (
        sent
    )


def test_a_dockerd_port_held_on_another_address_is_probed_by_a_listener_on_the_new_one(probe_dir: Path) -> None:
    """A dockerd whose cluster address moved still listens on the old one: the probe's own
    listener binds the new address beside it (the kernel allows it), so the path to the new
    address is probed, not refused by nobody (issue 31: "tcp/7946 blocked" where none was)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as old:
        old.bind(("127.0.0.2", 0))
        old.listen()
        port = table.Port("tcp", old.getsockname()[1], "gossip", table.DOCKERD, "t")
        try:
            out = bash(ports.listen_command(cast(Node, Local("receiver")), [port]))
            sent = bash(ports.send_command(cast(Node, Local("sender")), [("receiver", "127.0.0.1", port)]))
        finally:
            bash(ports.collect_command({}))
    assert f"L tcp {port.number}" in out.splitlines(), out
    assert sent.split() == ["T", "receiver", str(port.number), "ok"]


class Moved(Node):
    """A fake kv host at 10.0.0.2 whose dockerd (active, --cluster-advertise) holds tcp/7946 on
    ``held_at``; the commands it is sent are kept, and its listeners bind."""

    def __init__(self, held_at: str, info: bool = True) -> None:
        from overlaylab.facts import HostFacts, Socket
        from overlaylab.inventory import Host

        sockets = [Socket("tcp", held_at, 7946, "dockerd", 42)]
        facts = HostFacts(
            docker_active="active",
            exec_start="dockerd --cluster-advertise=eth1:2376",
            info={"ClusterAdvertise": f"{held_at}:2376"} if info else {},  # {}: its `docker info` stalled
            advertise_ips=["10.0.0.2"],
            sockets=sockets,
        )
        super().__init__(Host("w", "10.0.0.2", "worker", "eth1"), conn=cast(Any, None), facts=facts)
        self.ran: list[str] = []

    def sh(self, command: str, check: bool = True) -> str:
        self.ran.append(command)
        return "L tcp 7946\n" if "systemd-socket-activate" in command else ""


@pytest.mark.parametrize(
    ("held_at", "info", "ours"),
    [("10.0.0.9", True, True), ("10.0.0.9", False, True), ("10.0.0.2", True, False), ("0.0.0.0", True, False)],
)
def test_only_a_dockerd_port_held_on_another_address_gets_the_probes_listener(
    held_at: str, info: bool, ours: bool
) -> None:
    """_Round.listen(): held on the host's cluster address or on every address, the port is
    its holder's, probed against it; held on another address only, the probe listens there."""
    from collections import defaultdict

    from overlaylab.topology import Topology

    gossip = table.Port("tcp", 7946, "gossip", table.DOCKERD, "dockerd's gossip")
    node = Moved(held_at, info)
    topo = cast(Topology, type("T", (), {"manager": "m"})())
    found = ports.Probed(defaultdict(list), defaultdict(list), {}, defaultdict(list))
    rnd = ports._Round(topo, [node], [gossip], found, 1450)
    rnd.listen(node)
    assert any("systemd-socket-activate" in c and "10.0.0.2:7946" in c for c in node.ran) is ours, node.ran
    assert rnd.probed["w"] == [gossip]  # probed either way: through ours, or against its holder


def test_a_refused_probe_is_said_rejected_and_a_silent_one_blocked() -> None:
    """judge(): a reset where a listener is up is a firewall's reject; no answer is a drop."""
    from collections import defaultdict

    from overlaylab.topology import Topology

    gossip = table.Port("tcp", 7946, "gossip", table.DOCKERD, "dockerd's gossip")
    a, b, c = Moved("10.0.0.2"), Moved("10.0.0.2"), Moved("10.0.0.2")
    a.host, b.host, c.host = (replace(a.host, name=n) for n in ("a", "b", "c"))
    topo = cast(Topology, type("T", (), {"manager": "m"})())
    found = ports.Probed(defaultdict(list), defaultdict(list), {}, defaultdict(list))
    rnd = ports._Round(topo, [a, b, c], [gossip], found, 1450)
    rnd.probed = {"a": [gossip], "b": [], "c": []}
    rnd.results = {("b", "a", 7946): "refused", ("c", "a", 7946): "fail"}
    rnd.judge()
    said = found.blocked["a"]
    assert len(said) == 2, said
    assert said[0].startswith("b -> a: tcp/7946") and "rejected" in said[0] and "dockerd (PID 42) listens" in said[0]
    assert said[1].startswith("c -> a: tcp/7946") and " blocked: " in said[1]
