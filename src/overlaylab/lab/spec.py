"""What a lab should look like: names, addresses and engines, derived from a few options.

Pure data, no I/O: the rest of the lab code compares this wanted state with what
the outer engine reports, so that lab-up only changes what differs.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

ENGINES = ("legacy", "modern")
ENGINE_SUITE = {"legacy": "bullseye", "modern": "trixie"}
DEFAULT_COUNT = 3
MAX_HOSTS = 50
DEFAULT_RANGE = "10.210.0.0/16"
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")


@dataclass(frozen=True)
class HostSpec:
    """One lab host: its name, engine and the two addresses the tutorial's VMs have."""

    index: int
    name: str
    engine: str
    mgmt_ip: str
    cluster_ip: str

    @property
    def role(self) -> str:
        return "manager" if self.index == 1 else "worker"


@dataclass(frozen=True)
class LabSpec:
    """A whole lab. The address plan lives here so every consumer agrees on it."""

    name: str
    hosts: tuple[HostSpec, ...]
    addr_range: ipaddress.IPv4Network = field(default=ipaddress.IPv4Network(DEFAULT_RANGE))

    def _sub24(self, n: int) -> ipaddress.IPv4Network:
        return list(self.addr_range.subnets(new_prefix=24))[n]

    @property
    def mgmt_net(self) -> ipaddress.IPv4Network:
        return self._sub24(0)

    @property
    def cluster_net(self) -> ipaddress.IPv4Network:
        return self._sub24(1)

    @property
    def inner_bip(self) -> str:
        """Inner engines' docker0; hosts have separate namespaces, so one value serves all."""
        net = self._sub24(2)
        return f"{net.network_address + 1}/{net.prefixlen}"

    @property
    def overlay_subnet(self) -> str:
        """The subnet the lab's inventory asks for the overlay network."""
        return str(self._sub24(9))

    @property
    def swarm_pool(self) -> str:
        """Swarm's default address pool (ingress and overlays without a subnet), inside the range."""
        return str(list(self.addr_range.subnets(new_prefix=18))[1])

    @property
    def inner_pool(self) -> str:
        """Inner engines' default-address-pools base (docker_gwbridge, user bridges)."""
        return str(list(self.addr_range.subnets(new_prefix=17))[1])

    @property
    def bridge_mgmt(self) -> str:
        return f"olab-{self.name}-m"

    @property
    def bridge_cluster(self) -> str:
        return f"olab-{self.name}-c"

    @property
    def network_mgmt(self) -> str:
        return f"olab-{self.name}-mgmt"

    @property
    def network_cluster(self) -> str:
        return f"olab-{self.name}-cluster"

    def container(self, host: HostSpec) -> str:
        return f"olab-{self.name}-{host.name}"

    def volume(self, host: HostSpec) -> str:
        return f"olab-{self.name}-{host.name}-docker"

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


def host_name(index: int) -> str:
    """Tutorial-style names: bm-docker-01 is the manager."""
    return f"bm-docker-{index:02d}"


def parse_engines(engine: str | None, count: int | None, existing: dict[str, str]) -> list[str]:
    """Resolve --engine/--count into one engine per host.

    ``existing`` maps the names of hosts already in the lab to their engines: with
    no --engine, they keep theirs (a plain re-run must not replace a mixed lab) and
    new hosts get the legacy engine.
    """
    from overlaylab.errors import InputError

    wanted: list[str] | None = None
    if engine is not None:
        wanted = [part.strip() for part in engine.split(",")]
        bad = [part for part in wanted if part not in ENGINES]
        if bad:
            raise InputError(
                f"--engine: unknown engine {bad[0]!r}; choose from {', '.join(ENGINES)} "
                "(one for all hosts, or a comma-separated list, one per host)"
            )
    if count is None:
        count = len(wanted) if wanted is not None and len(wanted) > 1 else len(existing) or DEFAULT_COUNT
    if not 1 <= count <= MAX_HOSTS:
        raise InputError(f"--count: must be between 1 and {MAX_HOSTS}, got {count}")
    if wanted is None:
        return [existing.get(host_name(i), "legacy") for i in range(1, count + 1)]
    if len(wanted) == 1:
        return wanted * count
    if len(wanted) != count:
        raise InputError(
            f"--engine lists {len(wanted)} engines but --count is {count}: give one engine, or one per host"
        )
    return wanted


def build_spec(
    name: str,
    engine: str | None = None,
    count: int | None = None,
    existing: dict[str, str] | None = None,
    addr_range: str = DEFAULT_RANGE,
) -> LabSpec:
    """The wanted lab for these options, given the hosts that already exist."""
    from overlaylab.errors import InputError

    if not LAB_NAME_RE.match(name):
        raise InputError(
            f"--name: {name!r} must be 1-8 lowercase letters or digits, starting with a letter "
            "(it becomes part of Linux bridge names, which are limited to 15 characters)"
        )
    try:
        net = ipaddress.IPv4Network(addr_range)
    except ValueError as exc:
        raise InputError(f"--range: {addr_range!r} is not an IPv4 network: {exc}") from None
    if net.prefixlen != 16 or not net.is_private:
        raise InputError(f"--range: {addr_range} must be a private /16 (the lab plans its /24s inside it)")
    engines = parse_engines(engine, count, existing or {})
    mgmt = next(iter(net.subnets(new_prefix=24)))
    cluster = list(net.subnets(new_prefix=24))[1]
    hosts = tuple(
        HostSpec(
            index=i,
            name=host_name(i),
            engine=eng,
            mgmt_ip=str(mgmt.network_address + 10 + i),
            cluster_ip=str(cluster.network_address + 10 + i),
        )
        for i, eng in enumerate(engines, start=1)
    )
    return LabSpec(name=name, hosts=hosts, addr_range=net)
