"""The network exists, and this host's anchor does not run (steps/anchor.py): a re-run
makes it again."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Mend, Repair, Seen
from overlaylab.steps import anchor


class AnchorDown(Repair):
    mend = Mend.STEP

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        reader = ctx.nodes.get(ctx.topo.manager) or next(iter(ctx.nodes.values()))
        if node.facts.docker_active != "active" or reader.facts.network is None or anchor.present(node):
            return None
        return "its anchor is not running"
