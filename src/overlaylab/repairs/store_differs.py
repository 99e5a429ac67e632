"""dockerd runs with another cluster store than its drop-in says: it read the drop-in at
its start, and a drop-in written since is not in force until it restarts."""

from __future__ import annotations

from overlaylab import dropins, render
from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class StoreDiffers(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        d = dropins.wanted(ctx, node)
        if d is None:
            return None
        want = render.store_url(dropins.store_ip(ctx.inv, ctx.manager.advertise_ip), d[1][1])
        have = node.facts.cluster_store
        return None if have == want else f"dockerd runs with cluster store {have or 'none'}, the drop-in says {want}"
