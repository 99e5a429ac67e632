"""HA mode: this pass made the host's own Consul agent again while its dockerd ran on it.
Seen on the lab (the manager's agent removed and made again): its pairs with another host
failed for over 45 s after the run, then healed by themselves."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class StoreMade(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        if node.name not in ctx.ledger.stores_made:
            return None
        return (
            "its store, this host's own Consul agent, was gone and is made again: dockerd lost its registration "
            "and its gossip with it, and takes them back only slowly by itself"
        )
