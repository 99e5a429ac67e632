"""Who runs what, computed once from the inventory: the manager, the workers, the
Consul servers. Steps ask the topology instead of each finding "the manager" again,
so that a cluster with several Consul servers changes this module, not every step."""

from __future__ import annotations

from dataclasses import dataclass

from overlaylab.inventory import Inventory


@dataclass(frozen=True)
class Topology:
    manager: str
    workers: tuple[str, ...]
    consul_servers: tuple[str, ...]  # the manager alone (the tutorial's `-server -bootstrap`), or 3 or 5 hosts
    consul_agents: tuple[str, ...] = ()  # HA mode: every other host runs a client agent

    @classmethod
    def of(cls, inv: Inventory) -> Topology:
        manager = inv.manager.name
        servers = inv.servers
        agents = tuple(h.name for h in inv.hosts if h.name not in servers) if inv.ha else ()
        return cls(manager, tuple(h.name for h in inv.workers), servers, agents)

    @property
    def ha(self) -> bool:
        return len(self.consul_servers) > 1

    def runs_consul(self, name: str) -> bool:
        """A Consul server or (HA) agent runs on the host."""
        return self.consul_role(name) is not None

    @property
    def quorum(self) -> int:
        """The Consul servers that must run for the store to have a leader."""
        return len(self.consul_servers) // 2 + 1

    def consul_role(self, name: str) -> str | None:
        """'server', 'agent', or None: the host runs no Consul."""
        if name in self.consul_servers:
            return "server"
        return "agent" if name in self.consul_agents else None

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.manager, *self.workers)

    def manager_first(self, names: list[str]) -> list[str]:
        """``names`` in inventory order with the manager first."""
        return sorted(names, key=lambda n: (n != self.manager, self.hosts.index(n)))
