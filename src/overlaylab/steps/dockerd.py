"""Steps 4 and 5: the 10-machine.conf drop-in, and a restart only where it changed.

The previous drop-in is kept in memory for this run's rollback, and the original
one (before overlaylab first touched the host, or the fact that there was none) is
kept on the host and never overwritten, for teardown.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overlaylab import peers, render, storetls
from overlaylab.cluster import Node, journal, write_file_command
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
from overlaylab.steps import anchor, consul, holdback, network, tls
from overlaylab.storetls import Listener

READY_TIMEOUT = 60  # dockerd answering, cluster store in docker info, gossip listening


@dataclass(frozen=True)
class DropIn:
    """The drop-in a host should have, next to the one it has."""

    node: Node
    wanted: str | None  # None: no drop-in (teardown when there was none before)
    current: str | None

    @property
    def changed(self) -> bool:
        return self.wanted != self.current

    @property
    def store_move(self) -> str:
        """Where its store moves (storetls.py's rounds), as the report says it; "" if it stays."""
        was, now = storetls.uses(self.current), storetls.uses(self.wanted)
        return f"{now[0]} on :{now[1]}" if was and now and was != now else ""

    def diff(self) -> str:
        before = (self.current or "").splitlines(keepends=True)
        after = (self.wanted or "").splitlines(keepends=True)
        label = f"{self.node.name}:{DROPIN}"
        return "".join(difflib.unified_diff(before, after, f"{label} (now)", f"{label} (wanted)"))


def store_ip(inv: Inventory, manager_ip: str) -> str:
    """Where a dockerd finds its cluster store: the manager's Consul, or in HA mode its own
    host's agent (libkv's Consul backend takes a single address)."""
    return consul.LOOPBACK if inv.ha else manager_ip


def dropin(inv: Inventory, node: Node, manager_ip: str, store: Listener | None = None) -> DropIn:
    """What the templates render for this host from dockerd's command line before overlaylab.
    ``store``: the scheme and port its store is reached at (default: where it ends up)."""
    base = render.base_command(node.facts.exec_start, node.facts.dropin)
    scheme, port = store or storetls.final(inv)[0]
    api = tuple(tls.with_api(base)) if inv.tls.docker_api else ()
    secure = tuple(storetls.kv_opts()) if scheme == storetls.HTTPS else ()
    argv = render.cluster_argv(
        base, store_ip(inv, manager_ip), port, node.host.advertise, inv.extra_flags, inv.discovery, api, secure
    )
    wanted = render.render(inv.cluster, base, argv, BACKUP_DIR)
    return DropIn(node, wanted, node.facts.dropin)


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


def partitioned(ctx: Context, node: Node) -> str | None:
    """A dockerd cut off from most of the cluster's gossip: it last saw more than half of its
    peers fail or leave, and they run, in the cluster, gossip port up. dockerd joins one
    neighbour once and does not rejoin by itself; serf's own reconnect comes after 30 s or
    more, by chance. A restart joins it again; its peers, each of which misses only it,
    need none (in a 3-host cluster whose manager was cut off: the manager alone)."""
    if not (node.facts.gossip and node.facts.cluster_store):
        return None
    peers = {
        (ctx.nodes[n].facts.hostname or n): n
        for n in ctx.live(ctx.topo.hosts)
        if n != node.name and ctx.nodes[n].facts.gossip and ctx.nodes[n].facts.cluster_store
    }
    gone = sorted(peers[h] for h in node.facts.gossip_gone if h in peers)
    if not peers or len(gone) * 2 <= len(peers):
        return None
    return f"its gossip last saw {', '.join(gone)} fail and never joined them again, while they run"


def stale_peers(ctx: Context, node: Node, own: Callable[[Node], str | None]) -> str | None:
    """Its overlay's peer table holds addresses no host serves where it sends them (peers.py).

    An entry toward a host that this run restarts for a reason of its own (``own``) is not
    judged here: that host's containers are not where they will be (after a power cut, none
    runs on the overlay until its restart), and the peers step judges every entry again
    after the restarts (steps/stale.py). Judged now, it restarted every other host of a
    lab whose worker lost its power, for addresses its containers took again (CI's heal
    module, once the test read the entries itself)."""
    live = [ctx.nodes[n] for n in ctx.live(ctx.topo.hosts)]
    found = peers.stale(node, live)
    if not found:
        return None
    targets = set(ctx.targets)  # join-node restarts its worker alone: the others stay as they are
    restarting = {
        n.name
        for n in live
        if n.name in found.values()
        and n.name in targets
        and (why := own(n)) is not None
        and restart_refusal(n, why, ctx.opts.allow_restart) is None
    }
    found = {ip: host for ip, host in found.items() if host not in restarting}
    return peers.describe(found) if found else None


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


def restart_refusal(node: Node, cause: str, allow_restart: bool) -> str | None:
    """A restart stops the host's running containers: a user's only with --allow-restart."""
    running = node.facts.foreign_containers
    if not running or allow_restart:
        return None
    return f"{cause}: restarting dockerd stops {', '.join(running)}; pass --allow-restart to go ahead"


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


def restart_reason(node: Node, d: DropIn, wanted_store: str) -> str | None:
    """Why dockerd must restart, or None: only a changed drop-in or a daemon not running as wanted."""
    f = node.facts
    if d.changed:
        return "drop-in changed"
    if f.docker_active != "active":
        return f"docker.service is {f.docker_active}"
    if f.cluster_store != wanted_store:
        return f"dockerd runs with cluster store {f.cluster_store or 'none'}, the drop-in says {wanted_store}"
    moved = node.address_moved()
    if moved:
        return moved
    if f.restore_failed:
        return (
            "dockerd's overlay restore failed at its start (state left by a power cut): "
            "no container of this host can join the overlay until it restarts"
        )
    reload = tls.reload_reason(node)
    if reload:
        return reload
    if holdback.deaf(node):
        return (
            "its overlay sandbox was made before its gossip (a restart brought containers back first), "
            "so it never looks up peers; restarted, those containers started after gossip"
        )
    if f.stray_threads:
        return (
            f"dockerd has {f.stray_threads} thread(s) left in a deleted network namespace (Docker 20.10 overlay "
            "defect, see steps/anchor.py): restarted to clear them"
        )
    return None


def store_made(ctx: Context, node: Node) -> str | None:
    """HA mode: this pass made the host's own Consul agent again while its dockerd ran on it.
    Seen on the lab (the manager's agent removed and made again): its pairs with another
    host failed for over 45 s after the run, then healed by themselves."""
    if node.name not in ctx.ledger.stores_made:
        return None
    return (
        "its store, this host's own Consul agent, was gone and is made again: dockerd lost its registration "
        "and its gossip with it, and takes them back only slowly by itself"
    )


def restart_held_late(ctx: Context, node: Node) -> str:
    """A restart that held nothing back (the facts listed no container that comes back),
    after which the sandbox still has no miss watcher: containers came back before gossip
    all the same. One more restart, with them held back this time (a second run would
    otherwise be needed)."""
    held = holdback.parse_came_back(node.sh(holdback.came_back_deaf_command(ctx.inv.network), check=False))
    if not held:
        return ""
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

    def __init__(self, round_two: bool = False) -> None:
        self.round_two = round_two  # storetls.py's round 2: only a drop-in that moves its store

    @staticmethod
    def wanted(ctx: Context, node: Node) -> tuple[DropIn, Listener]:
        """The drop-in for this host, and where its store is served now."""
        own = node if ctx.topo.ha else ctx.manager  # the Consul its store is: HA mode's own agent
        store = storetls.target(ctx.inv, storetls.served(own.facts.consul, ctx.inv.consul_port))
        return dropin(ctx.inv, node, ctx.manager.advertise_ip, store), store

    def own_reason(self, ctx: Context, node: Node) -> str | None:
        """Why this host's dockerd restarts, but for what another host's restart may mend."""
        d, store = self.wanted(ctx, node)
        return (
            restart_reason(node, d, render.store_url(store_ip(ctx.inv, ctx.manager.advertise_ip), store[1]))
            or partitioned(ctx, node)
            or store_made(ctx, node)
            or network.holds_lost(ctx, node)
        )

    def plan(self, ctx: Context, node: Node) -> Action[DropIn] | None:
        d, _ = self.wanted(ctx, node)
        if self.round_two and not d.changed:
            return None
        reason = self.own_reason(ctx, node) or stale_peers(ctx, node, lambda n: self.own_reason(ctx, n))
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
        d = DropIn(node, render.render(ctx.inv.cluster, base, [*base, *tls.with_api(base)], BACKUP_DIR), f.dropin)
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
