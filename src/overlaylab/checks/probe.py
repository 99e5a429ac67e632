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

Each listener reports its own bind: a port whose listener did not bind (BIND_WAIT) is not
probed, and said so with why, never counted as passed. The listeners are read only after
every sender finished, with a grace (GRACE) for each expected datagram to be written by
the process that socket activation starts for it: a late datagram is not a blocked path.

Three remote commands per host; every listener also ends by itself after LIFETIME s,
and each is in a process group of its own, removed whole, so none outlives the check.
"""

from __future__ import annotations

import secrets
import shlex
from collections import defaultdict
from dataclasses import dataclass, field

from overlaylab.checks import pathmtu
from overlaylab.cluster import Node, parallel
from overlaylab.facts import Socket
from overlaylab.inventory import Inventory
from overlaylab.ports import CONSUL, DOCKERD, KERNEL, Port, cluster_ports, on_host
from overlaylab.steps.network import DEFAULT_MTU, VXLAN_OVERHEAD
from overlaylab.topology import Topology

SEND_TIMEOUT = 2  # seconds a TCP connect may take before its path counts as blocked
DIR = f"/run/overlaylab-ports-{secrets.token_hex(3)}"


def file_of(port: Port) -> str:
    """Where a listener of ours writes what it received."""
    return f"{DIR}/{port.proto}-{port.number}"


def wanted(inv: Inventory, mode: str) -> list[Port]:
    """The ports Docker's documentation lists between overlay hosts, and the manager's own:
    those of the cluster's table (ports.py) that are tried between the hosts."""
    return [p for p in cluster_ports(inv, mode) if p.probed]


def served(topo: Topology, node: Node, ports: list[Port]) -> list[Port]:
    return on_host(ports, node.name == topo.manager)


def sockets(node: Node, port: Port) -> list[Socket]:
    return [s for s in node.facts.sockets if (s.proto, s.port) == (port.proto, port.number)]


def held(node: Node, port: Port) -> bool:
    """Something listens on the port on the host's cluster address, or on every address."""
    return any(s.on(node.facts.advertise_ips) for s in sockets(node, port))


def held_elsewhere(node: Node, port: Port) -> bool:
    """dockerd's port is held, on another address only: a dockerd whose cluster address moved (its
    gossip listens on the address it had; the plan restarts it, and it listens on the new
    one). A connection to the new address is refused there, which is no blocked path: the
    probe listens on the new address itself (a bind the kernel allows beside the other). Told
    by the socket's address against the host's, not by dockerd's word: a moved dockerd's
    `docker info` may stall (its store connections from the old address hang)."""
    return port.owner == DOCKERD and bool(sockets(node, port)) and not held(node, port)


def claimed(node: Node, port: Port) -> bool:
    """The port belongs to a daemon of the cluster's that runs, or is starting, here, whether
    or not it has bound it yet: a kv-mode dockerd (its --cluster-advertise) or a swarm node
    (its gossip, the kernel's VXLAN socket it makes, a manager's swarm port), our Consul
    container (restart policy always)."""
    f = node.facts
    if port.owner in (DOCKERD, KERNEL) and f.docker_active in ("active", "activating", "reloading"):
        swarm = (f.info.get("Swarm") or {}).get("LocalNodeState") == "active"
        return swarm or "--cluster-advertise" in (f.exec_start or "") or "cluster-advertise" in (f.daemon_json or {})
    return port.owner == CONSUL and f.consul is not None


BIND_WAIT = 5.0  # seconds the listeners may take to bind (~0.1 s on the lab; more on a loaded host)
GRACE = 3.0  # seconds after the last send for a datagram to be read and written by its listener
# seconds a listener lives at most: its bind, every host's sends (TCP connects of SEND_TIMEOUT,
# a host's ports at once) and the grace, with a margin for a loaded host and the SSH round trips
LIFETIME = round(BIND_WAIT + 4 * SEND_TIMEOUT + GRACE + 15)


def listen_command(node: Node, ports: list[Port]) -> str:
    """Starts a listener per free port; each reports its own bind. Prints `L proto port` for
    each one bound on the host's cluster address by our listener, and `N proto port why` for
    one that is not, once all are bound or BIND_WAIT has passed."""
    ip = node.advertise_ip
    lines = [f"mkdir -p {DIR}"]
    for p in ports:
        mode = "-d" if p.proto == "udp" else "-a"
        keep = shlex.quote(f"exec timeout --foreground {LIFETIME} cat >> {file_of(p)}")
        lines.append(
            f"setsid timeout {LIFETIME} systemd-socket-activate {mode} -l {ip}:{p.number} --inetd sh -c {keep} "
            f"</dev/null >/dev/null 2>{file_of(p)}.err & echo $! >> {DIR}/pids"
        )
    bound = {
        p: f'ss -Hlnp{p.proto[0]} "sport = :{p.number}" | grep -F "{ip}:{p.number}" | grep -q systemd-socket'
        for p in ports
    }  # ours, not a daemon's that bound it meanwhile
    lines.append(
        f"end=$(( $(date +%s%N) / 1000000 + {round(BIND_WAIT * 1000)} )); "
        f"until {{ {' && '.join(bound.values())}; }}; do "
        "[ $(( $(date +%s%N) / 1000000 )) -ge $end ] && break; sleep 0.05; done"
    )
    for p, test in bound.items():
        holder = f'ss -Hlnp{p.proto[0]} "sport = :{p.number}" | grep -o "users:.*" | head -1'
        why = (
            f'w=$(tail -c 300 {file_of(p)}.err | tr "\n" " "); h=$({holder}); '
            f'echo "N {p.proto} {p.number} our listener did not bind within {BIND_WAIT:.0f} s${{w:+: $w}}'
            '${h:+ (the port is held by $h)}"'
        )
        lines.append(f'if {test}; then echo "L {p.proto} {p.number}"; else {why}; fi')
    return "\n".join([*lines, "true"])


def send_command(source: Node, targets: list[tuple[str, str, Port]], ladder: str = "") -> str:
    """targets: (host, its cluster IP, port). UDP: three datagrams carrying the sender's name;
    TCP: a connect, judged here (`T host port ok|refused|fail`: refused is a reset, fail no
    answer within SEND_TIMEOUT or another error). ``ladder``: the path MTU's pings
    (pathmtu.script), sent in the same command once the sends are done."""
    parts = []
    for host, ip, p in targets:
        if p.proto == "udp":
            send = f"echo {source.name} > /dev/udp/{ip}/{p.number}"
            parts.append(f"( for i in 1 2 3; do {send}; sleep 0.1; done ) 2>/dev/null &")
        else:
            connect = shlex.quote(f"echo {source.name} > /dev/tcp/{ip}/{p.number}")
            parts.append(
                f"( if err=$(LC_ALL=C timeout {SEND_TIMEOUT} bash -c {connect} 2>&1); "  # C: bash's words, read below
                f"then echo 'T {host} {p.number} ok'; "
                f"elif [[ $err == *'Connection refused'* ]]; then echo 'T {host} {p.number} refused'; "
                f"else echo 'T {host} {p.number} fail'; fi ) &"
            )
    after = [ladder] if ladder else []  # after the sends: its pings add no load to their 2 s connects
    return "bash -c " + shlex.quote("\n".join([*parts, "wait", *after]))


def collect_command(expected: dict[Port, list[str]]) -> str:
    """After every sender finished: waits, up to GRACE seconds, until each UDP listener's
    file holds every sender's name (a datagram is read by a listener process that socket
    activation starts only when it arrives); then prints each file (`F proto-port`, then the
    names) and removes the listeners. A path judged blocked had the whole grace to arrive."""
    waits = " ".join(shlex.quote(f"{file_of(p)}:{name}") for p, names in expected.items() for name in names)
    return (
        f"end=$(( $(date +%s%N) / 1000000 + {round(GRACE * 1000)} )); "
        f'for w in {waits}; do until grep -qxF "${{w#*:}}" "${{w%%:*}}" 2>/dev/null; do '
        "[ $(( $(date +%s%N) / 1000000 )) -ge $end ] && break 2; sleep 0.05; done; done; "
        f'for p in $(cat {DIR}/pids 2>/dev/null); do kill -TERM -"$p" 2>/dev/null; done; '
        f"for f in {DIR}/*-*; do case $f in *.err) continue;; esac; "
        f'[ -e "$f" ] && {{ echo "F ${{f##*/}}"; cat "$f"; }}; done; rm -rf {DIR}; true'
    )


@dataclass
class Probed:
    """What the probe found: blocked paths by receiving host, and the ports it could not
    probe on a host, with why (never counted as passed: the preflight says them)."""

    blocked: dict[str, list[str]] = field(default_factory=dict)
    unprobed: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> target -> path MTU (0: no answer)
    narrow: dict[str, list[str]] = field(default_factory=dict)  # by source host: paths the overlay does not fit


@dataclass
class _Round:
    """One probe of the cluster's ports between its hosts: listen, send, collect, judge."""

    topo: Topology
    nodes: list[Node]
    ports: list[Port]
    found: Probed
    mtu: int  # the overlay's MTU, whose packets plus VXLAN's 50 each path must carry
    started: set[str] = field(default_factory=set)  # hosts where listeners were started: each is collected
    listening: dict[str, set[Port]] = field(default_factory=lambda: defaultdict(set))  # through our listener
    probed: dict[str, list[Port]] = field(default_factory=dict)  # every port tried on a host (ours, or TCP held)
    results: dict[tuple[str, str, int], str] = field(
        default_factory=dict
    )  # (source, target, tcp port) -> ok|refused|fail
    received: dict[tuple[str, str, int], set[str]] = field(default_factory=dict)  # (target, proto, port) -> senders
    sent: bool = False

    def listen(self, node: Node) -> None:
        served_here = served(self.topo, node, self.ports)
        free = [p for p in served_here if not held(node, p) and (held_elsewhere(node, p) or not claimed(node, p))]
        if free:
            self.started.add(node.name)
            out = node.sh(listen_command(node, free), check=False).splitlines()
            self.listening[node.name] = {p for p in free if f"L {p.proto} {p.number}" in out}
            for p in free:
                why = next((line.split(" ", 3)[3] for line in out if line.startswith(f"N {p.proto} {p.number} ")), "")
                if p not in self.listening[node.name]:
                    self.found.unprobed[node.name].append(f"{p.label} on {node.name} not probed: {why or 'no answer'}")
        self.probed[node.name] = [
            p for p in served_here if p in self.listening[node.name] or (p.proto == "tcp" and held(node, p))
        ]

    def send(self, node: Node) -> None:
        targets = [
            (other.name, other.advertise_ip, p)
            for other in self.nodes
            if other is not node
            for p in self.probed[other.name]
        ]
        peers = [(o.name, o.advertise_ip) for o in self.nodes if o is not node and o.advertise_ip]
        ladder = pathmtu.script(node.advertise_ip, peers, pathmtu.ladder(self.mtu + VXLAN_OVERHEAD))
        out = node.sh(send_command(node, targets, ladder if peers else ""), check=False)
        self.found.paths[node.name] = pathmtu.parse(out, [name for name, _ in peers])
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "T":
                self.results[(node.name, parts[1], int(parts[2]))] = parts[3]

    def collect(self, node: Node) -> None:
        senders = [n.name for n in self.nodes if n is not node]
        expected = {p: senders for p in self.listening[node.name] if p.proto == "udp"} if self.sent else {}
        out = node.sh(collect_command(expected), check=False)
        current = None
        for line in out.splitlines():
            if line.startswith("F "):
                proto, _, port = line[2:].partition("-")
                current = (node.name, proto, int(port))
                self.received[current] = set()
            elif current is not None and line.strip():
                self.received[current].add(line.strip())

    def judge(self) -> None:
        """Each path that did not carry its probe, by receiving host; each too narrow for the
        overlay's packets, by sending host."""
        for sender, paths in self.found.paths.items():
            for receiver, size in paths.items():
                why = pathmtu.too_narrow(sender, receiver, size, self.mtu)
                if why:
                    self.found.narrow[sender].append(why)
        for target in self.nodes:
            for p in self.probed.get(target.name, []):
                for source in (n for n in self.nodes if n is not target):
                    if p.proto == "tcp":
                        said = self.results.get((source.name, target.name, p.number), "fail")
                    else:
                        said = "ok" if source.name in self.received.get((target.name, p.proto, p.number), set()) else ""
                    if said == "refused":  # a listener is up on that address (ours, or its holder): a reject
                        self.found.blocked[target.name].append(
                            f"{source.name} -> {target.name}: {p.label} rejected (its connection refused at "
                            f"{target.advertise_ip}, where {self.listener(target, p)} listens): allow it in "
                            f"{target.name}'s firewall and any between"
                        )
                    elif said != "ok":
                        self.found.blocked[target.name].append(
                            f"{source.name} -> {target.name}: {p.label} blocked: allow it in {target.name}'s "
                            "firewall and any between"
                        )

    def listener(self, node: Node, port: Port) -> str:
        """Who listens on the port where the probe connected: ours, or the daemon holding it."""
        if port in self.listening.get(node.name, set()):
            return "the probe's listener"
        found = next((s for s in sockets(node, port) if s.on(node.facts.advertise_ips)), None)
        return found.holder() if found else "its holder"


def check(inv: Inventory, nodes: list[Node], mode: str) -> Probed:
    """Blocked paths by receiving host ("bm-docker-01 -> bm-docker-03: udp/4789 (VXLAN data)
    blocked"), and the ports that could not be probed, with why."""
    found = Probed(defaultdict(list), defaultdict(list), {}, defaultdict(list))
    probe = _Round(Topology.of(inv), nodes, wanted(inv, mode), found, inv.mtu or DEFAULT_MTU)
    try:
        for name, exc in parallel(nodes, probe.listen).items():
            probe.found.blocked[name].append(f"starting the port probes failed: {exc}")
        if not probe.found.blocked:
            probe.sent = True
            for name, exc in parallel(nodes, probe.send).items():
                probe.found.blocked[name].append(f"sending the port probes failed: {exc}")
    finally:
        parallel([n for n in nodes if n.name in probe.started], probe.collect)
    probe.judge()
    return Probed(
        {h: f for h, f in found.blocked.items() if f},
        {h: f for h, f in found.unprobed.items() if f},
        found.paths,
        {h: f for h, f in found.narrow.items() if f},
    )
