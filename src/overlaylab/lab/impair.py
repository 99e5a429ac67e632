"""The lab's network misbehaving on demand, where a switch, router or firewall between the
hosts would make it misbehave: outside the hosts, in an nftables table of the lab's own
(`bridge olab_<lab>`, its chain hooked on the bridge's forward path, before anything else),
and, for a rate, in a queue on the bridge's port toward the host a packet goes to.

Why there: a fault made inside a host (its iptables, its interfaces) is visible to the host
itself and proves less about what overlaylab sees of a real fault between machines. Rules
match the hosts' cluster addresses, not their interfaces, so they outlive a host's reboot
(which gives it new veths); the lab's own FORWARD rules (firewall.py) are iptables', and
never reach this table. Each rule carries a comment that says the impairment it belongs
to: what is in force is read back from the kernel, never from a file of ours.

What it can make on this kernel (read from /proc/config.gz): drops by protocol and port,
random loss (numgen), a path MTU black hole (the IP total length), a partition, and a rate
(an HTB class on the bridge port: a queue, as a slow link has, where a policer would drop
bursts TCP then backs off from). A rate's nft rule only counts and records it; its queue
lives on a veth a reboot replaces, so `shape` makes it again where it is missing. A delay
is a netem queue in the same place, made only where the kernel has netem (this machine's
has not: --delay is refused there, naming the missing feature)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from overlaylab.errors import InputError, OverlaylabError
from overlaylab.lab.spec import HostSpec, LabSpec

KINDS = ("block", "loss", "mtu", "rate", "partition", "delay")
DIRECTIONS = ("in", "out", "both")
PROTOCOLS = ("tcp", "udp")
SETTINGS = ("loss", "mtu", "rate", "delay")  # one value per pair and direction: a new one replaces the old
QUEUED = ("rate", "delay")  # made as queues on the bridge ports (shape); their nft rule records them
RATE_RE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)")
RATE_BITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}


@dataclass(frozen=True)
class Impairment:
    """One impairment: on the cluster network, between ``node`` and ``peer`` (None: every
    other host); ``direction`` is seen from ``node`` (in: toward it)."""

    node: str
    kind: str
    value: str = ""  # udp/4789, 30 (percent), 1400 (bytes), 10mbit; "" for a partition
    peer: str | None = None
    direction: str = "both"

    @property
    def key(self) -> tuple[str, str | None, str, str]:
        """Two impairments with the same key and a setting for kind (loss, mtu, rate, delay)
        cannot both hold: the newer replaces the older."""
        return (self.node, self.peer, self.kind, self.direction)

    @property
    def tag(self) -> str:
        """What the rules' comment says: the impairment whole, read back by `--show`."""
        return f"olab|{self.node}|{self.peer or '*'}|{self.kind}|{self.value}|{self.direction}"

    @classmethod
    def of_tag(cls, tag: str) -> Impairment | None:
        parts = tag.split("|")
        if len(parts) != 6 or parts[0] != "olab":
            return None
        _, node, peer, kind, value, direction = parts
        return cls(node, kind, value, None if peer == "*" else peer, direction)

    def describe(self) -> str:
        between = f"{self.node} <-> {self.peer}" if self.peer else f"{self.node} <-> every other host"
        what = {
            "block": f"{self.value} blocked",
            "loss": f"{self.value}% loss each way",
            "mtu": f"packets over {self.value} bytes dropped",
            "rate": f"rate {self.value}",
            "delay": f"{self.value} ms delay",
            "partition": "partitioned",
        }.get(self.kind, self.kind)
        arrow = {"in": f" (into {self.node})", "out": f" (out of {self.node})"}.get(self.direction, "")
        return f"{between}: {what}{arrow}"


def table(lab: str) -> str:
    return f"olab_{lab}"


def rate_bits(text: str) -> int | None:
    """bits per second of "10mbit", "512kbit", ...; None when it does not parse."""
    match = RATE_RE.fullmatch(text)
    if not match:
        return None
    bits = float(match[1]) * RATE_BITS[match[2]]
    return int(bits) if bits >= 8_000 else None  # under 1 kbyte/s a queue holds a packet for seconds


def netem_missing() -> str | None:
    """Why this kernel cannot delay packets (netem), or None when it can."""
    try:
        config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return "the kernel's configuration (/proc/config.gz) cannot be read to find netem"
    if re.search(r"^CONFIG_NET_SCH_NETEM=[ym]$", config, re.M):
        return None
    return "this kernel has no netem (CONFIG_NET_SCH_NETEM is not set): a delay cannot be made on it"


def check(spec: LabSpec, imp: Impairment, at: Callable[[str], str] = lambda field: "") -> Impairment:
    """An impairment that can be made on this lab, as it will be recorded (a partition is
    always both ways), or an InputError naming the field that is wrong. ``at(field)`` says
    where that field was written (a file's path and line)."""

    def refuse(field_name: str, why: str) -> InputError:
        return InputError(f"{at(field_name)}{field_name}: {why}")

    names = [h.name for h in spec.hosts]
    for field_name, host in (("node", imp.node), ("peer", imp.peer)):
        if host is not None and host not in names:
            raise refuse(field_name, f"no host {host!r} in lab {spec.name!r} (it has {', '.join(names)})")
    if imp.peer == imp.node:
        raise refuse("peer", f"{imp.peer} is the node itself: name another host, or no peer (every other)")
    if imp.direction not in DIRECTIONS:
        raise refuse("direction", f"{imp.direction!r} is not one of {', '.join(DIRECTIONS)}")
    if imp.kind not in KINDS:
        raise refuse(imp.kind, f"not an impairment ({', '.join(KINDS)})")
    if imp.kind == "block":
        proto, _, port = imp.value.partition("/")
        if proto not in PROTOCOLS or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise refuse("block", f"{imp.value!r} is not PROTO/PORT (tcp or udp, 1-65535), e.g. udp/4789")
    elif imp.kind == "loss":
        if not re.fullmatch(r"\d+(\.\d+)?", imp.value) or not 0 < float(imp.value) <= 100:
            raise refuse("loss", f"{imp.value!r} must be a percentage above 0 and at most 100")
    elif imp.kind == "mtu":
        if not imp.value.isdigit() or not 68 <= int(imp.value) <= 9000:
            raise refuse("mtu", f"{imp.value!r} must be 68 to 9000 (bytes of IP total length)")
    elif imp.kind == "rate" and rate_bits(imp.value) is None:
        raise refuse("rate", f"{imp.value!r} is not a rate like 10mbit, 512kbit or 1gbit (1 kbyte/s at least)")
    elif imp.kind == "delay":
        missing = netem_missing()
        if missing:
            raise refuse("delay", missing)
        if not imp.value.isdigit() or not 1 <= int(imp.value) <= 60_000:
            raise refuse("delay", f"{imp.value!r} must be milliseconds, 1 to 60000")
    if imp.kind in QUEUED and shutil.which("tc") is None:
        raise refuse(imp.kind, "tc is not installed (Debian: apt-get install iproute2; `make setup` installs it)")
    return dataclasses.replace(imp, direction="both") if imp.kind == "partition" else imp


def rules(spec: LabSpec, imp: Impairment) -> list[str]:
    """The nft rules of one impairment, each commented with its tag."""
    node = next(h.cluster_ip for h in spec.hosts if h.name == imp.node)
    peer = next((h.cluster_ip for h in spec.hosts if h.name == imp.peer), str(spec.cluster_net))
    ways = {"out": [(node, peer)], "in": [(peer, node)], "both": [(node, peer), (peer, node)]}
    pairs = ways["both" if imp.kind == "partition" else imp.direction]
    if imp.kind == "block":
        proto, _, port = imp.value.partition("/")
        verdict = f"{proto} dport {port} drop"
    elif imp.kind == "loss":
        verdict = f"numgen random mod 10000 < {round(float(imp.value) * 100)} drop"
    elif imp.kind == "mtu":
        verdict = f"ip length > {imp.value} drop"
    elif imp.kind in QUEUED:
        verdict = "counter"  # the record (and a count); the rate or delay itself is a queue: shape()
    else:
        verdict = "drop"
    return [f'ip saddr {src} ip daddr {dst} {verdict} comment "{imp.tag}"' for src, dst in pairs]


def nft(*args: str, stdin: str | None = None) -> str:
    if shutil.which("nft") is None:
        raise InputError("nft is not installed (Debian: apt-get install nftables; `make setup` installs it)")
    proc = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OverlaylabError(f"nft {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def in_force(lab: str) -> list[Impairment]:
    """What the lab's table holds now, one entry per impairment (read from the rules' comments)."""
    if shutil.which("nft") is None:
        return []
    proc = subprocess.run(["nft", "-j", "list", "table", "bridge", table(lab)], capture_output=True, text=True)
    if proc.returncode != 0:
        return []  # no table: nothing in force
    found: list[Impairment] = []
    for item in json.loads(proc.stdout).get("nftables", []):
        imp = Impairment.of_tag(str(item.get("rule", {}).get("comment", "")))
        if imp is not None and imp not in found:
            found.append(imp)
    return found


def apply(spec: LabSpec, wanted: list[Impairment], ports: dict[str, str]) -> list[Impairment]:
    """Each impairment checked first (nothing changes when one is wrong), then made in one nft
    transaction with their queues; one in force already is left as it is, and a setting (loss,
    mtu, rate, delay) replaces the one of the same pair and direction. Returns those made.
    ``ports``: each running host's port on the cluster bridge (hosts.cluster_ports), where a
    queue goes. Should a queue fail, the rules go back to what they were."""
    checked = [check(spec, imp) for imp in wanted]
    have = in_force(spec.name)
    new: list[Impairment] = []
    for imp in checked:
        if imp in have or imp in new:
            continue
        new = [n for n in new if not (imp.kind in SETTINGS and n.key == imp.key)] + [imp]
    if not new:
        return []
    replaced = [h for h in have if h.kind in SETTINGS and any(n.key == h.key for n in new)]
    t = table(spec.name)
    script = [
        f"add table bridge {t}",
        f"add chain bridge {t} forward {{ type filter hook forward priority -200; policy accept; }}",
        *(f"delete rule bridge {t} forward handle {h}" for h in _handles(spec.name, replaced)),
    ]
    script += [f"add rule bridge {t} forward {rule}" for imp in new for rule in rules(spec, imp)]
    nft("-f", "-", stdin="\n".join(script) + "\n")
    touched = _queued_toward(spec, new + replaced)
    try:
        shape(spec, ports, touched)
    except OverlaylabError:
        undo = [f"delete rule bridge {t} forward handle {h}" for h in _handles(spec.name, new)]
        undo += [f"add rule bridge {t} forward {rule}" for imp in replaced for rule in rules(spec, imp)]
        nft("-f", "-", stdin="\n".join(undo) + "\n")
        shape(spec, ports, touched)
        raise
    return new


def _queued_toward(spec: LabSpec, imps: list[Impairment]) -> set[str]:
    """The hosts whose bridge port queues these impairments (a rate or a delay toward them)."""
    return {to.name for imp in imps if imp.kind in QUEUED for _, to in flows(spec, imp)}


def reset(
    lab: str, node: str | None = None, spec: LabSpec | None = None, ports: dict[str, str] | None = None
) -> list[Impairment]:
    """Every impairment of the lab (its table whole, even empty), or those of one host (as
    node or as peer), removed; with ``spec`` and ``ports`` their queues too (lab-down passes
    none: its veths go with it)."""
    gone = [imp for imp in in_force(lab) if node is None or node in (imp.node, imp.peer)]
    if node is None:
        if shutil.which("nft") is not None:
            subprocess.run(["nft", "delete", "table", "bridge", table(lab)], capture_output=True, check=False)
    elif gone:
        handles = _handles(lab, gone)
        nft("-f", "-", stdin="".join(f"delete rule bridge {table(lab)} forward handle {h}\n" for h in handles))
    if spec is not None and ports is not None:
        shape(spec, ports, touched=_queued_toward(spec, gone))
    return gone


def _handles(lab: str, imps: list[Impairment]) -> list[str]:
    """The handles of the rules these impairments are made of (their comments say so)."""
    if not imps:
        return []
    listing = json.loads(nft("-j", "-a", "list", "table", "bridge", table(lab)))
    tags = {imp.tag for imp in imps}
    return [
        str(item["rule"]["handle"])
        for item in listing.get("nftables", [])
        if "rule" in item and item["rule"].get("comment") in tags
    ]


def flows(spec: LabSpec, imp: Impairment) -> list[tuple[HostSpec, HostSpec]]:
    """The (from, to) host pairs an impairment covers, its peer "every other host" spelt out."""
    node = spec.host(imp.node)
    peers = [spec.host(imp.peer)] if imp.peer else [h for h in spec.hosts if h.name != imp.node]
    ways = {"out": [(node, p) for p in peers], "in": [(p, node) for p in peers]}
    return ways.get(imp.direction, ways["out"] + ways["in"])


def tc(*args: str, check: bool = True) -> str:
    if shutil.which("tc") is None:
        raise InputError("tc is not installed (Debian: apt-get install iproute2; `make setup` installs it)")
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise OverlaylabError(f"tc {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _shaped(port: str) -> bool:
    """The port has our root queue (an HTB, handle 1:); Docker leaves its veths with none."""
    return any(
        q.get("kind") == "htb" and q.get("handle") == "1:"
        for q in json.loads(tc("-j", "qdisc", "show", "dev", port) or "[]")
    )


def shape(spec: LabSpec, ports: dict[str, str], touched: Collection[str] = ()) -> list[str]:
    """The rates and delays in force as queues on the bridge ports a packet leaves by (the port
    toward the host it goes to): each flow its own HTB class (its rate, or no limit) with a
    leaf that holds its packets (netem for a delay), unmatched traffic straight through. A port
    is rebuilt when a queue toward its host changed (``touched``) or when it wants one and has
    none (its host rebooted: a new veth); any other port is left as it is. A host whose port
    is not known (it is not running) gets its queues when it runs again. Returns the hosts
    whose port was rebuilt."""
    wants: dict[str, dict[tuple[str, str], dict[str, str]]] = {}
    for imp in in_force(spec.name):
        if imp.kind in QUEUED:
            for frm, to in flows(spec, imp):
                wants.setdefault(to.name, {}).setdefault((frm.cluster_ip, to.cluster_ip), {})[imp.kind] = imp.value
    rebuilt = []
    for host, port in sorted(ports.items()):
        if host not in touched and host not in wants:
            continue
        has = _shaped(port)
        if host not in touched and has:
            continue
        if has:
            tc("qdisc", "del", "dev", port, "root")
        for n, ((src, dst), kinds) in enumerate(wants.get(host, {}).items(), start=1):
            if n == 1:  # default 0: unmatched packets go straight through, by a queue as long as a NIC's
                tc("qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "direct_qlen", "1000")
            rate = kinds.get("rate", "10gbit")  # a delay alone: no limit a lab's veth could reach
            tc("class", "add", "dev", port, "parent", "1:", "classid", f"1:{n}", "htb", "rate", rate, "ceil", rate)
            if "delay" in kinds:
                tc(
                    "qdisc",
                    "add",
                    "dev",
                    port,
                    "parent",
                    f"1:{n}",
                    "netem",
                    "delay",
                    f"{kinds['delay']}ms",
                    "limit",
                    "1000",
                )
            else:  # a queue as long as a NIC's, whatever the veth's own length
                tc("qdisc", "add", "dev", port, "parent", f"1:{n}", "pfifo", "limit", "1000")
            tc(
                "filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "src", f"{src}/32", "match", "ip", "dst", f"{dst}/32", "flowid", f"1:{n}",
            )  # fmt: skip
        rebuilt.append(host)
    return rebuilt


FIELDS = {"node", "peer", "direction", "block", "loss", "mtu", "rate", "partition", "delay"}


def load(path: Path, spec: LabSpec) -> list[Impairment]:
    """A YAML list of impairments, each checked, errors with file:line:field (the line of the
    field that is wrong)."""
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"{path}:{mark.line + 1 if mark else '?'}: YAML error: {exc}") from None
    if not isinstance(root, yaml.SequenceNode):
        raise InputError(f"{path}: must be a list of impairments, e.g. - {{node: bm-docker-02, loss: 30}}")
    found = []
    for n, item in enumerate(root.value):
        line = item.start_mark.line + 1
        if not isinstance(item, yaml.MappingNode):
            raise InputError(f"{path}:{line}: [{n}]: an impairment is a mapping of node, peer, and one kind")
        entry: dict[str, tuple[str, int]] = {}
        for k, v in item.value:
            at = v.start_mark.line + 1
            if k.value not in FIELDS:
                raise InputError(f"{path}:{at}: [{n}].{k.value}: unknown (known: {', '.join(sorted(FIELDS))})")
            if not isinstance(v, yaml.ScalarNode) or v.value == "":
                raise InputError(f"{path}:{at}: [{n}].{k.value}: one value, e.g. {k.value}: {EXAMPLES[k.value]}")
            entry[k.value] = (str(v.value), at)
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            raise InputError(f"{path}:{line}: [{n}]: exactly one of {', '.join(KINDS)} (found {len(kinds)})")
        kind = kinds[0]
        if "node" not in entry:
            raise InputError(f"{path}:{line}: [{n}].node: missing (the host the impairment is on)")
        if kind == "partition" and entry["partition"][0].lower() not in ("true", "yes", "on"):
            raise InputError(f"{path}:{entry['partition'][1]}: [{n}].partition: {entry['partition'][0]!r}: only true")
        imp = Impairment(
            node=entry["node"][0],
            kind=kind,
            value="" if kind == "partition" else entry[kind][0],
            peer=entry["peer"][0] if "peer" in entry else None,
            direction=entry.get("direction", ("both", line))[0],
        )

        def at(field_name: str, n: int = n, entry: dict[str, tuple[str, int]] = entry, line: int = line) -> str:
            return f"{path}:{entry.get(field_name, ('', line))[1]}: [{n}]: "

        found.append(check(spec, imp, at))
    return found


EXAMPLES = {
    "node": "bm-docker-02",
    "peer": "bm-docker-03",
    "direction": "in",
    "block": "udp/4789",
    "loss": 30,
    "mtu": 1400,
    "rate": "10mbit",
    "partition": "true",
    "delay": 100,
}
