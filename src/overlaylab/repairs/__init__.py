"""Every reason a re-run mends a host, listed once. The dockerd step restarts a host for
the first of RESTARTS that answers; `fab status` says, per host, that one and every other
mend's (ALL): the plan and the status cannot disagree. A new repair is one module here
and one line below; its place in RESTARTS is its priority, as the plan says it."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import NOTHING_SEEN, Mend, Repair, Seen, first
from overlaylab.repairs import (
    address_moved,
    anchor_down,
    deaf_sandbox,
    docker_down,
    dropin_changed,
    gossip_down,
    held_back,
    lost_network,
    partitioned,
    restore_failed,
    stale_peers,
    store_differs,
    store_made,
    stray_threads,
    tls_reload,
    unregistered,
    watch_stopped,
)

OWN: tuple[Repair, ...] = (  # a host's own reasons to restart, first first
    dropin_changed.DropinChanged(),
    docker_down.DockerDown(),
    store_differs.StoreDiffers(),
    address_moved.AddressMoved(),
    restore_failed.RestoreFailed(),
    tls_reload.TlsReload(),
    deaf_sandbox.DeafSandbox(),
    stray_threads.StrayThreads(),
    partitioned.Partitioned(),
    store_made.StoreMade(),
    lost_network.LostNetwork(),
)
RESTARTS: tuple[Repair, ...] = (*OWN, stale_peers.StalePeers(OWN))
ALL: tuple[Repair, ...] = (
    *RESTARTS,
    anchor_down.AnchorDown(),
    unregistered.Unregistered(),
    gossip_down.GossipDown(),
    watch_stopped.WatchStopped(),
    held_back.HeldBack(),
)

__all__ = ["ALL", "OWN", "RESTARTS", "Mend", "Repair", "Seen", "first", "found"]


def found(ctx: Context, node: Node, seen: Seen = NOTHING_SEEN) -> list[str]:
    """What a re-run would mend on this host, as `fab status` says it: the first restart
    reason (one restart mends them all, and the plan names that one), then each other mend's."""
    restart = first(RESTARTS, ctx, node, seen)
    others = [why for r in ALL if r.mend is not Mend.RESTART and (why := r.why(ctx, node, seen))]
    return [*([restart] if restart else []), *others]
