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
lives on a veth a reboot replaces, so `shape` makes it again where it is missing. Not a
delay: that needs netem, and --delay is refused where the kernel lacks it."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from overlaylab.errors import InputError, OverlaylabError
from overlaylab.lab.spec import HostSpec, LabSpec

KINDS = ("block", "loss", "mtu", "rate", "partition", "delay")
DIRECTIONS = ("in", "out", "both")
PROTOCOLS = ("tcp", "udp")
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
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
            "partition": "partitioned",
        }.get(self.kind, self.kind)
        arrow = {"in": f" (into {self.node})", "out": f" (out of {self.node})"}.get(self.direction, "")
        return f"{between}: {what}{arrow}"


def table(lab: str) -> str:
    return f"olab_{lab}"


def rate_bits(text: str) -> int | None:
    """bits per second of "10mbit", "512kbit", ...; None when it does not parse."""
    match = RATE_RE.match(text.strip().lower())
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


def check(spec: LabSpec, imp: Impairment, where: str = "") -> None:
    """An impairment that can be made on this lab, or an InputError saying which field is wrong."""
    at = f"{where}: " if where else ""
    names = [h.name for h in spec.hosts]
    for field_name, host in (("node", imp.node), ("peer", imp.peer)):
        if host is not None and host not in names:
            raise InputError(f"{at}{field_name}: no host {host!r} in lab {spec.name!r} (it has {', '.join(names)})")
    if imp.peer == imp.node:
        raise InputError(f"{at}peer: {imp.peer} is the node itself: name another host, or no peer (every other)")
    if imp.direction not in DIRECTIONS:
        raise InputError(f"{at}direction: {imp.direction!r} is not one of {', '.join(DIRECTIONS)}")
    if imp.kind not in KINDS:
        raise InputError(f"{at}{imp.kind!r} is not an impairment ({', '.join(KINDS)})")
    if imp.kind == "block":
        proto, _, port = imp.value.partition("/")
        if proto not in PROTOCOLS or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InputError(f"{at}block: {imp.value!r} is not PROTO/PORT (tcp or udp, 1-65535), e.g. udp/4789")
    elif imp.kind == "loss":
        if not re.fullmatch(r"\d+(\.\d+)?", imp.value) or not 0 < float(imp.value) <= 100:
            raise InputError(f"{at}loss: {imp.value!r} must be a percentage above 0 and at most 100")
    elif imp.kind == "mtu":
        if not imp.value.isdigit() or not 68 <= int(imp.value) <= 9000:
            raise InputError(f"{at}mtu: {imp.value!r} must be 68 to 9000 (bytes of IP total length)")
    elif imp.kind == "rate" and rate_bits(imp.value) is None:
        raise InputError(f"{at}rate: {imp.value!r} is not a rate like 10mbit, 512kbit or 1gbit (1 kbyte/s at least)")
    elif imp.kind == "delay":
        raise InputError(f"{at}delay: {netem_missing() or 'a delay (netem) is not built in this version'}")


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
    elif imp.kind == "rate":
        verdict = "counter"  # the record (and a count); the rate itself is a queue: shape()
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
    """Each impairment checked first (nothing changes when one is wrong), then made; one in
    force already is left as it is. Returns those made. ``ports``: each running host's port on
    the cluster bridge (hosts.cluster_ports), where a rate's queue goes."""
    for imp in wanted:
        check(spec, imp)
    have = in_force(spec.name)
    new = [imp for imp in wanted if imp not in have]
    if not new:
        return []
    t = table(spec.name)
    script = [
        f"add table bridge {t}",
        f"add chain bridge {t} forward {{ type filter hook forward priority -200; policy accept; }}",
        *(f"add rule bridge {t} forward {rule}" for imp in new for rule in rules(spec, imp)),
    ]
    nft("-f", "-", stdin="\n".join(script) + "\n")
    shape(spec, ports, touched={to.name for imp in new if imp.kind == "rate" for _, to in flows(spec, imp)})
    return new


def reset(
    lab: str, node: str | None = None, spec: LabSpec | None = None, ports: dict[str, str] | None = None
) -> list[Impairment]:
    """Every impairment of the lab, or those of one host (as node or as peer), removed; with
    ``spec`` and ``ports`` the rates' queues too (lab-down passes none: its veths go with it)."""
    gone = [imp for imp in in_force(lab) if node is None or node in (imp.node, imp.peer)]
    if gone:
        _delete(lab, node, gone)
    if spec is not None and ports is not None:
        shape(spec, ports, touched={to.name for imp in gone if imp.kind == "rate" for _, to in flows(spec, imp)})
    return gone


def _delete(lab: str, node: str | None, gone: list[Impairment]) -> None:
    if node is None:
        if shutil.which("nft") is not None:
            subprocess.run(["nft", "delete", "table", "bridge", table(lab)], capture_output=True, check=False)
        return
    listing = json.loads(nft("-j", "-a", "list", "table", "bridge", table(lab)))
    tags = {imp.tag for imp in gone}
    handles = [
        str(item["rule"]["handle"])
        for item in listing.get("nftables", [])
        if "rule" in item and item["rule"].get("comment") in tags
    ]
    for handle in handles:
        nft("delete", "rule", "bridge", table(lab), "forward", "handle", handle)


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
    """The rates in force as queues on the bridge ports a packet leaves by (the port toward the
    host it goes to), each flow its own HTB class, unmatched traffic straight through. A port
    is rebuilt when a rate toward its host changed (``touched``) or when it wants a queue and
    has none (its host rebooted: a new veth); any other port is left as it is. Returns the
    hosts whose port was rebuilt."""
    wants: dict[str, list[tuple[str, str, str]]] = {}
    for imp in in_force(spec.name):
        if imp.kind == "rate":
            for frm, to in flows(spec, imp):
                wants.setdefault(to.name, []).append((frm.cluster_ip, to.cluster_ip, imp.value))
    rebuilt = []
    for host, port in sorted(ports.items()):
        if host not in touched and host not in wants:
            continue
        has = _shaped(port)
        if host not in touched and has:
            continue
        if has:
            tc("qdisc", "del", "dev", port, "root")
        for n, (src, dst, rate) in enumerate(wants.get(host, []), start=1):
            if n == 1:
                tc("qdisc", "add", "dev", port, "root", "handle", "1:", "htb")  # default 0: unmatched go direct
            tc("class", "add", "dev", port, "parent", "1:", "classid", f"1:{n}", "htb", "rate", rate, "ceil", rate)
            tc("qdisc", "add", "dev", port, "parent", f"1:{n}", "pfifo", "limit", "1000")  # a veth's queue length is 0
            tc(
                "filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "src", f"{src}/32", "match", "ip", "dst", f"{dst}/32", "flowid", f"1:{n}",
            )  # fmt: skip
        rebuilt.append(host)
    return rebuilt


FIELDS = {"node", "peer", "direction", "block", "loss", "mtu", "rate", "partition", "delay"}


def load(path: Path, spec: LabSpec) -> list[Impairment]:
    """A YAML list of impairments, each checked, errors with file:line:field."""
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
        entry = {k.value: (v.value, v.start_mark.line + 1) for k, v in item.value}
        for key, (_, at) in entry.items():
            if key not in FIELDS:
                raise InputError(f"{path}:{at}: [{n}].{key}: unknown (known: {', '.join(sorted(FIELDS))})")
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            raise InputError(f"{path}:{line}: [{n}]: exactly one of {', '.join(KINDS)} (found {len(kinds)})")
        kind = kinds[0]
        if "node" not in entry:
            raise InputError(f"{path}:{line}: [{n}].node: missing (the host the impairment is on)")
        value = "" if kind == "partition" else str(entry[kind][0])
        imp = Impairment(
            node=str(entry.get("node", ("", line))[0]),
            kind=kind,
            value=value,
            peer=str(entry["peer"][0]) if "peer" in entry else None,
            direction=str(entry.get("direction", ("both", line))[0]),
        )
        check(spec, imp, f"{path}:{entry.get(kind, ('', line))[1]}: [{n}]")
        found.append(imp)
    return found
