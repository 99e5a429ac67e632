"""Teardown's first step: verify's probes (checks/verify.py), should a run have left one
(a run cut off between starting and removing them), are removed from every host."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Action, Context, Scope, Step


class RemoveProbes(Step[list[str]]):
    """Teardown: probes a run left behind (verify removes its own, also on failure)."""

    name = "probes"
    scope = Scope.ALL

    def plan(self, ctx: Context, node: Node) -> Action[list[str]] | None:
        f = node.facts
        ours = sorted(n for n, role in {**f.containers, **f.stopped}.items() if role == "probe")
        return Action(node.name, True, f"remove {', '.join(ours)}", data=ours) if ours else None

    def apply(self, ctx: Context, node: Node, action: Action[list[str]]) -> str:
        node.sh("docker rm -f " + " ".join(action.payload()) + " >/dev/null")
        return f"removed {', '.join(action.payload())}"
