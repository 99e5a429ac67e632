"""dockerd threads left in a deleted network namespace (Docker 20.10's overlay defect,
steps/anchor.py): Consul's watch and gossip running on them fail, until a restart."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class StrayThreads(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        count = node.facts.stray_threads
        if not count:
            return None
        return (
            f"dockerd has {count} thread(s) left in a deleted network namespace (Docker 20.10 overlay "
            "defect, see steps/anchor.py): restarted to clear them"
        )
