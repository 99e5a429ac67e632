"""Step 8: prove the overlay. One busybox per host; every ordered pair pings by IP and by
container name, sends a packet of exactly the overlay's MTU that may not be fragmented, and
fetches 1 MiB over TCP by name; the matrix is printed; the probes are removed, also on failure.

Only traffic proves the overlay (name lookup can succeed while traffic fails), and small
pings do not prove what applications send: a path whose MTU cannot carry a full-size packet
plus VXLAN's 50 bytes passes every small ping while TCP hangs at its first full segment.
Probes get a window to converge (the overlay's gossip is eventually consistent), then they
are judged.
"""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass, field

from overlaylab import peers
from overlaylab.checks import pathmtu, preflight
from overlaylab.checks.pathmtu import ICMP_HEADERS
from overlaylab.cluster import Node, journal, parallel
from overlaylab.facts import PEERS_SCRIPT, PROBE_PREFIX, ROLE_LABEL, parse_peers
from overlaylab.report import columns
from overlaylab.steps import network
from overlaylab.steps.network import DEFAULT_MTU, VXLAN_OVERHEAD

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
BY = ("ip", "name", "mtu", "tcp")  # the checks of each ordered pair, in the matrix's cell order
# A no-op re-run's standing anchors: the pings alone (nothing changed: no stream to prove, and
# the run stays at two commands a host); after a run that changed something, all of BY.
ANCHORED = ("ip", "name", "mtu")
# each check as the matrix's legend names it, and as a passed host's line says it
NAMES = {"ip": "by IP", "name": "by name", "mtu": "a full-size packet", "tcp": "1 MiB over TCP"}
DONE = {**NAMES, "mtu": "with " + NAMES["mtu"], "tcp": "with " + NAMES["tcp"]}
STREAM_BYTES = 1 << 20  # what each probe serves and every other one fetches, by name, over TCP
STREAM_TRY_SECONDS = 5  # one fetch's limit: a stream that stalls (a full-size segment lost) fails


RUN_ID = secrets.token_hex(3)
PREFIX = PROBE_PREFIX


# A probe's start (and its removal) is bounded: dockerd can wait on its store for as long as
# TCP retries (seen on the lab: a path toward the store's host that dropped full-size packets
# stalled `docker run` on the overlay for minutes); verify then names that host and goes on.
PROBE_START_SECONDS = 60
STALLED = (
    f"docker run did not return within {PROBE_START_SECONDS} s: dockerd is waiting on something, such as its "
    "cluster store over a path that stalls TCP (an MTU black hole toward the store's host?)"
)


# A probe's command: the stream it serves every other probe (busybox's httpd, which forks per
# connection), then it waits to be removed.
# The stream every probe and every anchor serves by busybox's httpd (it daemonizes), for the TCP checks
SERVE_STREAM = f"mkdir -p /www && head -c {STREAM_BYTES} /dev/urandom > /www/stream && httpd -p 80 -h /www"


def serve(lifetime: int) -> str:
    """A probe's command: the stream, served; then it waits ``lifetime`` seconds to be removed."""
    return f"{SERVE_STREAM} && exec sleep {lifetime}"


def probe_name(node: Node) -> str:
    """Unique per run: a name removed and re-created seconds later can leave the legacy
    overlay's name records of other hosts stale."""
    return f"{PREFIX}{node.name}-{RUN_ID}"


def said(by: str, detail: str) -> str:
    """A failed check as a person reads it (the JSON keeps the raw detail): `by ip: ...`."""
    first, _, rest = detail.partition(" ")
    if by == "mtu" and first.isdigit():
        return f"with a full-size packet ({first} bytes, not to be fragmented): {rest or 'failed'}"
    if by == "tcp" and first.isdigit():
        return f"over TCP: {first} of {STREAM_BYTES} bytes arrived{': ' + rest if rest.strip() else ''}"
    return f"by {by}: {detail or 'failed'}"


@dataclass
class Matrix:
    hosts: list[str]
    expected: set[tuple[str, str, str]]  # (src, dst, by) pairs this run must prove
    checks: tuple[str, ...] = BY  # the cells of each pair, in order
    results: dict[tuple[str, str, str], tuple[bool, str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    journals: dict[str, str] = field(default_factory=dict)  # dockerd's last lines, for failed hosts
    addresses: dict[str, str] = field(default_factory=dict)  # host -> its probe's (or anchor's) address
    paths: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> target -> path MTU (0: no answer)
    # host -> the peer addresses its sandbox of the network sends somewhere (address -> VTEP),
    # read on the hosts of failed pairs before the probes are removed
    learned: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(self.results.get(key, (False, ""))[0] for key in self.expected)

    def failures(self) -> list[str]:
        out = [f"{host}: {err}" for host, err in self.errors.items()]
        for key in sorted(self.expected):
            ok, detail = self.results.get(key, (False, "not tested"))
            if not ok:
                out.append(f"{key[0]} -> {key[1]} {said(key[2], detail)}")
        return out

    def passed(self) -> str:
        """What a host whose every pair passed is said to do."""
        ways = [DONE[by] for by in self.checks]
        return f"reaches every other host {', '.join(ways[:-1])} and {ways[-1]}"

    def render(self) -> str:
        rows = [["", *self.hosts]]
        for src in self.hosts:
            cells = [src]
            for dst in self.hosts:
                if src == dst:
                    cells.append("-")
                    continue
                marks = []
                for by in self.checks:
                    res = self.results.get((src, dst, by))
                    marks.append("?" if res is None else ("✓" if res[0] else "✗"))
                cells.append("/".join(marks))
            rows.append(cells)
        legend = " / ".join(NAMES[by] for by in self.checks)
        return "\n".join([f"ping matrix (row reaches column; {legend}):", *columns(rows)])

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
            "checks": list(self.checks),
            "path_mtu": self.paths,
            "learned": self.learned,
        }


def ping_script(
    probe: str, targets: list[tuple[str, str, str]], window: int = CONVERGE_SECONDS, ladder: str = ""
) -> str:
    """targets: (host, by, address), by one of BY. Prints `R host by ok|fail detail` per target.

    One `docker exec` runs every small ping at once inside the probe, each in its own retry
    loop until the shared window ends: one host's pings take the time of its slowest
    target, not the sum (at 12 hosts, 22 targets each), and start one process in the
    container, not one per try (a docker exec costs ~0.3 s of CPU on a small host).

    The TCP checks ("tcp") run there too: each fetches the other probe's stream by name (busybox's
    wget from its httpd), whole or failed; a try that stalls ends after STREAM_TRY_SECONDS.

    The full-size checks ("mtu") run beside them, in the same window, from the host: busybox's
    ping cannot forbid fragmenting, the host's (iputils) can, in the probe's network namespace
    (`nsenter -n`), at the size of the probe's own interface: a packet exactly the overlay's
    MTU, which the path between the hosts carries only if it fits the MTU plus VXLAN's 50.
    ``ladder``: the path MTU's pings between the hosts' cluster addresses (pathmtu.script),
    in the same round: a failed full-size check then says what would fit."""
    inner = [f"end=$(( $(date +%s) + {window} ))"]
    outer = [f"end=$(( $(date +%s) + {window} ))"]
    full = [(host, addr) for host, by, addr in targets if by == "mtu"]
    for host, by, addr in targets:
        q = shlex.quote(addr)
        if by == "mtu":
            continue
        if by == "tcp":
            err, url = shlex.quote(f"/tmp/tcp-{host}.err"), shlex.quote(f"http://{addr}/stream")
            fetch = f"timeout {STREAM_TRY_SECONDS} wget -q -O - {url} 2>{err}"
            inner.append(
                f"( while :; do n=$(( $({fetch} | wc -c) )); "
                f"[ $n -eq {STREAM_BYTES} ] && {{ echo 'R {host} tcp ok'; break; }}; "
                f'if [ $(date +%s) -ge $end ]; then echo "R {host} tcp fail $n $(tail -n 1 {err})"; break; fi; '
                "sleep 0.5; done ) &"
            )
            continue
        inner.append(
            f"( while :; do out=$(ping -c 1 -W 1 {q} 2>&1) && {{ echo 'R {host} {by} ok'; break; }}; "
            f'if [ $(date +%s) -ge $end ]; then echo "R {host} {by} fail $(echo "$out" | tail -n 1)"; break; fi; '
            "sleep 0.5; done ) &"
        )
    inner.append("wait")
    outer.append(f"docker exec {shlex.quote(probe)} sh -c {shlex.quote(chr(10).join(inner))} &")
    if full:
        outer += [
            f"pid=$(docker inspect -f '{{{{.State.Pid}}}}' {shlex.quote(probe)})",
            "mtu=$(nsenter -t \"$pid\" -n ip -o link show dev eth0 | sed -n 's/.* mtu \\([0-9]*\\) .*/\\1/p')",
            f"size=$(( ${{mtu:-{ICMP_HEADERS}}} - {ICMP_HEADERS} ))",
        ]
        for host, addr in full:
            q = shlex.quote(addr)
            outer.append(
                f'( if [ -z "$mtu" ]; then echo "R {host} mtu fail the probe\'s MTU could not be read"; exit; fi; '
                f'while :; do out=$(nsenter -t "$pid" -n ping -M do -s $size -c 1 -W 1 {q} 2>&1) '
                f'&& {{ echo "R {host} mtu ok $mtu"; break; }}; '
                f'if [ $(date +%s) -ge $end ]; then echo "R {host} mtu fail $mtu $(echo "$out" | tail -n 1)"; '
                "break; fi; "
                "sleep 0.5; done ) &"
            )
    outer.append("wait")
    if ladder:  # after the checks: its pings decide nothing there, and add no load to them
        outer += [ladder]
    return "\n".join(outer)


@dataclass
class _Round:
    """One round of verify's pings: the probes (or the standing anchors) and what they say."""

    network: str
    nodes: list[Node]
    involved: set[str]  # the hosts whose pairs are proved
    matrix: Matrix
    probes: dict[str, tuple[str, str]]  # host -> (container, its address)
    mtu: int | None = None  # the overlay's MTU as the run wants it (network.mtu); None: as the host's facts read it
    scopes: set[str] = field(default_factory=set)  # the network's scope, as each probe's host says it
    ids: dict[str, str] = field(default_factory=dict)  # host -> the network's ID (10 chars), as it says it

    def start(self, node: Node) -> None:
        probe = probe_name(node)
        net = shlex.quote(self.network)
        fmt = "'{{(index .NetworkSettings.Networks " + f'"{self.network}"' + ").IPAddress}}'"
        run = (
            f"timeout {PROBE_START_SECONDS} docker run -d --name {probe} --label {ROLE_LABEL}=probe "
            f"--rm --network {net} busybox sh -c {shlex.quote(serve(600))} >/dev/null"
        )
        out = node.sh(
            f"{run} || {{ rc=$?; [ $rc -eq 124 ] && echo {shlex.quote(STALLED)} >&2; exit $rc; }}; "
            f"docker inspect -f {fmt} {probe} && docker network inspect -f '{{{{.Scope}}}} {{{{.Id}}}}' {net}"
        )
        ip, _, said = out.strip().partition("\n")
        scope, _, nid = said.strip().partition(" ")
        self.probes[node.name] = (probe, ip.strip())
        self.scopes.add(scope)
        self.ids[node.name] = nid[:10]

    def ping(self, node: Node) -> None:
        """Every target of this host at once, in one command; each judged after the window."""
        targets = [
            (other.name, by, self.probes[other.name][0] if by in ("name", "tcp") else self.probes[other.name][1])
            for other in self.nodes
            if other is not node
            and other.name in self.probes
            and (node.name in self.involved or other.name in self.involved)
            for by in self.matrix.checks
        ]
        if not targets:
            return
        window = SWARM_CONVERGE_SECONDS if "swarm" in self.scopes else CONVERGE_SECONDS
        peers = [(o.name, o.advertise_ip) for o in self.nodes if o is not node and o.advertise_ip]
        made = network.effective_mtu(node.facts.network) if node.facts.network else None
        needed = (self.mtu or made or DEFAULT_MTU) + VXLAN_OVERHEAD
        ladder = pathmtu.script(node.advertise_ip, peers, pathmtu.ladder(needed)) if node.advertise_ip else ""
        out = node.sh(ping_script(self.probes[node.name][0], targets, window, ladder if peers else ""), check=False)
        if peers and ladder:
            self.matrix.paths[node.name] = pathmtu.parse(out, [name for name, _ in peers])
        for line in out.splitlines():
            parts = line.split(" ", 4)
            if len(parts) >= 4 and parts[0] == "R":
                detail = parts[4] if len(parts) > 4 else ""
                self.matrix.results[(node.name, parts[1], parts[2])] = (parts[3] == "ok", detail)

    def read_journals(self) -> None:
        """dockerd's last lines on every host in a failed pair, and where its overlay sends
        each peer address (diagnose: an end that never learned the other's probe), read
        before anything is cleaned up."""
        failing = {f.split(" ", 1)[0].rstrip(":") for f in self.matrix.failures()}
        failing |= {d for (_, d, _), (ok, _) in self.matrix.results.items() if not ok}

        def read(node: Node) -> None:
            self.matrix.journals[node.name] = journal(node, 15)
            nid = self.ids.get(node.name, "")
            if nid:
                out = node.sh(PEERS_SCRIPT, check=False)
                self.matrix.learned[node.name] = parse_peers(out).get(nid, {})

        parallel([n for n in self.nodes if n.name in failing], read)


def run(
    network: str,
    nodes: list[Node],
    sources: list[Node] | None = None,
    standing: dict[str, tuple[str, str]] | None = None,
    mtu: int | None = None,
    stream: bool = False,
) -> Matrix:
    """Ping matrix over ``nodes``; with ``sources``, only pairs that involve one of them.

    With ``standing`` (host -> a running container on the network and its IP: the anchors),
    those ping each other and nothing is started or removed: one command per host; with
    ``stream`` (a run that changed something) they fetch each other's stream too (TCP)."""
    involved = {n.name for n in (sources or nodes)}
    names = [n.name for n in nodes]
    checks = ANCHORED if standing and not stream else BY
    expected = {
        (s, d, by) for s in names for d in names if s != d and (s in involved or d in involved) for by in checks
    }
    matrix = Matrix(names, expected, checks)
    pings = _Round(network, nodes, involved, matrix, dict(standing or {}), mtu)
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
            remove = f"timeout {PROBE_START_SECONDS} docker rm -f"
            parallel(nodes, lambda node: node.sh(f"{remove} {probe_name(node)} >/dev/null 2>&1; true", check=False))
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


def never_learned(holder: str, addr: str, owner: str) -> str:
    """The hint for a pair one of whose ends has no entry for the other's probe: a ping needs
    both ways, so both directions fail whichever end lacks it."""
    return (
        f"{holder} has no entry for {owner}'s probe ({addr}): its overlay never learned that "
        f"container (the gossip of its join did not reach {holder}, and no lookup found it), "
        "so the pair has no way either direction"
    )


def unlearned(matrix: Matrix, src: str, dst: str) -> str | None:
    """never_learned() for the end, if either, whose table (read after the pings) lacks the
    other's probe. A table read empty proves nothing: it is no reading."""
    for holder, owner in ((src, dst), (dst, src)):
        table, addr = matrix.learned.get(holder), matrix.addresses.get(owner, "")
        if table and addr and addr not in table:
            return never_learned(holder, addr, owner)
    return None


def full_size_lost(src: str, dst: str, detail: str, path: int = 0) -> str:
    """The hint for a pair whose small pings pass and whose full-size packet does not; with
    the path's MTU as measured (0: not), the network.mtu that would fit."""
    mtu, _, last = detail.partition(" ")
    if not mtu.isdigit() or not any(word in last for word in ("packet loss", "too long", "Frag needed")):
        return f"the full-size check could not run: {detail}"
    measured = f" (it carries {path}: set network.mtu to {pathmtu.fits(path)}," if path else " (set network.mtu lower,"
    return (
        f"packets of {mtu} bytes (the overlay's MTU) are lost while small pings pass: the path "
        f"between {src} and {dst} cannot carry {int(mtu) + VXLAN_OVERHEAD} bytes, the MTU plus VXLAN's "
        f"{VXLAN_OVERHEAD}{measured} or raise the underlay's MTU)"
    )


def stream_lost(src: str, dst: str, detail: str) -> str:
    """The hint for a pair whose pings all pass, the full-size one too, and whose stream does not."""
    got, _, last = detail.partition(" ")
    return (
        f"small and full-size pings pass, a TCP stream does not ({got} of {STREAM_BYTES} bytes from "
        f"{dst}'s probe in {STREAM_TRY_SECONDS} s{': ' + last if last else ''}): something on the path "
        "between the hosts drops or stalls TCP inside the overlay's packets (a firewall that reads "
        "VXLAN's payload?)"
    )


def diagnose(matrix: Matrix, nodes: list[Node]) -> dict[tuple[str, str], str]:
    """(source, target) -> why a failed pair likely failed, where the facts can tell.

    First a stale entry (read before the probes started): one of the two hosts sends the
    other's probe address to a third host, because that address was someone else's before
    (IPAM gives freed addresses again); then the kernel sends the pings, or the replies,
    there. Else, if pings by IP fail and one end's table (read after them) has no entry for
    the other's probe, that end never learned it. Else, if small pings pass, only the
    full-size packet failed: the path's MTU; or only the TCP stream: something that reads
    the overlay's payload. Else, if each dockerd's gossip last saw the other join, the control plane (7946) works while
    the data plane does not, which is VXLAN's port."""
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
        elif not matrix.results.get((src, dst, "ip"), (False, ""))[0] and (missing := unlearned(matrix, src, dst)):
            hints[(src, dst)] = missing
        elif matrix.results.get((src, dst, "ip"), (False, ""))[0]:
            full, stream = matrix.results.get((src, dst, "mtu")), matrix.results.get((src, dst, "tcp"))
            if full is not None and not full[0]:
                no_ping = preflight.ping_problem(a.facts)  # fab verify alone: no preflight said it
                hints[(src, dst)] = no_ping or full_size_lost(src, dst, full[1], matrix.paths.get(src, {}).get(dst, 0))
            elif stream is not None and not stream[0] and matrix.results.get((src, dst, "name"), (False, ""))[0]:
                hints[(src, dst)] = stream_lost(src, dst, stream[1])
        elif (b.facts.hostname or b.name) in a.facts.gossip_alive and (
            a.facts.hostname or a.name
        ) in b.facts.gossip_alive:
            hints[(src, dst)] = LIKELY_VXLAN
    return hints
