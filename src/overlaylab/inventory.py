"""The inventory: YAML in, a validated model out, before any host is touched.

Every error names the file, the field and (from the YAML parser's marks) the line,
and is an InputError (exit 2). Duplicate keys, which PyYAML would silently merge,
are errors too: a duplicated host name must not hide a host.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from overlaylab import certs
from overlaylab.errors import InputError
from overlaylab.mode import MODES

# Preflight's floor for free space under Docker's data root: images, the overlay's
# sandboxes and Consul's data live there, and a full disk fails container starts midway.
MIN_FREE_DISK_MB = 1024
MTU_RANGE = (576, 9000)  # network.mtu: IPv4's smallest datagram every host must take, to jumbo frames
# dockerd's discovery defaults (heartbeat 20 s, TTL 60 s) make a daemon wait up to 20 s
# before its gossip starts; 3 s and 20 s took the tutorial's flow from 33 s to 25 s on
# the lab. Under 20 s of TTL, Consul rejects libkv's session and dockerd never registers.
DISCOVERY_HEARTBEAT, DISCOVERY_TTL, MIN_DISCOVERY_TTL = 3, 20, 20
# Consul 1.x scales its raft timeouts by 5 by default: an election takes ~7 s, against ~2 s
# with 1 (Consul's advice for production servers). Consul before 0.7 has no such setting.
RAFT_MULTIPLIER = 1
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*$")
IFACE_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
FLAVORS = {
    # args after the image; {ip} is the manager's cluster address, {port} the HTTP port
    "progrium": ["-server", "-bootstrap", "-bind={ip}", "-advertise={ip}", "-client={ip}", "-http-port={port}"],
    "hashicorp": [
        "agent", "-server", "-bootstrap-expect=1", "-ui", "-bind={ip}", "-advertise={ip}", "-client={ip}",
        "-http-port={port}",
    ],
}  # fmt: skip
FLAVOR_DATA_DIR = {"progrium": "/data", "hashicorp": "/consul/data"}


MANAGER = "manager"  # a host's role; the topology (topology.py) answers who is what


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    role: str
    advertise: str
    user: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class Tls:
    """Mutual TLS, opt in per cluster (issue 12). ``docker_api``: each dockerd also serves
    its API on tcp/2376 to clients of the cluster's CA, as docker-machine's hosts did.
    ``ca_dir``: where the CA lives on the admin's machine (None: certs.default_dir)."""

    docker_api: bool = False
    store: bool = False
    ca_dir: Path | None = None

    @property
    def on(self) -> bool:
        return self.docker_api or self.store


@dataclass(frozen=True)
class Inventory:
    path: Path
    cluster: str
    hosts: tuple[Host, ...]
    ssh_user: str | None = None
    ssh_key: Path | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")
    ssh_port: int | None = None
    consul_image: str = "progrium/consul"
    consul_flavor: str = "progrium"
    consul_port: int = 8500
    consul_name: str = "overlaylab-consul"
    consul_servers: tuple[str, ...] = ()  # host names; () means the manager alone (the tutorial's layout)
    raft_multiplier: int = 1  # Consul's raft timing scale, where its Consul knows it (1.0 and later)
    network: str = "ov_net1"
    subnet: str | None = None
    mtu: int | None = None  # the overlay's MTU (com.docker.network.driver.mtu); None: Docker's default
    mtu_auto: bool = False  # network.mtu: auto: the largest every path carries, measured by the run
    extra_flags: tuple[str, ...] = ()
    discovery: tuple[int, int] = (3, 20)  # dockerd's discovery heartbeat and TTL, seconds
    mode: str = "kv"
    min_free_disk_mb: int = 1024  # free space preflight wants under Docker's data root
    swarm_addr_pool: str | None = None
    tls: Tls = Tls()
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def manager(self) -> Host:
        return next(h for h in self.hosts if h.role == MANAGER)

    @property
    def servers(self) -> tuple[str, ...]:
        """The Consul servers: the manager alone, or the 3 or 5 hosts of HA mode."""
        return self.consul_servers or (self.manager.name,)

    @property
    def ha(self) -> bool:
        """HA mode: several Consul servers, a client agent on every other host, each dockerd
        pointed at its own host's agent (libkv's Consul backend takes one address)."""
        return len(self.servers) > 1

    @property
    def ca_dir(self) -> Path:
        """Where the cluster's CA lives on the admin's machine (certs.py)."""
        return self.tls.ca_dir or certs.default_dir(self.cluster)

    @property
    def consul_volume(self) -> str:
        """Consul's data: the cluster store, which holds the overlay's definition."""
        return f"{self.consul_name}-data"

    @property
    def workers(self) -> list[Host]:
        return [h for h in self.hosts if h.role != MANAGER]

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise InputError(f"{self.path}: no host named {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")


class _Reader:
    """Turns a composed YAML node tree into plain data, keeping a line for every field path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[str, int] = {}

    def fail(self, where: str, message: str) -> InputError:
        line = self.lines.get(where)
        at = f":{line}" if line else ""
        return InputError(f"{self.path}{at}: {where}: {message}" if where else f"{self.path}{at}: {message}")

    def data(self, node: yaml.Node, where: str) -> Any:
        self.lines.setdefault(where, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                sub = f"{where}.{key}" if where else key
                if key in out:
                    self.lines[sub] = key_node.start_mark.line + 1
                    raise self.fail(sub, "duplicate key")
                self.lines[sub] = key_node.start_mark.line + 1
                out[key] = self.data(value_node, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.data(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))


def _mapping(r: _Reader, value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise r.fail(where, f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise r.fail(
            f"{where}.{unknown[0]}" if where else unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})"
        )
    return value


def _typed(r: _Reader, section: dict[str, Any], key: str, where: str, kind: type, default: Any = None) -> Any:
    if key not in section or section[key] is None:
        return default
    value = section[key]
    field_name = f"{where}.{key}" if where else key
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise r.fail(field_name, f"must be an integer, got {type(value).__name__} {value!r}")
    if kind is str and not isinstance(value, str):
        raise r.fail(field_name, f"must be a string, got {type(value).__name__} {value!r}")
    return value


def _port(r: _Reader, value: int | None, where: str) -> int | None:
    if value is not None and not 1 <= value <= 65535:
        raise r.fail(where, f"port {value} is out of range 1-65535")
    return value


def _cidr(r: _Reader, section: dict[str, Any], key: str, where: str) -> str | None:
    value = _typed(r, section, key, where, str)
    if value is None:
        return None
    try:
        return str(ipaddress.ip_network(value))
    except ValueError:
        raise r.fail(f"{where}.{key}", f"{value!r} is not a network in CIDR form (e.g. 10.0.9.0/24)") from None


def _address(r: _Reader, value: str, where: str) -> str:
    """An IP, a DNS name or an ~/.ssh/config alias; anything else is not an address."""
    if re.fullmatch(r"[0-9.]+", value):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise r.fail(where, f"{value!r} is not a valid IPv4 address") from None
        return value
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise r.fail(where, f"{value!r} is not a valid IPv6 address") from None
        return value
    if not HOSTNAME_RE.match(value):
        raise r.fail(where, f"{value!r} is not an IP address, DNS name or ssh alias")
    return value


SERVER_COUNTS = (1, 3, 5)


def _servers(r: _Reader, value: Any, names: list[str], manager: str) -> tuple[str, ...]:
    """consul.servers: a count (the manager, then the next hosts in the file's order) or a
    list of host names. An odd count: Raft needs a majority, and a fourth server adds
    no loss it can survive over three."""
    where = "consul.servers"
    if isinstance(value, bool) or not isinstance(value, int | list | None):
        raise r.fail(where, f"must be a count (1, 3 or 5) or a list of host names, got {value!r}")
    if value is None or value == 1:
        return ()
    if isinstance(value, int):
        if value not in SERVER_COUNTS:
            even = " (an even number: a majority of it survives no more losses than one server fewer)"
            raise r.fail(where, f"{value} must be 1, 3 or 5{even if value % 2 == 0 else ''}")
        if value > len(names):
            raise r.fail(where, f"{value} servers, but the inventory has {len(names)} hosts")
        return (manager, *[n for n in names if n != manager][: value - 1])
    chosen: list[str] = []
    for i, name in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(name, str):
            raise r.fail(at, f"must be a host name, got {name!r}")
        if name not in names:
            raise r.fail(at, f"{name!r} is not a host of this inventory (hosts: {', '.join(names)})")
        if name in chosen:
            raise r.fail(at, f"{name!r} is named twice")
        chosen.append(name)
    if len(chosen) not in SERVER_COUNTS:
        even = " (an even number: a majority of it survives no more losses than one server fewer)"
        raise r.fail(where, f"{len(chosen)} servers: there must be 1, 3 or 5{even if len(chosen) % 2 == 0 else ''}")
    if len(chosen) == 1 and chosen[0] != manager:
        raise r.fail(where, f"one server runs on the manager ({manager}), as in the tutorial: name it, or 3 or 5 hosts")
    return () if len(chosen) == 1 else tuple(chosen)


def _flag(r: _Reader, section: dict[str, Any], key: str, where: str) -> bool:
    value = section.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise r.fail(f"{where}.{key}", f"must be true or false, got {value!r}")
    return value


def _tls(r: _Reader, value: Any, consul_port: int) -> Tls:
    section = _mapping(r, value, "tls", {"docker_api", "store", "ca_dir"})
    store = _flag(r, section, "store", "tls")
    if store and consul_port >= 65535:
        raise r.fail("consul.port", f"{consul_port}: moving the store to HTTPS also uses the next port")
    ca_dir = _typed(r, section, "ca_dir", "tls", str)
    if ca_dir is not None and not ca_dir.strip():
        raise r.fail("tls.ca_dir", "is empty: name a directory, or leave it out for the default")
    where = Path(ca_dir).expanduser() if ca_dir else None
    if where is not None and not where.is_absolute():  # as the file that names it, not the shell, sees it
        where = r.path.parent / where
    return Tls(docker_api=_flag(r, section, "docker_api", "tls"), store=store, ca_dir=where)


def _document(r: _Reader, path: Path) -> dict[str, Any]:
    """The file's top-level mapping, with its line numbers kept for every error."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read inventory: {exc.strerror or exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"{path}{at}: YAML error: {problem}") from None
    if root is None:
        raise InputError(f"{path}: the inventory is empty")
    return _mapping(
        r,
        r.data(root, ""),
        "",
        {"cluster", "mode", "ssh", "consul", "network", "dockerd", "swarm", "hosts", "preflight", "tls"},
    )


def _consul(r: _Reader, consul: dict[str, Any]) -> tuple[str, str, int]:
    """consul.flavor, consul.name, consul.raft_multiplier."""
    flavor = _typed(r, consul, "flavor", "consul", str, "progrium")
    if flavor not in FLAVORS:
        raise r.fail("consul.flavor", f"{flavor!r} is not one of: {', '.join(FLAVORS)}")
    consul_name = _typed(r, consul, "name", "consul", str, "overlaylab-consul")
    if not NODE_NAME_RE.match(consul_name):
        raise r.fail("consul.name", f"{consul_name!r} is not a valid container name")
    raft = _typed(r, consul, "raft_multiplier", "consul", int, RAFT_MULTIPLIER)
    if not 1 <= raft <= 10:
        raise r.fail("consul.raft_multiplier", f"{raft} must be 1 (fastest, Consul's advice for servers) to 10")
    return flavor, consul_name, raft


def _dockerd(r: _Reader, dockerd: dict[str, Any]) -> tuple[list[str], int, int]:
    """dockerd.extra_flags, and the discovery heartbeat and TTL (libkv's bounds)."""
    flags = dockerd.get("extra_flags") or []
    if not isinstance(flags, list) or not all(isinstance(f, str) and f.startswith("-") for f in flags):
        raise r.fail("dockerd.extra_flags", "must be a list of dockerd flags, each starting with '-'")
    if any(f.startswith("--cluster-") for f in flags):
        raise r.fail("dockerd.extra_flags", "--cluster-* flags are written by overlaylab itself; remove them here")
    heartbeat = _typed(r, dockerd, "discovery_heartbeat", "dockerd", int, DISCOVERY_HEARTBEAT)
    ttl = _typed(r, dockerd, "discovery_ttl", "dockerd", int, DISCOVERY_TTL)
    if ttl < MIN_DISCOVERY_TTL:
        raise r.fail(
            "dockerd.discovery_ttl",
            f"{ttl} s is under {MIN_DISCOVERY_TTL} s: Consul refuses the session (libkv asks for half the TTL, "
            "Consul's minimum is 10 s) and dockerd never registers",
        )
    if not 1 <= heartbeat < ttl:
        raise r.fail(
            "dockerd.discovery_heartbeat", f"{heartbeat} s must be at least 1 s and under discovery_ttl ({ttl} s)"
        )
    return flags, heartbeat, ttl


def _host(r: _Reader, name: str, spec: Any, seen_addr: dict[str, str]) -> Host:
    """One entry of hosts: its name, address (unique), role and advertise setting."""
    where = f"hosts.{name}"
    if not NODE_NAME_RE.match(name):
        raise r.fail(where, f"{name!r} is not a valid host name")
    spec = _mapping(r, spec, where, {"address", "role", "advertise", "user", "port"})
    for required in ("address", "role", "advertise"):
        if required not in spec:
            raise r.fail(where, f"missing {required!r}")
    address = _address(r, _typed(r, spec, "address", where, str), f"{where}.address")
    if address in seen_addr:
        raise r.fail(f"{where}.address", f"{address} is also the address of {seen_addr[address]}")
    seen_addr[address] = name
    role = _typed(r, spec, "role", where, str)
    if role not in ("manager", "worker"):
        raise r.fail(f"{where}.role", f"{role!r} must be manager or worker")
    advertise = _typed(r, spec, "advertise", where, str)
    if not IFACE_RE.match(advertise):
        raise r.fail(f"{where}.advertise", f"{advertise!r} is not an interface name or IP address")
    return Host(
        name=name, address=address, role=role, advertise=advertise,
        user=_typed(r, spec, "user", where, str),
        port=_port(r, _typed(r, spec, "port", where, int), f"{where}.port"),
    )  # fmt: skip


def _hosts(r: _Reader, hosts_raw: Any) -> tuple[list[Host], str]:
    """Every host, and the one manager's name."""
    if not isinstance(hosts_raw, dict) or not hosts_raw:
        raise r.fail("hosts", "must be a mapping of host names to {address, role, advertise}")
    seen_addr: dict[str, str] = {}
    hosts = [_host(r, name, spec, seen_addr) for name, spec in hosts_raw.items()]
    managers = [h.name for h in hosts if h.role == MANAGER]
    if not managers:
        raise r.fail("hosts", "no host has role: manager (exactly one is needed)")
    if len(managers) > 1:
        raise r.fail(f"hosts.{managers[1]}.role", f"a second manager ({', '.join(managers)}): exactly one is allowed")
    return hosts, managers[0]


def load(path: str | Path) -> Inventory:
    """The inventory, validated whole before any host is touched: the first error names the
    file, the line and the field (InputError, exit 2)."""
    path = Path(path)
    r = _Reader(path)
    doc = _document(r, path)
    mode = _typed(r, doc, "mode", "", str, "kv")
    if mode not in MODES:
        raise r.fail("mode", f"{mode!r} is not one of: {', '.join(MODES)}")
    pool = _cidr(r, _mapping(r, doc.get("swarm"), "swarm", {"default_addr_pool"}), "default_addr_pool", "swarm")
    cluster = _mapping(r, doc.get("cluster"), "cluster", {"name"})
    ssh = _mapping(r, doc.get("ssh"), "ssh", {"user", "key", "known_hosts", "port"})
    consul = _mapping(r, doc.get("consul"), "consul", {"image", "flavor", "port", "name", "raft_multiplier", "servers"})
    network = _mapping(r, doc.get("network"), "network", {"name", "subnet", "mtu"})
    dockerd = _mapping(r, doc.get("dockerd"), "dockerd", {"extra_flags", "discovery_heartbeat", "discovery_ttl"})
    checks = _mapping(r, doc.get("preflight"), "preflight", {"min_free_disk_mb"})
    min_free = _typed(r, checks, "min_free_disk_mb", "preflight", int, MIN_FREE_DISK_MB)
    if min_free < 0:
        raise r.fail("preflight.min_free_disk_mb", f"{min_free} must be 0 (no check) or more")
    flavor, consul_name, raft = _consul(r, consul)
    net_name = _typed(r, network, "name", "network", str, "ov_net1")
    if not NODE_NAME_RE.match(net_name):
        raise r.fail("network.name", f"{net_name!r} is not a valid network name")
    subnet = _cidr(r, network, "subnet", "network")
    mtu_auto = network.get("mtu") == "auto"
    if isinstance(network.get("mtu"), str) and not mtu_auto:
        raise r.fail(
            "network.mtu", f"must be a number ({MTU_RANGE[0]} to {MTU_RANGE[1]}) or auto, got {network['mtu']!r}"
        )
    mtu = None if mtu_auto else _typed(r, network, "mtu", "network", int)
    if mtu is not None and not MTU_RANGE[0] <= mtu <= MTU_RANGE[1]:
        raise r.fail("network.mtu", f"{mtu} is out of range {MTU_RANGE[0]}-{MTU_RANGE[1]} (bytes; IPv4 needs 576)")
    flags, heartbeat, ttl = _dockerd(r, dockerd)
    hosts, manager = _hosts(r, doc.get("hosts"))
    servers = _servers(r, consul.get("servers"), [h.name for h in hosts], manager)
    key = _typed(r, ssh, "key", "ssh", str)
    return Inventory(
        path=path,
        cluster=str(_typed(r, cluster, "name", "cluster", str, "overlaylab")),
        hosts=tuple(sorted(hosts, key=lambda h: (h.role != MANAGER, h.name))),
        ssh_user=_typed(r, ssh, "user", "ssh", str),
        ssh_key=Path(key).expanduser() if key else None,
        known_hosts=Path(_typed(r, ssh, "known_hosts", "ssh", str, "~/.ssh/known_hosts")).expanduser(),
        ssh_port=_port(r, _typed(r, ssh, "port", "ssh", int), "ssh.port"),
        consul_image=_typed(r, consul, "image", "consul", str, "progrium/consul"),
        consul_flavor=flavor,
        consul_port=int(_port(r, _typed(r, consul, "port", "consul", int, 8500), "consul.port") or 8500),
        consul_name=consul_name,
        consul_servers=servers,
        raft_multiplier=raft,
        network=net_name,
        subnet=subnet,
        mtu=mtu,
        mtu_auto=mtu_auto,
        extra_flags=tuple(flags),
        discovery=(heartbeat, ttl),
        min_free_disk_mb=min_free,
        mode=mode,
        swarm_addr_pool=pool,
        tls=_tls(r, doc.get("tls"), int(_typed(r, consul, "port", "consul", int, 8500) or 8500)),
        lines=dict(r.lines),
    )
