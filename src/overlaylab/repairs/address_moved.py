"""dockerd resolves --cluster-advertise once, at its start: after the interface's address
changed (DHCP), it goes on registering and gossiping with the old one until it restarts."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class AddressMoved(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        return node.address_moved()
