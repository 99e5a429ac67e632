"""The drop-in the inventory renders for this host differs from the one it has."""

from __future__ import annotations

from overlaylab import dropins
from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class DropinChanged(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        d = dropins.wanted(ctx, node)
        return "drop-in changed" if d is not None and d[0].changed else None
