"""Preflight's one active check: the cluster's ports between its hosts, probed before
anything changes, so that a blocked port is named at once instead of showing, after
every daemon restarted, as "100% packet loss" (a blocked VXLAN port is the most common
reason a new overlay does not ping).

Each host listens, for a few seconds, on the ports it will serve and that are free now
(systemd's `systemd-socket-activate`, on every systemd host: no package, no container),
each on the host's cluster address only; every other host sends to them over its own
cluster address (bash's /dev/udp and /dev/tcp); the listeners are read and removed. A
port the cluster already holds is its own use: TCP is then tried against its holder
(dockerd's gossip, our Consul), UDP is not probed (the kernel's VXLAN socket, dockerd's
gossip) and verify diagnoses it (udp/4789 when gossip works and pings do not).
A port a running daemon of the cluster's is about to take (dockerd just started, after a
reboot, and still restoring; our Consul container coming back by its restart policy) is
its own too, and is left alone: a listener of ours there would take that port from it
(seen: dockerd's gossip bound udp/7946 between the facts and the probe, and our datagrams
went to it), or, bound first, make its bind fail.

Three remote commands per host; every listener also ends by itself after LIFETIME s,
and each is in a process group of its own, removed whole, so none outlives the check.
"""

from __future__ import annotations

import secrets
import shlex
from collections import defaultdict
from dataclasses import dataclass

from overlaylab.cluster import Node, parallel
from overlaylab.facts import CONSUL_GOSSIP
from overlaylab.inventory import Inventory
from overlaylab.mode import Mode

LIFETIME = 10  # seconds a listener lives at most
SEND_TIMEOUT = 2  # seconds a TCP connect may take before its path counts as blocked
DIR = f"/run/overlaylab-ports-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Port:
    proto: str  # tcp | udp
    number: int
    what: str
    manager_only: bool = False

    @property
    def label(self) -> str:
        return f"{self.proto}/{self.number} ({self.what})"

    @property
    def file(self) -> str:
        return f"{DIR}/{self.proto}-{self.number}"


def wanted(inv: Inventory, mode: str) -> list[Port]:
    """The ports Docker's documentation lists between overlay hosts, and the manager's own."""
    ports = [Port("udp", 4789, "VXLAN data"), Port("tcp", 7946, "gossip"), Port("udp", 7946, "gossip")]
    if mode == Mode.SWARM:
        return [*ports, Port("tcp", 2377, "swarm control", manager_only=True)]
    if inv.ha:  # every host's agent: its HTTP port for its dockerd, and Consul's own gossip between all
        return [*ports, Port("tcp", inv.consul_port, "Consul"), Port("tcp", CONSUL_GOSSIP, "Consul gossip"),
                Port("udp", CONSUL_GOSSIP, "Consul gossip")]  # fmt: skip
    return [*ports, Port("tcp", inv.consul_port, "Consul", manager_only=True)]


def served(node: Node, ports: list[Port]) -> list[Port]:
    return [p for p in ports if node.host.is_manager or not p.manager_only]


def held(node: Node, port: Port) -> bool:
    return any((s.proto, s.port) == (port.proto, port.number) for s in node.facts.sockets)


DOCKERD_PORTS = {("udp", 4789), ("tcp", 7946), ("udp", 7946)}


def claimed(inv: Inventory, node: Node, port: Port) -> bool:
    """The port belongs to a daemon of the cluster's that runs, or is starting, here, whether
    or not it has bound it yet: a kv-mode dockerd (its --cluster-advertise), a swarm node,
    our Consul container (restart policy always)."""
    f = node.facts
    if (port.proto, port.number) in DOCKERD_PORTS and f.docker_active in ("active", "activating", "reloading"):
        swarm = (f.info.get("Swarm") or {}).get("LocalNodeState") == "active"
        return swarm or "--cluster-advertise" in (f.exec_start or "") or "cluster-advertise" in (f.daemon_json or {})
    consul = {("tcp", inv.consul_port), ("tcp", CONSUL_GOSSIP), ("udp", CONSUL_GOSSIP)}
    return (port.proto, port.number) in consul and f.consul is not None


def listen_command(node: Node, ports: list[Port]) -> str:
    """Starts a listener per free port and prints `L proto port` for each one bound."""
    ip = node.advertise_ip
    lines = [f"mkdir -p {DIR}"]
    for p in ports:
        mode = "-d" if p.proto == "udp" else "-a"
        keep = shlex.quote(f"exec timeout --foreground {LIFETIME} cat >> {p.file}")
        lines.append(
            f"setsid timeout {LIFETIME} systemd-socket-activate {mode} -l {ip}:{p.number} --inetd sh -c {keep} "
            f"</dev/null >/dev/null 2>&1 & echo $! >> {DIR}/pids"
        )
    checks = " ".join(f"{p.proto}:{p.number}" for p in ports)
    lines.append(
        f"for i in 1 2 3 4 5 6 7 8 9 10; do n=0; for pp in {checks}; do "
        'ss -Hln$(echo ${pp%:*} | cut -c1) "sport = :${pp#*:}" | grep -q . && n=$((n+1)); done; '
        f"[ $n -ge {len(ports)} ] && break; sleep 0.1; done"
    )
    lines += [
        f'ss -Hlnp{p.proto[0]} "sport = :{p.number}" | grep "{ip}:{p.number}" | grep -q systemd-socket '
        f'&& echo "L {p.proto} {p.number}"'  # ours, not a daemon's that bound it meanwhile
        for p in ports
    ]
    return "\n".join([*lines, "true"])


def send_command(source: Node, targets: list[tuple[str, str, Port]]) -> str:
    """targets: (host, its cluster IP, port). UDP: three datagrams carrying the sender's name;
    TCP: a connect, judged here (`T host port ok|fail`)."""
    parts = []
    for host, ip, p in targets:
        if p.proto == "udp":
            send = f"echo {source.name} > /dev/udp/{ip}/{p.number}"
            parts.append(f"( for i in 1 2 3; do {send}; sleep 0.1; done ) 2>/dev/null &")
        else:
            connect = shlex.quote(f"echo {source.name} > /dev/tcp/{ip}/{p.number}")
            parts.append(
                f"( if timeout {SEND_TIMEOUT} bash -c {connect} 2>/dev/null; then echo 'T {host} {p.number} ok'; "
                f"else echo 'T {host} {p.number} fail'; fi ) &"
            )
    return "bash -c " + shlex.quote("\n".join([*parts, "wait"]))


def collect_command() -> str:
    """Prints each listener's file (`F proto-port` then the senders' names), then removes them all."""
    return (
        f'for p in $(cat {DIR}/pids 2>/dev/null); do kill -TERM -"$p" 2>/dev/null; done; '
        f'for f in {DIR}/*-*; do [ -e "$f" ] && {{ echo "F ${{f##*/}}"; cat "$f"; }}; done; rm -rf {DIR}; true'
    )


def check(inv: Inventory, nodes: list[Node], mode: str) -> dict[str, list[str]]:
    """Blocked paths by receiving host: "bm-docker-01 -> bm-docker-03: udp/4789 (VXLAN data) blocked"."""
    ports = wanted(inv, mode)
    listening: dict[str, set[Port]] = defaultdict(set)  # host -> ports probed through our listener
    probed: dict[str, list[Port]] = {}  # host -> every port tried on it (our listener, or TCP held by the cluster)
    problems: dict[str, list[str]] = defaultdict(list)

    def listen(node: Node) -> None:
        free = [p for p in served(node, ports) if not held(node, p) and not claimed(inv, node, p)]
        if free:
            out = node.sh(listen_command(node, free), check=False)
            listening[node.name] = {p for p in free if f"L {p.proto} {p.number}" in out.splitlines()}
        probed[node.name] = [
            p for p in served(node, ports) if p in listening[node.name] or (p.proto == "tcp" and held(node, p))
        ]

    results: dict[tuple[str, str, int], bool] = {}  # (source, target, tcp port) -> connected
    received: dict[tuple[str, str, int], set[str]] = {}  # (target, proto, port) -> senders heard

    def send(node: Node) -> None:
        targets = [
            (other.name, other.advertise_ip, p) for other in nodes if other is not node for p in probed[other.name]
        ]
        out = node.sh(send_command(node, targets), check=False) if targets else ""
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "T":
                results[(node.name, parts[1], int(parts[2]))] = parts[3] == "ok"

    def collect(node: Node) -> None:
        out = node.sh(collect_command(), check=False)
        current = None
        for line in out.splitlines():
            if line.startswith("F "):
                proto, _, port = line[2:].partition("-")
                current = (node.name, proto, int(port))
                received[current] = set()
            elif current is not None and line.strip():
                received[current].add(line.strip())

    try:
        for name, exc in parallel(nodes, listen).items():
            problems[name].append(f"starting the port probes failed: {exc}")
        if not problems:
            for name, exc in parallel(nodes, send).items():
                problems[name].append(f"sending the port probes failed: {exc}")
    finally:
        parallel([n for n in nodes if listening[n.name]], collect)
    for target in nodes:
        for p in probed.get(target.name, []):
            for source in nodes:
                if source is target:
                    continue
                if p.proto == "tcp":
                    ok = results.get((source.name, target.name, p.number), False)
                else:
                    ok = source.name in received.get((target.name, p.proto, p.number), set())
                if not ok:
                    problems[target.name].append(
                        f"{source.name} -> {target.name}: {p.label} blocked: allow it in {target.name}'s firewall "
                        "and any between"
                    )
    return {name: found for name, found in problems.items() if found}
