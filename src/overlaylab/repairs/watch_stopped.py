"""A dockerd store watch stopped at a Consul error (steps/watches.py): the host no longer
learns the names of containers started on other hosts; one discovery event starts it
again, without a restart."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Mend, Repair, Seen
from overlaylab.steps.watches import said


class WatchStopped(Repair):
    mend = Mend.STEP

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        count = node.facts.dead_watches
        if node.facts.docker_active != "active" or count == 0:
            return None
        return said(count)
