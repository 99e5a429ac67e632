"""The cluster's ports, in one table: what each is for, who holds it in a running cluster,
and on which hosts. The facts read who listens on these numbers, preflight refuses a host
where another program holds one, and the port probe tries them between the hosts: all
three read this table, so that a port added here is read, checked and probed alike."""

from __future__ import annotations

from dataclasses import dataclass

from overlaylab import certs
from overlaylab.inventory import Inventory
from overlaylab.mode import Mode
from overlaylab.topology import Topology

CONSUL_GOSSIP = 8301  # Consul's LAN gossip, between HA mode's agents
LOOPBACK = "127.0.0.1"  # HA mode: where each dockerd finds its own host's agent
DOCKERD = "dockerd"
CONSUL = "consul"
KERNEL = ""  # a VXLAN device's UDP socket has no process


@dataclass(frozen=True)
class Port:
    proto: str  # tcp | udp
    number: int
    purpose: str  # the probe's and verify's word for it: "VXLAN data"
    owner: str  # who holds it in a running cluster: dockerd, consul, or the kernel ("")
    wording: str  # what preflight says needs it: "dockerd's gossip"
    manager_only: bool = False  # served by the manager alone; else by every host it concerns
    probed: bool = True  # tried between the hosts by the port probe (checks/probe.py)

    @property
    def label(self) -> str:
        return f"{self.proto}/{self.number} ({self.purpose})"


def cluster_ports(inv: Inventory, mode: str, moving: bool = False) -> list[Port]:
    """The ports a cluster of this inventory binds in this mode. ``moving``: round 1 of the
    store's move between HTTP and HTTPS (storetls.py), when Consul serves a second port."""
    found = [
        Port("udp", 4789, "VXLAN data", KERNEL, "VXLAN data"),
        Port("tcp", 7946, "gossip", DOCKERD, "dockerd's gossip"),
        Port("udp", 7946, "gossip", DOCKERD, "dockerd's gossip"),
    ]
    if mode == Mode.SWARM:
        return [*found, Port("tcp", 2377, "swarm control", DOCKERD, "swarm control", manager_only=True)]
    ha = Topology.of(inv).ha
    single = not ha  # one Consul, on the manager; HA: an agent on every host
    found.append(Port("tcp", inv.consul_port, "Consul", CONSUL, "Consul (consul.port)", manager_only=single))
    if moving:
        second = "Consul's second port while the store moves between HTTP and HTTPS"
        found.append(Port("tcp", inv.consul_port + 1, "Consul", CONSUL, second, manager_only=single, probed=False))
    if ha:
        found += [
            Port("tcp", CONSUL_GOSSIP, "Consul gossip", CONSUL, "Consul's gossip"),
            Port("udp", CONSUL_GOSSIP, "Consul gossip", CONSUL, "Consul's gossip"),
        ]
    return found


def on_host(table: list[Port], manager: bool) -> list[Port]:
    """The ports of the table that a host serves: the manager, all; another, those not the manager's alone."""
    return [p for p in table if manager or not p.manager_only]


def watched(inv: Inventory) -> tuple[int, ...]:
    """Every number whose listener the facts read, whatever the mode (the mode may change in a
    run), the store's second port of a move, and the Docker API's when it is served."""
    numbers = {p.number for mode in (Mode.KV, Mode.SWARM) for p in cluster_ports(inv, mode, moving=True)}
    numbers |= {CONSUL_GOSSIP} if Topology.of(inv).ha else set()
    numbers |= {certs.API_PORT} if inv.tls.docker_api else set()
    return tuple(sorted(numbers))
