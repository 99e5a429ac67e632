"""Every dockerd registered in Consul under docker/nodes/: a check, not a change (dockerd
registers itself once its cluster store answers). A host that does not register within
the wait is failed and takes no further step: it would not find its peers."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Action, Context, Scope, Step, fail
from overlaylab.steps import consul


class Registered(Step[None]):
    """The registrations, read through the Consul forward, all at once."""

    name = "registered"
    scope = Scope.ALL

    def plan(self, ctx: Context, node: Node) -> Action[None]:
        return Action(node.name, False, f"docker/nodes/{node.advertise_ip}:2376", check=True)

    def apply_all(self, ctx: Context, actions: list[Action[None]]) -> None:
        wanted = {a.host: ctx.nodes[a.host].advertise_ip for a in actions}
        try:
            registered = consul.wait_registered(ctx.inv, ctx.manager, wanted)
        except Exception as exc:
            registered = {}
            ctx.report.note(f"reading docker/nodes/ from Consul failed: {exc}")
        for action in actions:
            if registered.get(action.host):
                ctx.report.record(action.host, self.name, "ok", action.detail)
            else:
                fail(ctx, self.name, action.host, f"no {action.detail} in Consul")
