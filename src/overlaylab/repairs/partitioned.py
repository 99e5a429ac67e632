"""A dockerd cut off from most of the cluster's gossip: it last saw more than half of its
peers fail or leave, and they run, in the cluster, gossip port up. dockerd joins one
neighbour once and does not rejoin by itself; serf's own reconnect comes after 30 s or
more, by chance. A restart joins it again; its peers, each of which misses only it,
need none (in a 3-host cluster whose manager was cut off: the manager alone)."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen


class Partitioned(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        f = node.facts
        if not (f.gossip and f.cluster_store):
            return None
        peers = {
            (ctx.nodes[n].facts.hostname or n): n
            for n in ctx.live(ctx.topo.hosts)
            if n != node.name and n in ctx.nodes and ctx.nodes[n].facts.gossip and ctx.nodes[n].facts.cluster_store
        }
        gone = sorted(peers[h] for h in f.gossip_gone if h in peers)
        if not peers or len(gone) * 2 <= len(peers):
            return None
        return f"its gossip last saw {', '.join(gone)} fail and never joined them again, while they run"
