"""docker.service does not run (stopped, failed, or not installed)."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class DockerDown(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        state = node.facts.docker_active
        return None if state == "active" else f"docker.service is {state or 'not installed'}"
