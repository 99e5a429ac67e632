"""A dockerd store watch stopped at a Consul error (steps/watches.py): the host no longer
learns the names of containers started on other hosts; one discovery event starts it
again, without a restart."""

from __future__ import annotations

from overlaylab import facts
from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.repairs.base import Mend, Repair, Seen


class WatchStopped(Repair):
    mend = Mend.WATCH

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        count = node.facts.dead_watches
        if node.facts.docker_active != "active" or count == 0:
            return None
        return said(count)


def stopped(count: int) -> str:
    return (
        f"{count} store watch(es) of dockerd stopped at a Consul error: it no longer learns the names of "
        "containers started on other hosts"
    )


def said(count: int | None) -> str:
    """What the facts say of the host's watches, as the plan says it."""
    if count is None:
        return f"dockerd wrote no goroutine stack dump within {facts.STACKS_WAIT:.0f} s: its store watches are unknown"
    return stopped(count)
