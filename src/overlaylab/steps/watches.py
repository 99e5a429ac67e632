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
so the plan is a check, and only a watch still stopped gets the event. A dry run says it
as what it is, a change that may come (plan.Maybe), and so for every host when the run
takes the store away: a watch may stop during the run itself. A stack dump that does not
come is unknown, never "none stopped": the step reads again, and fails the host if still
no dump comes."""

from __future__ import annotations

import time

import consul as consul_api
import requests

from overlaylab import facts
from overlaylab.cluster import Node, parallel
from overlaylab.consulapi import consul_client
from overlaylab.errors import OverlaylabError
from overlaylab.plan import Action, Context, Maybe, Scope, Step, fail
from overlaylab.steps.stale import MendPeers

NUDGE_KEY = "docker/nodes/overlaylab-watch-nudge"  # empty: dockerd's discovery skips it
WAIT = 10.0  # seconds for the restarted watches to show in the stacks


def stopped(count: int) -> str:
    return (
        f"{count} store watch(es) of dockerd stopped at a Consul error: it no longer learns the names of "
        "containers started on other hosts"
    )


def said(count: int | None) -> str:
    """What the facts say of the host's watches, as the plan says it."""
    if count is None:
        return f"dockerd wrote no goroutine stack dump within {facts.STACKS_WAIT:.0f} s: its store watches are unknown"
    return stopped(count)


class StoreWatches(Step[None]):
    """kv: every host whose dockerd's store watch stopped; one discovery event for all."""

    name = "watches"
    scope = Scope.ALL

    def plan(self, ctx: Context, node: Node) -> Action[None] | None:
        count = node.facts.dead_watches
        if count != 0:
            return Action(node.name, False, f"{said(count)}: {AGAIN}", check=True)
        if not ctx.dry and ctx.store_interrupted and not MendPeers.moved(ctx):
            # the run took the store away, and no step read this host's stacks since (the peers
            # step reads every host again after a restart or an anchor): read them now
            return Action(node.name, False, "the run made the store unavailable for a while: " + AGAIN, check=True)
        return None

    def may(self, ctx: Context, node: Node) -> Maybe | None:
        """A watch found stopped may be started again by discovery before the step reads it
        again; and one that runs may stop while this run takes the store away (Consul made
        again, a dockerd restarted: its store's first error ends the watch). Neither can be
        foretold from facts read before the run."""
        count = node.facts.dead_watches
        if count is None:
            return Maybe(
                f"if a stack dump comes when read again ({said(count)}) and shows a stopped watch: {EVENT} "
                "(if none comes again, the host fails: whether its watch runs cannot be told)"
            )
        if count:
            return Maybe(f"if it is still so when read again ({said(count)}): {EVENT}")
        if ctx.store_interrupted:
            return Maybe(
                "if its store watch stops at a Consul error while this run makes the store unavailable "
                f"(Consul made again, or a dockerd restarted) and discovery does not start it again: {EVENT}"
            )
        return None

    def apply_all(self, ctx: Context, actions: list[Action[None]]) -> None:
        found = parallel_read(ctx, [a.host for a in actions])
        for host, count in found.items():
            if isinstance(count, str):
                fail(ctx, self.name, host, count)
            elif count is None:
                fail(ctx, self.name, host, UNREADABLE)
            elif count == 0:
                was = ctx.nodes[host].facts.dead_watches
                ctx.nodes[host].facts.dead_watches = 0
                ctx.report.record(host, self.name, "ok", RUNS if was == 0 else f"{RUNS} (started again by discovery)")
        left = {host: count for host, count in found.items() if isinstance(count, int) and count}
        if not left:
            return
        try:
            nudge(ctx)
        except (OverlaylabError, requests.RequestException, consul_api.ConsulException, OSError) as exc:
            for host in left:
                fail(ctx, self.name, host, f"writing the discovery event to Consul failed: {exc}")
            return
        stuck: dict[str, int | str | None] = dict(left)
        deadline = time.monotonic() + WAIT
        while stuck and time.monotonic() < deadline:
            time.sleep(1)
            for host, count in parallel_read(ctx, list(stuck)).items():
                stuck[host] = count
                if count == 0:
                    ctx.nodes[host].facts.dead_watches = 0
                    del stuck[host]
        for host in left:
            now = stuck.get(host, 0)
            if now == 0:
                ctx.report.record(host, self.name, "changed", "its store watch started again (no restart)")
            elif isinstance(now, int):
                fail(ctx, self.name, host, f"still, after a discovery event: {stopped(now)}")
            else:
                fail(ctx, self.name, host, f"after a discovery event: {now or UNREADABLE}")


AGAIN = (
    "read again (discovery starts a watch that stopped while the store was away by itself once the store "
    "answers), and where it still is, one discovery event (an empty key written and removed under "
    "docker/nodes/) starts it again, without a restart"
)
EVENT = "one discovery event (an empty key written and removed under docker/nodes/) starts it again, no restart"
UNREADABLE = (
    f"dockerd wrote no goroutine stack dump within {facts.STACKS_WAIT_STEP:.0f} s (SIGUSR1): "
    "whether its store watch runs cannot be told"
)


RUNS = "its store watch runs"


def parallel_read(ctx: Context, hosts: list[str]) -> dict[str, int | str | None]:
    """Each host's stopped store watches now, all hosts at once: a count, None when no stack
    dump came, or why the host could not be asked (unreachable)."""
    found: dict[str, int | str | None] = {}

    def one(host: str) -> None:
        found[host] = read(ctx.nodes[host])

    for host, exc in parallel(hosts, one, key=str).items():
        found[host] = f"unreachable: {type(exc).__name__}: {exc}"
    return {h: found.get(h) for h in hosts}


def read(node: Node) -> int | None:
    """The host's stopped store watches now: a number, or None when dockerd gave no stack
    dump in time, or the answer is not one (unknown, never taken for "none stopped")."""
    try:
        return facts.parse_dead_watches(node.sh(facts.dead_watches_script(wait=facts.STACKS_WAIT_STEP)))
    except OverlaylabError:
        return None


def nudge(ctx: Context) -> None:
    """The discovery event: the key written, then removed, through the manager's Consul."""
    with consul_client(ctx.inv, ctx.manager) as client:
        client.kv.put(NUDGE_KEY, "")
        client.kv.delete(NUDGE_KEY)
