"""A run stopped while it held this host's containers back over a restart of its own: they
are stopped, their restart policies set aside in a record (steps/holdback.py). A re-run's
held step starts them and puts their policies back, without a restart."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Mend, Repair, Seen


class HeldBack(Repair):
    mend = Mend.STEP

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        held = sorted(node.facts.held)
        if not held:
            return None
        return f"{', '.join(held)} held back by a run that stopped: not running, restart policies set aside"
