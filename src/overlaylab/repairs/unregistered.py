"""dockerd is not registered in the store (docker/nodes/): the other hosts' discovery does
not see it, and its gossip joins no one; a re-run waits for its registration."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Mend, Repair, Seen


class Unregistered(Repair):
    mend = Mend.STEP

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        if seen.registered is None or node.facts.docker_active != "active":
            return None
        return None if f"{node.advertise_ip}:2376" in seen.registered else "dockerd not registered in Consul"
