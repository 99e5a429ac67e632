"""The store lost the network (Consul's data), and this dockerd still holds it in memory:
the new one cannot be made until it restarts (steps/network.py)."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen
from overlaylab.steps import network


class LostNetwork(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        return network.holds_lost(ctx, node) if ctx.topo.manager in ctx.nodes else None
