"""The store-watch step (kv): a dockerd whose watch of the store stopped is made to watch
again, by one discovery event, without a restart.

Why: libnetwork learns the other hosts' containers on the overlay (their names, for the
embedded DNS) from a watch of the network's endpoints in Consul. At the first error
Consul answers it (a server restarting: "EOF", then "No cluster leader") that watch
stops, and waits for libnetwork's RestartWatch, which only a delivery of dockerd's
discovery watch (docker/nodes/) calls. Consul 1.8 leaves those keys unchanged on the
daemons' heartbeats (measured on the lab: their ModifyIndex stays put), so where the
discovery watch itself did not fail, no delivery comes: the host pings every address
but never resolves a container started after that moment (seen in CI: HA mode, the
manager's dockerd restarted by a re-run, one worker's fresh names unresolvable for
minutes). An empty key written and removed under docker/nodes/ is such a delivery on
every dockerd at once; dockerd's discovery skips an empty address (discovery.
CreateEntries), so no host joins or leaves. Made for real on the lab: the watch's
connection to the agent cut while new ones were refused; the host's fresh names
unresolvable for minutes; one such event, and they resolve.

Which hosts need it is read from dockerd's own goroutine stacks (facts.dead_watches),
before the run and again after its restarts (steps/stale.py reads the facts again), and
once more at this step: a watch that stopped while the store was away (Consul removed,
restarted: discovery fails too) is started again by discovery once the store is back,
so the plan is a check, and only a watch still stopped gets the event."""

from __future__ import annotations

import time

import consul as consul_api
import requests

from overlaylab import facts
from overlaylab.cluster import Node, consul_client
from overlaylab.errors import OverlaylabError
from overlaylab.plan import Action, Context, Scope, Step, fail

NUDGE_KEY = "docker/nodes/overlaylab-watch-nudge"  # empty: dockerd's discovery skips it
WAIT = 10.0  # seconds for the restarted watches to show in the stacks


def stopped(count: int) -> str:
    return (
        f"{count} store watch(es) of dockerd stopped at a Consul error: it no longer learns the names of "
        "containers started on other hosts"
    )


class StoreWatches(Step):
    """kv: every host whose dockerd's store watch stopped; one discovery event for all."""

    name = "watches"
    scope = Scope.ALL

    def plan(self, ctx: Context, node: Node) -> Action | None:
        count = node.facts.dead_watches
        if not count:
            return None
        return Action(
            node.name,
            False,
            f"{stopped(count)} (or while the store was away, and discovery then starts it again): read again, "
            "and where it still is, one discovery event (an empty key written and removed under docker/nodes/) "
            "starts it again, without a restart",
            check=True,
        )

    def apply_all(self, ctx: Context, actions: list[Action]) -> None:
        left = {a.host: count for a in actions if (count := read(ctx.nodes[a.host]))}
        for action in actions:
            if action.host not in left:
                ctx.nodes[action.host].facts.dead_watches = 0
                ctx.report.record(action.host, self.name, "ok", "its store watch runs (started again by discovery)")
        if not left:
            return
        try:
            nudge(ctx)
        except (OverlaylabError, requests.RequestException, consul_api.ConsulException, OSError) as exc:
            for host in left:
                fail(ctx, self.name, host, f"writing the discovery event to Consul failed: {exc}")
            return
        stuck = dict(left)
        deadline = time.monotonic() + WAIT
        while stuck and time.monotonic() < deadline:
            time.sleep(1)
            for host in list(stuck):
                stuck[host] = read(ctx.nodes[host])
                if not stuck[host]:
                    ctx.nodes[host].facts.dead_watches = 0
                    del stuck[host]
        for host in left:
            if host in stuck:
                fail(ctx, self.name, host, f"still, after a discovery event: {stopped(stuck[host])}")
            else:
                ctx.report.record(host, self.name, "changed", "its store watch started again (no restart)")


def read(node: Node) -> int:
    """The host's stopped store watches now (an unreadable answer counts as still stopped)."""
    try:
        return int(node.sh(facts.dead_watches_script()).strip() or 0)
    except (OverlaylabError, ValueError):
        return node.facts.dead_watches


def nudge(ctx: Context) -> None:
    """The discovery event: the key written, then removed, through the manager's Consul."""
    with consul_client(ctx.inv, ctx.manager) as client:
        client.kv.put(NUDGE_KEY, "")
        client.kv.delete(NUDGE_KEY)
