"""Its overlay's peer table holds addresses no host serves where it sends them (peers.py):
a container given one of them later would be unreachable from it; only a restart of its
dockerd forgets them.

An entry toward a host that this pass restarts for a reason of its own (``own``, the other
restart reasons) is not judged: that host's containers are not where they will be (after
a power cut, none runs on the overlay until its restart), and the peers step judges every
entry again after the restarts (steps/stale.py). Judged before, it restarted every other
host of a lab whose worker lost its power, for addresses its containers took again (the
heal module, once the test read the entries itself)."""

from __future__ import annotations

from collections.abc import Sequence

from overlaylab import peers
from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen, first, restart_refusal


class StalePeers(Repair):
    def __init__(self, own: Sequence[Repair]) -> None:
        self.own = tuple(own)

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        live = [ctx.nodes[n] for n in ctx.live(ctx.topo.hosts) if n in ctx.nodes]
        found = peers.stale(node, live)
        if not found:
            return None
        targets = set(ctx.targets)  # join-node restarts its worker alone: the others stay as they are
        restarting = {
            n.name
            for n in live
            if n.name in found.values()
            and n.name in targets
            and (why := first(self.own, ctx, n, seen)) is not None
            and restart_refusal(n, why, ctx.opts.allow_restart) is None
        }
        found = {ip: host for ip, host in found.items() if host not in restarting}
        return peers.describe(found) if found else None
