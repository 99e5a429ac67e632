"""dockerd runs, and its gossip port (tcp/7946) does not listen: a re-run waits for it."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Mend, Repair, Seen


class GossipDown(Repair):
    mend = Mend.STEP

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        f = node.facts
        return "gossip port 7946 not listening" if f.docker_active == "active" and not f.gossip else None
