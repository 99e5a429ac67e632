"""Steps 4 and 5: the 10-machine.conf drop-in, and a restart only where it changed.

The previous drop-in is kept in memory for this run's rollback, and the original
one (before overlaylab first touched the host, or the fact that there was none) is
kept on the host and never overwritten, for teardown.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from overlaylab import dropins, render
from overlaylab.cluster import Node, journal, write_file_command
from overlaylab.dropins import DropIn
from overlaylab.errors import OverlaylabError
from overlaylab.facts import (
    BACKUP,
    BACKUP_ABSENT,
    BACKUP_DIR,
    DROPIN,
    GOSSIP_EVENTS_SCRIPT,
    HostFacts,
    gossip_last,
)
from overlaylab.inventory import Inventory
from overlaylab.plan import Action, Context, Order, Scope, Step, fail
from overlaylab.reasons import Repair, first, restart_refusal
from overlaylab.steps import anchor, consul, holdback, tls
from overlaylab.storetls import Listener

READY_TIMEOUT = 60  # dockerd answering, cluster store in docker info, gossip listening


def _backup_command() -> str:
    """Keep the original file once; never overwrite an existing backup."""
    return (
        f"mkdir -p {BACKUP_DIR} && if [ ! -e {BACKUP} ] && [ ! -e {BACKUP_ABSENT} ]; then "
        f"if [ -e {DROPIN} ]; then cp -p {DROPIN} {BACKUP}; else : > {BACKUP_ABSENT}; fi; fi"
    )


JOIN_FAILED = "Failed to join the cluster"


def _ready_command(timeout: int, expect_peers: bool = False, store: bool = True) -> str:
    """Waits until dockerd answers with a cluster store and its gossip port listens
    (without ``store``, swarm mode's drop-in: until it answers).

    With ``expect_peers`` (peers are known to be up), a gossip join that failed since
    the restart (dockerd joins through one neighbor and never retries: the node stays
    in a cluster of its own while its port listens) is reported as `join-failed`.
    """
    check_join = (
        f'if journalctl -u docker.service --since "@$start" -o cat 2>/dev/null | grep -q "{JOIN_FAILED}"; '
        "then echo join-failed; exit 3; fi; "
        if expect_peers
        else ""
    )
    ready = "[ -n \"$store\" ] && ss -Hltn 'sport = :7946' | grep -q ." if store else '[ -n "$store" ]'
    field = "{{.ClusterStore}}" if store else "{{.ID}}"
    return (
        f"end=$(( $(date +%s) + {timeout} )); "
        "while [ $(date +%s) -lt $end ]; do "
        f"store=$(timeout 5 docker info --format '{field}' 2>/dev/null); "
        f"if {ready}; then "
        f"{check_join}echo ready; exit 0; fi; "
        "sleep 0.5; done; echo not-ready; exit 1"
    )


def _restart_command(expect_peers: bool, store: bool = True) -> str:
    """reset-failed first: docker.service allows 3 starts in 60 s (StartLimitBurst), and a
    restart of ours right after others (a user's, a fault's) would be refused by systemd."""
    return (
        "start=$(date +%s); systemctl reset-failed docker.service 2>/dev/null; "
        f"systemctl restart docker.service && {_ready_command(READY_TIMEOUT, expect_peers, store)}"
    )


def _restore_command(previous: str | None) -> str:
    put_back = write_file_command(DROPIN, previous) if previous is not None else f"rm -f {DROPIN}"
    return (
        f"{put_back} && systemctl daemon-reload && systemctl reset-failed docker.service; "
        "systemctl restart docker.service; systemctl is-active docker.service"
    )


def write_and_restart(
    p: DropIn,
    before_restart: str = "true",
    expect_peers: bool = False,
    between: Callable[[], None] | None = None,
    store: bool = True,
) -> str:
    """Write, reload, restart, wait; on failure roll back and raise with the journal.
    ``between`` runs on the laptop after ``before_restart`` and before the restart;
    ``store``: the drop-in gives dockerd a cluster store (kv), whose readiness is waited for."""
    node = p.node
    node.sh(  # braces: a `;` inside before_restart must not let it run after a failed backup or write
        f"{_backup_command()} && {write_file_command(DROPIN, p.wanted or '')} && systemctl daemon-reload && "
        f"{{ {before_restart}; }}"
    )
    if between is not None:
        with contextlib.suppress(Exception):  # the restart goes ahead: never leave the host without dockerd
            between()
    code, out, err = node.result(_restart_command(expect_peers, store))
    if code == 0:
        return "drop-in written, dockerd restarted"
    if "join-failed" in out:  # a transient gossip join failure: one more restart
        code, out, err = node.result(_restart_command(expect_peers))
        if code == 0:
            return "drop-in written, dockerd restarted (twice: its first gossip join failed)"
    lines = journal(node)
    restore = _restore_command(p.current)
    if render.is_ours(p.current):  # the previous state was in the cluster: wait until it is again
        restore += f" && {_ready_command(READY_TIMEOUT, store=render.store_ip(p.current) is not None)}"
    restored = node.result(restore)
    active = "active" in restored[1].split()
    raise OverlaylabError(
        f"dockerd did not come up with the new drop-in ({(err or out).strip()[-200:] or 'not ready'}); "
        + ("rolled back to the previous drop-in, dockerd runs again" if active else "ROLLBACK FAILED: dockerd is down")
        + "\n    journal:\n    "
        + "\n    ".join(lines.splitlines())
    )


def wait_rejoined(ctx: Context, node: Node, timeout: float = 90) -> None:
    """After a restart under a new address: until every peer's gossip has taken the host in
    under it. The peers still hold its name under the old address (dead, not yet reaped),
    so they refuse the new one as a name conflict until a push-pull sync (every 30 s)
    brings its newer state; until then no peer reaches its containers (measured: 30 s)."""
    peers = [ctx.nodes[n] for n in ctx.live(ctx.topo.hosts) if n != node.name]
    hostname, ip = node.facts.hostname or node.name, node.advertise_ip
    deadline = time.monotonic() + timeout
    while peers:
        peers = [
            p
            for p in peers
            if gossip_last(p.sh(GOSSIP_EVENTS_SCRIPT, check=False)).get(hostname) != ("EventMemberJoin:", ip)
        ]
        if not peers:
            return
        if time.monotonic() > deadline:
            late = ", ".join(p.name for p in peers)
            raise OverlaylabError(f"restarted as {ip}; the gossip of {late} has not taken it in after {timeout:.0f}s")
        time.sleep(1)


def clearing_restart(inv: Inventory, node: Node, d: DropIn) -> str:
    """One start of dockerd without the cluster flags, then the wanted drop-in back in place.

    Docker 20.10's overlay driver restores, at start, the endpoints its local store lists,
    and drops each one whose network it cannot read from the cluster store. After a power
    cut the store still lists the endpoints of the containers that ran, while their
    namespaces went with /run: the restore fails, and the error sticks to the network
    for the daemon's life, so each restart fails the same way and no container of the
    host joins the overlay. Started once with no cluster store, the driver finds no
    network for those records and deletes them (measured on the lab; user containers are
    not touched: those on the overlay start at the next restart, by their restart policy).
    """
    base = render.base_command(node.facts.exec_start, node.facts.dropin)
    without = render.render(inv.cluster, base, base, BACKUP_DIR)
    # `;` after the restart: the wanted drop-in goes back even if that start failed, and the
    # restart that follows (with its rollback) decides; the host is never left on this one.
    return (
        f"{write_file_command(DROPIN, without)} && systemctl daemon-reload && systemctl restart docker.service; "
        f"{write_file_command(DROPIN, d.wanted or '')} && systemctl daemon-reload"
    )


def has_backup(node: Node) -> bool:
    """overlaylab wrote its drop-in here once: the original (or the fact there was none) is kept."""
    return Path(BACKUP).name in node.facts.backup or Path(BACKUP_ABSENT).name in node.facts.backup


def wait_ready(node: Node) -> None:
    code, out, _ = node.result(_ready_command(READY_TIMEOUT))
    if code != 0:
        raise OverlaylabError(f"dockerd has no cluster store or gossip after {READY_TIMEOUT}s: {out.strip()}")


def restore_original(node: Node) -> str:
    """Put the original drop-in (or none) back and restart dockerd."""
    original = Path(BACKUP).name in node.facts.backup
    put_back = f"cp -p {BACKUP} {DROPIN}" if original else f"rm -f {DROPIN}"
    code, out, err = node.result(
        f"{put_back} && systemctl daemon-reload && systemctl reset-failed docker.service; "
        f"systemctl restart docker.service && rm -f {BACKUP} {BACKUP_ABSENT} && systemctl is-active docker.service"
    )
    if code != 0:
        raise OverlaylabError(f"restoring the original drop-in failed: {(err or out).strip()[-300:]}\n{journal(node)}")
    return "original drop-in restored" if original else "drop-in removed (there was none before)"


def restart_held_late(ctx: Context, node: Node) -> str:
    """A restart that held nothing back (the facts listed no container that comes back),
    after which the sandbox still has no miss watcher: containers came back before gossip
    all the same. One more restart, with them held back this time (a second run would
    otherwise be needed)."""
    held = holdback.parse_came_back(node.sh(holdback.came_back_deaf_command(ctx.inv.network), check=False))
    if not held:
        return ""
    ctx.ledger.moved.add(node.name)  # they came back with addresses of their own: the peers step reads again
    node.sh(holdback.hold_command(held))
    code, out, err = node.result(_restart_command(node.name != ctx.topo.manager))
    if code != 0:  # the drop-in is the one that just worked: dockerd is started again, as it was
        node.result("systemctl reset-failed docker.service; systemctl start docker.service")
    node.sh(holdback.release_command(held), check=False)
    if code != 0:
        why = (err or out).strip()[-200:]
        raise OverlaylabError(f"dockerd's second restart, to hold back {', '.join(held)}, failed: {why}")
    return f"; restarted once more to start {', '.join(held)} after its gossip (they came back before it)"


class Dockerd(Step[DropIn]):
    """kv: the drop-in with the cluster flags, and a restart only where it changed or the
    daemon does not run as it says. The manager first, Consul's leader again, then one
    worker at a time: dockerd joins gossip through one registered neighbour and never
    retries, and two daemons restarting at once can pick each other and each stay alone
    (seen on the lab, ~1 run in 7 with parallel restarts)."""

    name = "dockerd"
    order = Order.MANAGER_FIRST

    def __init__(self, reasons: Sequence[Repair], round_two: bool = False) -> None:
        self.reasons = tuple(reasons)  # why a host restarts, first first: its pipeline's list (repairs/)
        self.round_two = round_two  # storetls.py's round 2: only a drop-in that moves its store

    @staticmethod
    def wanted(ctx: Context, node: Node) -> tuple[DropIn, Listener]:
        """The drop-in for this host, and where its store is served now."""
        found = dropins.wanted(ctx, node)
        assert found is not None, "a run has its manager"
        return found

    def plan(self, ctx: Context, node: Node) -> Action[DropIn] | None:
        d, _ = self.wanted(ctx, node)
        if self.round_two and not d.changed:
            return None
        reason = first(self.reasons, ctx, node)
        if reason is None:
            return Action(node.name, False, "drop-in up to date, dockerd running with it", check=not node.facts.gossip)
        moves = f" (its store moves to {d.store_move})" if d.store_move else ""
        return Action(
            node.name,
            True,
            f"write the drop-in{moves} and restart dockerd" if d.changed else f"restart dockerd: {reason}",
            restart=reason,
            stops=tuple(node.facts.foreign_containers),
            refusal=restart_refusal(node, reason, ctx.opts.allow_restart),
            diff=d.diff() if d.changed else "",
            project=lambda facts: setattr(facts, "dropin", d.wanted),
            data=d,
        )

    def apply(self, ctx: Context, node: Node, action: Action[DropIn]) -> str:
        if not action.change:  # running as wanted, but its gossip port was not up yet
            wait_ready(node)
            return action.detail
        d = action.payload()
        held = holdback.to_hold(node)
        if ip := anchor.address(node):
            ctx.ledger.held_addresses.setdefault(node.name, ip)
        before = f"{holdback.hold_command(held)} && {holdback.leave_command(node)} && {anchor.stop_command(node)}"
        between = None
        if node.facts.restore_failed:
            before += f" && {clearing_restart(ctx.inv, node, d)}"
        if node.address_moved():  # stopped, its old registration removed, then started
            before += " && systemctl stop docker.service"
            old = node.facts.cluster_advertise.rpartition(":")[0]
            between = lambda: consul.forget(ctx.inv, ctx.manager, old)  # noqa: E731
        try:
            done = write_and_restart(d, before, node.name != ctx.topo.manager, between)
        except OverlaylabError:
            if held:  # the rollback's dockerd runs: the held containers are not left stopped
                node.result(holdback.release_command(held))
            if anchor.present(node):
                # The rollback restarted dockerd and it is ready again: its anchor, stopped
                # with the daemon, comes back only now (see steps/anchor.py).
                with contextlib.suppress(OverlaylabError):
                    anchor.create(node, ctx.inv.network)
            raise
        if d.store_move:
            done += f"; its store now {d.store_move}"
        if between is not None:
            ctx.ledger.gone[old] = node.name
            wait_rejoined(ctx, node)
            done += f"; the other hosts' gossip took it in as {node.advertise_ip}"
        if held:
            node.sh(holdback.release_command(held), check=False)
            done += f"; {', '.join(held)} started after its gossip"
        else:
            done += restart_held_late(ctx, node)
        return done if d.changed else action.restart or done

    def settle(self, ctx: Context, node: Node, action: Action[DropIn]) -> None:
        """Consul is a container of the manager's dockerd: a restart stopped it, and it elects again."""
        if not action.change:
            return
        try:
            consul.wait_leader(ctx.inv, node)
        except OverlaylabError as exc:
            fail(ctx, "consul", node.name, f"after the manager's restart: {exc}")


class RestoreDropin(Step[DropIn]):
    """The original drop-in back (or none, if there was none), and dockerd restarted.

    Teardown does it on every host that overlaylab touched; swarm mode does it first on
    hosts that carry our cluster flags (a kv cluster before), since a swarm cannot form
    while they are there.
    """

    name = "dockerd"

    def __init__(self, cause: str, order: Order, scope: Scope, ours_only: bool) -> None:
        self.cause, self.order, self.scope, self.ours_only = cause, order, scope, ours_only

    def plan(self, ctx: Context, node: Node) -> Action[DropIn] | None:
        f = node.facts
        if not has_backup(node):
            if render.is_ours(f.dropin):
                why = f"{DROPIN} is overlaylab's but no backup of the original exists in {BACKUP_DIR}"
                return Action(node.name, False, why, refusal=why)
            return None if self.ours_only else Action(node.name, False, "no drop-in of overlaylab's")
        if self.ours_only and not render.is_ours(f.dropin):
            return None
        original = f.backup_content if Path(BACKUP).name in f.backup else None

        def project(facts: HostFacts) -> None:
            facts.dropin, facts.backup, facts.network = original, [], None  # no store, no global network
            facts.info = {**facts.info, "ClusterStore": "", "ClusterAdvertise": ""}

        return Action(
            node.name,
            True,
            "restore the original drop-in and restart dockerd"
            if original is not None
            else "remove the drop-in (there was none before) and restart dockerd",
            restart=self.cause,
            stops=tuple(f.foreign_containers),
            refusal=restart_refusal(node, self.cause, ctx.opts.allow_restart),
            diff=DropIn(node, original, f.dropin).diff(),
            project=project,
        )

    def apply(self, ctx: Context, node: Node, action: Action[DropIn]) -> str:
        return restore_original(node)


class SwarmDropin(Step[DropIn]):
    """Swarm mode: a drop-in of ours only to serve the API over TLS (no cluster flags: a
    swarm cannot form with them); without TLS, a drop-in of ours (a kv cluster's, or the
    TLS one) gives way to the original. The manager first, then one worker at a time."""

    name = "dockerd"
    order = Order.MANAGER_FIRST

    def __init__(self) -> None:
        self.restore = RestoreDropin("removing the cluster flags", Order.MANAGER_FIRST, Scope.TARGETS, ours_only=True)

    def plan(self, ctx: Context, node: Node) -> Action[DropIn] | None:
        if not ctx.inv.tls.docker_api:
            return self.restore.plan(ctx, node)
        f = node.facts
        base = render.base_command(f.exec_start, f.dropin)
        d = DropIn(node, render.render(ctx.inv.cluster, base, [*base, *dropins.with_api(base)], BACKUP_DIR), f.dropin)
        reason = (
            "drop-in changed"
            if d.changed
            else (f"docker.service is {f.docker_active}" if f.docker_active != "active" else tls.reload_reason(node))
        )
        if reason is None:
            return Action(node.name, False, "drop-in up to date (the API on tcp/2376, mutual TLS)")

        def project(facts: HostFacts) -> None:
            facts.dropin = d.wanted
            facts.info = {**facts.info, "ClusterStore": "", "ClusterAdvertise": ""}

        return Action(
            node.name,
            True,
            "write the drop-in (the API on tcp/2376, mutual TLS) and restart dockerd"
            if d.changed
            else f"restart dockerd: {reason}",
            restart=reason,
            stops=tuple(f.foreign_containers),
            refusal=restart_refusal(node, reason, ctx.opts.allow_restart),
            diff=d.diff() if d.changed else "",
            project=project,
            data=d,
        )

    def apply(self, ctx: Context, node: Node, action: Action[DropIn]) -> str:
        d = action.data
        if d is None:  # a kv drop-in of ours to put back first
            return self.restore.apply(ctx, node, action)
        done = write_and_restart(d, store=False)
        return done if d.changed else action.restart or done
