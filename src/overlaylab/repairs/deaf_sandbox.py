"""The host's overlay sandbox has no miss watcher: it was made before dockerd's gossip was
up (a restart brought containers back first), so it never looks up a peer it did not see
join (steps/holdback.py)."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen
from overlaylab.steps import holdback


class DeafSandbox(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        if not holdback.deaf(node):
            return None
        return (
            "its overlay sandbox was made before its gossip (a restart brought containers back first), "
            "so it never looks up peers; restarted, those containers started after gossip"
        )
