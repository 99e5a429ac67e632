"""After a power cut, dockerd 20.10's restore of the overlay endpoints that ran fails, and
the error sticks to the network: no container of the host joins the overlay until a
restart (overlaylab's restarts it once without the cluster store first: steps/dockerd.py)."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class RestoreFailed(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        if not node.facts.restore_failed:
            return None
        return (
            "dockerd's overlay restore failed at its start (state left by a power cut): "
            "no container of this host can join the overlay until it restarts"
        )
