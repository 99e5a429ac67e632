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
    consul_servers: tuple[str, ...]  # today the manager alone: the tutorial's `-server -bootstrap`

    @classmethod
    def of(cls, inv: Inventory) -> Topology:
        manager = inv.manager.name
        return cls(manager, tuple(h.name for h in inv.workers), (manager,))

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.manager, *self.workers)

    def manager_first(self, names: list[str]) -> list[str]:
        """``names`` in inventory order with the manager first."""
        return sorted(names, key=lambda n: (n != self.manager, self.hosts.index(n)))
