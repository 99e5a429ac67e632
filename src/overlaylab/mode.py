"""Which overlay backend a cluster uses: the tutorial's Consul cluster store (kv), or
swarm mode, the only one Docker 23.0 and newer have. `auto` decides from the engines."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.steps import preflight


def resolve(wanted: str, nodes: list[Node]) -> tuple[str, str]:
    """(mode, why). auto: kv when every engine has a Consul cluster store, else swarm."""
    if wanted != "auto":
        return wanted, f"mode: {wanted} (inventory)"
    lacking = [f"{n.name} ({n.facts.version or '?'})" for n in nodes if preflight.engine_problem(n)]
    if lacking:
        return "swarm", "mode: auto picked swarm: no Consul cluster store on " + ", ".join(lacking)
    return "kv", "mode: auto picked kv: every engine has a Consul cluster store"
