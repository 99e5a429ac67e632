"""Step 8: prove the overlay. One busybox per host; every ordered pair pings by IP
and by container name; the matrix is printed; the probes are removed, also on failure.

Only a ping proves the overlay (name lookup can succeed while traffic fails). Probes
get a window to converge (the overlay's gossip is eventually consistent), then they are
judged.
"""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass, field

from overlaylab import peers
from overlaylab.cluster import Node, journal, parallel
from overlaylab.facts import PROBE_PREFIX, ROLE_LABEL
from overlaylab.report import columns

CONVERGE_SECONDS = 20
# A swarm-scope network's endpoints reach the other hosts by NetworkDB's UDP gossip. A lost
# message (or a host that joined the network as the entry was sent) is repaired only by its
# anti-entropy, a push-pull every 30 s (libnetwork networkdb: PushPullInterval), which may
# first have to bring back the host's network membership: up to two rounds. Measured on the
# lab (3 legacy hosts, gossip into one worker dropped for 3 s as the other's container
# started): repaired after 21, 21, 23 and 52 s. CI: two of five workers whose probes started
# at once missed each other's entries through a 20 s window. In kv mode the endpoints
# come from the store's watch, and 20 s holds.
SWARM_CONVERGE_SECONDS = 60


RUN_ID = secrets.token_hex(3)
PREFIX = PROBE_PREFIX


def probe_name(node: Node) -> str:
    """Unique per run: a name removed and re-created seconds later can leave the legacy
    overlay's name records of other hosts stale."""
    return f"{PREFIX}{node.name}-{RUN_ID}"


@dataclass
class Matrix:
    hosts: list[str]
    expected: set[tuple[str, str, str]]  # (src, dst, by) pairs this run must prove
    results: dict[tuple[str, str, str], tuple[bool, str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    journals: dict[str, str] = field(default_factory=dict)  # dockerd's last lines, for failed hosts
    addresses: dict[str, str] = field(default_factory=dict)  # host -> its probe's (or anchor's) address

    @property
    def ok(self) -> bool:
        return not self.errors and all(self.results.get(key, (False, ""))[0] for key in self.expected)

    def failures(self) -> list[str]:
        out = [f"{host}: {err}" for host, err in self.errors.items()]
        for key in sorted(self.expected):
            ok, detail = self.results.get(key, (False, "not tested"))
            if not ok:
                out.append(f"{key[0]} -> {key[1]} by {key[2]}: {detail or 'failed'}")
        return out

    def render(self) -> str:
        rows = [["", *self.hosts]]
        for src in self.hosts:
            cells = [src]
            for dst in self.hosts:
                if src == dst:
                    cells.append("-")
                    continue
                marks = []
                for by in ("ip", "name"):
                    res = self.results.get((src, dst, by))
                    marks.append("?" if res is None else ("✓" if res[0] else "✗"))
                cells.append("/".join(marks))
            rows.append(cells)
        return "\n".join(["ping matrix (row pings column; ip/name):", *columns(rows)])

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "pairs": [
                {"from": s, "to": d, "by": b, "ok": ok, "detail": detail}
                for (s, d, b), (ok, detail) in sorted(self.results.items())
            ],
            "errors": self.errors,
            "journals": self.journals,
            "addresses": self.addresses,
        }


def ping_script(probe: str, targets: list[tuple[str, str, str]], window: int = CONVERGE_SECONDS) -> str:
    """targets: (host, by, address). Prints `R host by ok|fail detail` per target.

    One `docker exec` runs every target at once inside the probe, each in its own retry
    loop until the shared window ends: one host's pings take the time of its slowest
    target, not the sum (at 12 hosts, 22 targets each), and start one process in the
    container, not one per try (a docker exec costs ~0.3 s of CPU on a small host)."""
    lines = [f"end=$(( $(date +%s) + {window} ))"]
    for host, by, addr in targets:
        q = shlex.quote(addr)
        lines.append(
            f"( while :; do out=$(ping -c 1 -W 1 {q} 2>&1) && {{ echo 'R {host} {by} ok'; break; }}; "
            f'if [ $(date +%s) -ge $end ]; then echo "R {host} {by} fail $(echo "$out" | tail -n 1)"; break; fi; '
            "sleep 0.5; done ) &"
        )
    lines.append("wait")
    return f"docker exec {shlex.quote(probe)} sh -c {shlex.quote(chr(10).join(lines))}"


@dataclass
class _Round:
    """One round of verify's pings: the probes (or the standing anchors) and what they say."""

    network: str
    nodes: list[Node]
    involved: set[str]  # the hosts whose pairs are proved
    matrix: Matrix
    probes: dict[str, tuple[str, str]]  # host -> (container, its address)
    scopes: set[str] = field(default_factory=set)  # the network's scope, as each probe's host says it

    def start(self, node: Node) -> None:
        probe = probe_name(node)
        net = shlex.quote(self.network)
        fmt = "'{{(index .NetworkSettings.Networks " + f'"{self.network}"' + ").IPAddress}}'"
        out = node.sh(
            f"docker run -d --name {probe} --label {ROLE_LABEL}=probe "
            f"--network {net} busybox sleep 600 >/dev/null && docker inspect -f {fmt} {probe} "
            f"&& docker network inspect -f '{{{{.Scope}}}}' {net}"
        )
        ip, _, scope = out.strip().partition("\n")
        self.probes[node.name] = (probe, ip.strip())
        self.scopes.add(scope.strip())

    def ping(self, node: Node) -> None:
        """Every target of this host at once, in one command; each judged after the window."""
        targets = [
            (other.name, by, self.probes[other.name][1] if by == "ip" else self.probes[other.name][0])
            for other in self.nodes
            if other is not node
            and other.name in self.probes
            and (node.name in self.involved or other.name in self.involved)
            for by in ("ip", "name")
        ]
        if not targets:
            return
        window = SWARM_CONVERGE_SECONDS if "swarm" in self.scopes else CONVERGE_SECONDS
        out = node.sh(ping_script(self.probes[node.name][0], targets, window), check=False)
        for line in out.splitlines():
            parts = line.split(" ", 4)
            if len(parts) >= 4 and parts[0] == "R":
                detail = parts[4] if len(parts) > 4 else ""
                self.matrix.results[(node.name, parts[1], parts[2])] = (parts[3] == "ok", detail)

    def read_journals(self) -> None:
        """dockerd's last lines on every host in a failed pair, read before anything is cleaned up."""
        failing = {f.split(" ", 1)[0].rstrip(":") for f in self.matrix.failures()}
        failing |= {d for (_, d, _), (ok, _) in self.matrix.results.items() if not ok}

        def read(node: Node) -> None:
            self.matrix.journals[node.name] = journal(node, 15)

        parallel([n for n in self.nodes if n.name in failing], read)


def run(
    network: str,
    nodes: list[Node],
    sources: list[Node] | None = None,
    standing: dict[str, tuple[str, str]] | None = None,
) -> Matrix:
    """Ping matrix over ``nodes``; with ``sources``, only pairs that involve one of them.

    With ``standing`` (host -> a running container on the network and its IP: the anchors),
    those ping each other and nothing is started or removed: one command per host."""
    involved = {n.name for n in (sources or nodes)}
    names = [n.name for n in nodes]
    expected = {
        (s, d, by) for s in names for d in names if s != d and (s in involved or d in involved) for by in ("ip", "name")
    }
    matrix = Matrix(names, expected)
    pings = _Round(network, nodes, involved, matrix, dict(standing or {}))
    try:
        if standing is None:
            for name, exc in parallel(nodes, pings.start).items():
                matrix.errors[name] = f"probe did not start: {exc}"
        ready = [n for n in nodes if n.name in pings.probes]
        for name, exc in parallel(ready, pings.ping).items():
            matrix.errors[name] = f"ping failed: {exc}"
        if not matrix.ok and standing is None:
            pings.read_journals()
    finally:
        matrix.addresses = {host: ip for host, (_, ip) in sorted(pings.probes.items()) if ip}
        if standing is None:
            parallel(nodes, lambda node: node.sh(f"docker rm -f {probe_name(node)} >/dev/null 2>&1; true", check=False))
    return matrix


LIKELY_VXLAN = (
    "gossip between the two hosts works (names resolve), their traffic does not: "
    "udp/4789 (VXLAN data) is likely blocked between them"
)


def stale_entry(holder: str, addr: str, toward: str, owner: str) -> str:
    """The hint for a pair whose probe address one host's overlay sends elsewhere."""
    return (
        f"{holder}'s overlay sends {addr} ({owner}'s probe) to {toward}: a stale entry "
        f"(peers.py), so traffic between {holder} and that address goes astray; "
        f"a re-run restarts {holder}'s dockerd (--allow-restart if it runs containers of yours)"
    )


def diagnose(matrix: Matrix, nodes: list[Node]) -> dict[tuple[str, str], str]:
    """(source, target) -> why a failed pair likely failed, where the facts can tell.

    First a stale entry (read before the probes started): one of the two hosts sends the
    other's probe address to a third host, because that address was someone else's before
    (IPAM gives freed addresses again); then the kernel sends the pings, or the replies,
    there. Else, if each dockerd's gossip last saw the other join, the control plane (7946)
    works while the data plane does not, which is VXLAN's port."""
    by_name = {n.name: n for n in nodes}
    sent_astray = {n.name: peers.stale(n, nodes) for n in nodes}
    hints = {}
    for (src, dst, _), (ok, _) in matrix.results.items():
        a, b = by_name.get(src), by_name.get(dst)
        if ok or a is None or b is None or (src, dst) in hints:
            continue
        to_dst, to_src = matrix.addresses.get(dst, ""), matrix.addresses.get(src, "")
        if sent_astray[src].get(to_dst, dst) != dst:
            hints[(src, dst)] = stale_entry(src, to_dst, sent_astray[src][to_dst], dst)
        elif sent_astray[dst].get(to_src, src) != src:
            hints[(src, dst)] = stale_entry(dst, to_src, sent_astray[dst][to_src], src)
        elif (b.facts.hostname or b.name) in a.facts.gossip_alive and (
            a.facts.hostname or a.name
        ) in b.facts.gossip_alive:
            hints[(src, dst)] = LIKELY_VXLAN
    return hints
