"""Step 2: leave any swarm (the cluster store cannot coexist with swarm mode)."""

from __future__ import annotations

from overlaylab.cluster import Node


def refusal(node: Node, force: bool) -> str | None:
    """A manager with services is not left silently: what would be lost, unless forced."""
    f = node.facts
    if f.swarm_state != "inactive" and f.swarm_manager and f.services and not force:
        return (
            f"manages a swarm with {f.services} service(s); leaving would remove them from this node's control: "
            "pass --force-leave-swarm to leave anyway"
        )
    return None


def needed(node: Node) -> bool:
    return node.facts.swarm_state not in ("inactive", "")


def leave(node: Node) -> str:
    flag = " --force" if node.facts.swarm_manager else ""
    node.sh(f"docker swarm leave{flag}")
    return f"left the swarm (was {node.facts.swarm_state}{', manager' if flag else ''})"
