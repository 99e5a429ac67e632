"""The peers step (kv, only after a run that stopped and started a container on the network
again: a restart with any there, an anchor made again, a container reconnected): the peers
read again on every host, and a host the run's own changes left with stale peers restarted
too.

Why: a restart of ours stops the host's containers and starts them again, and Docker
20.10's IPAM gives each the first free address, not the one it had (the free ones
include what the other restarts of the run just released). A host that learned the old
address by a lookup holds it under the endpoint ID "dummy", which no leave removes
(overlaylab/peers.py): it now sends an address to a host where no container has it, and
the container that gets that address next is unreachable from it. Seen in CI (HA module,
a worker's dockerd restarted by the fault): the re-run restarted it and another worker,
and three hosts that the run had not touched were left sending two of their old
addresses to them, where no container had those any more. An anchor made again takes the
first free address in the same way, unless it gets its old one back (steps/anchor.py).

Which addresses move cannot be told before the restarts (a lookup's entry looks like any
other in the kernel), so the plan says that the check will be made, and the run makes it:
up to PASSES times, since a restart of this step moves its own containers' addresses in
turn (a host that looked them up since would go stale; in the e2e tests, with no traffic
during the run, one pass was enough). A restart here follows the --allow-restart rule of
every other: without it, a host with users' containers is named and the run exits 1."""

from __future__ import annotations

from overlaylab import gather, peers
from overlaylab.cluster import Node, parallel
from overlaylab.dropins import DropIn
from overlaylab.plan import Action, Context, Maybe, apply_one, fail
from overlaylab.reasons import restart_refusal
from overlaylab.steps import anchor
from overlaylab.steps.dockerd import Dockerd

PASSES = 3


class MendPeers(Dockerd):
    """kv: after the run's restarts, one pass (or up to PASSES) over every host's peers; the
    stale ones restarted, the manager first, then one worker at a time, each anchor made again."""

    name = "peers"

    def __init__(self) -> None:
        super().__init__(reasons=())  # its own plan: a check after the restarts, no list of reasons

    def plan(self, ctx: Context, node: Node) -> Action[DropIn] | None:
        moved = self.moved(ctx)
        if not moved:
            return None
        leaving = self.leaving(ctx, node)
        return Action(
            node.name,
            False,
            f"after the restarts and anchors of this run (on {', '.join(moved)}): read its overlay's peers again, "
            "and restart dockerd if they send an address to a host where no container has it (a container "
            "started again takes the first free address), or to the old address of a host that moved",
            check=True,
            refusal=restart_refusal(node, leaving, ctx.opts.allow_restart) if leaving else None,
        )

    @staticmethod
    def leaving(ctx: Context, node: Node) -> str | None:
        """Known before the run: this host's overlay sends addresses to a host whose cluster
        address moved and which the run restarts for it. After that restart these entries
        point where no host is, so this host's restart is certain: without --allow-restart,
        where users' containers run, the run is refused before it changes anything (else the
        moved host would restart, this one be refused, and a re-run no longer know the old
        address: it is the run's own record, ctx.ledger.gone)."""
        hosts = [ctx.nodes[n] for n in ctx.live(ctx.topo.hosts) if n in ctx.nodes and n != node.name]
        old = {
            m.facts.cluster_advertise.rpartition(":")[0]: m.name
            for m in hosts
            if m.name in ctx.ledger.restarts and m.address_moved()
        }
        found = peers.toward_gone(node, old)
        return peers.describe_gone(found, old) if found else None

    def may(self, ctx: Context, node: Node) -> Maybe | None:
        """Which addresses the run's restarts move is known only once they are done."""
        moved = self.moved(ctx)
        if not moved:
            return None
        rule = "" if ctx.opts.allow_restart else " (where your containers run, without --allow-restart: fail instead)"
        return Maybe(
            f"if, after the restarts and anchors of this run (on {', '.join(moved)}), its overlay sends an address "
            "to a host where no container has it any more (a container started again takes the first free "
            f"address), or to the old address of a host that moved{rule}",
            restart=True,
        )

    @staticmethod
    def moved(ctx: Context) -> list[str]:
        """The hosts whose containers on the network this run stops and starts again (a
        restart with any there, an anchor made again, a container reconnected), and a host
        restarted under a moved address (the others' entries toward its old one). None on a
        fresh bootstrap, or where the restarts held no container and moved no host: then
        every address on the network was given once, after its host's last restart, and none
        can be stale; the entries that were stale before the run are the facts'
        (repairs/stale_peers.py)."""
        return sorted(ctx.ledger.moved)

    def apply_all(self, ctx: Context, actions: list[Action[DropIn]]) -> None:
        if not actions:  # nothing restarted or made: no read at all (a no-op re-run's two commands a host)
            return
        checked = [a.host for a in actions]
        order = [ctx.topo.manager] * (ctx.topo.manager in checked) + [h for h in checked if h != ctx.topo.manager]
        mended: set[str] = set()
        for done in range(PASSES + 1):
            live = [ctx.nodes[n] for n in ctx.live(ctx.topo.hosts)]
            for name, exc in parallel(live, lambda n: gather.read_one(ctx.inv, n)).items():
                fail(ctx, "facts", name, f"reading facts again failed: {type(exc).__name__}: {exc}")
            live = [n for n in live if n.name not in ctx.ledger.failed]
            found = {n.name: why for n in live if n.name in order and (why := self.stale(ctx, n, live))}
            if not found or done == PASSES:
                break
            for host in order:
                if ctx.topo.manager in ctx.ledger.failed:
                    return  # as in the Dockerd step: a manager that failed to come up stops the run
                if host in found and host not in ctx.ledger.failed:
                    self.restart(ctx, ctx.nodes[host], found[host])
                    mended.add(host)
        for host in ctx.live(order):
            if host in found:
                fail(ctx, self.name, host, f"still, after {PASSES} passes of restarts: {found[host]}")
            elif host not in mended:  # a mended host's line is its restart
                ctx.report.record(host, self.name, "ok", "its overlay sends no address to a host where none runs")

    @staticmethod
    def stale(ctx: Context, node: Node, live: list[Node]) -> str | None:
        """Why this host's peers are stale, if they are: addresses sent to a live host where no
        container has them, or to the old address of a host this run restarted after it moved."""
        now = {n.advertise_ip for n in live}  # an old address a live host has now is no longer gone
        left = {old: host for old, host in ctx.ledger.gone.items() if old not in now}
        found, gone = peers.stale(node, live), peers.toward_gone(node, left)
        said = ([peers.describe(found)] if found else []) + ([peers.describe_gone(gone, left)] if gone else [])
        return "; ".join(said) or None

    def restart(self, ctx: Context, node: Node, reason: str) -> None:
        d, _ = self.wanted(ctx, node)
        refusal = restart_refusal(node, reason, ctx.opts.allow_restart)
        if refusal:
            fail(ctx, self.name, node.name, refusal)
            return
        stops = tuple(node.facts.foreign_containers)
        action = Action(node.name, True, f"restart dockerd: {reason}", restart=reason, stops=stops, data=d)
        if apply_one(ctx, self, action) and node.name == ctx.topo.manager:
            self.settle(ctx, node, action)

    def apply(self, ctx: Context, node: Node, action: Action[DropIn]) -> str:
        done = super().apply(ctx, node, action)
        anchor.Anchor().apply(
            ctx, node, Action(node.name, True, "create (dockerd restarted)")
        )  # as in the Dockerd step
        return f"{done}; anchor made again"
