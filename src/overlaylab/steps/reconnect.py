"""After Consul's data was lost: the user's containers on the lost network, connected to
the network made again by the same name."""

from __future__ import annotations

import shlex

from overlaylab.cluster import Node
from overlaylab.facts import Attachment
from overlaylab.plan import Action, Context, Scope, Step
from overlaylab.steps import network


class Reconnect(Step[tuple[dict[str, Attachment], list[str]]]):
    """The user's containers on a network the store lost, connected to the one made again
    by the same name: their aliases and fixed addresses kept, those that ran (or failed to
    start for want of it) started. Without this they never start again: dockerd looks up
    the lost network's ID. Nothing is removed: the old endpoint is gone with the store."""

    name = "reconnect"
    scope = Scope.ALL

    def plan(self, ctx: Context, node: Node) -> Action[tuple[dict[str, Attachment], list[str]]] | None:
        gone = set(network.lost(ctx))
        attached = sorted(node.facts.attached.items())
        mine = {c: a for c, a in attached if a.network_id in gone and not network.ours(node, c)}
        if not mine:
            return None
        start = [c for c, a in mine.items() if a.running or a.failed_on(a.network_id)]
        ids = ", ".join(sorted({a.network_id[:12] for a in mine.values()}))
        then = f", then start {', '.join(start)}" if start else ""
        why = f"reconnect {', '.join(mine)} to {ctx.inv.network} (on the lost {ids}){then}"
        ctx.ledger.moved.add(node.name)  # the peers step reads again after them
        return Action(node.name, True, why, data=(mine, start))

    def apply(self, ctx: Context, node: Node, action: Action[tuple[dict[str, Attachment], list[str]]]) -> str:
        mine, start = action.payload()
        net = shlex.quote(ctx.inv.network)
        commands = []
        for name, a in mine.items():
            flags = "".join(f" --alias {shlex.quote(alias)}" for alias in a.aliases)
            flags += f" --ip {shlex.quote(a.ip)}" if a.ip else ""
            c = shlex.quote(name)
            commands.append(f"docker network disconnect -f {net} {c} && docker network connect{flags} {net} {c}")
        commands += [f"docker start {shlex.quote(name)} >/dev/null" for name in start]
        node.sh(" && ".join(commands))
        then = f"; started {', '.join(start)}" if start else ""
        return f"reconnected {', '.join(mine)} to {ctx.inv.network}{then}"
