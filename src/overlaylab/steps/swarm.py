"""Swarm membership: kv mode leaves any swarm; swarm mode inits one on the manager and joins the workers."""

from __future__ import annotations

import dataclasses

from overlaylab.cluster import Node
from overlaylab.errors import OverlaylabError
from overlaylab.facts import HostFacts
from overlaylab.plan import Action, Context, Order, Scope, Step, foundation


def refusal(node: Node, force: bool) -> str | None:
    """A manager with services is not left silently: what would be lost, unless forced."""
    f = node.facts
    if f.swarm_state != "inactive" and f.swarm_manager and f.services and not force:
        return (
            f"manages a swarm with {f.services} service(s); leaving would remove them from this node's control: "
            "pass --force-leave-swarm to leave anyway"
        )
    return None


def needed(node: Node) -> bool:
    return node.facts.swarm_state not in ("inactive", "")


def _left(facts: HostFacts) -> None:
    """A node that left its swarm no longer sees the swarm's networks."""
    if (facts.network or {}).get("Scope") == "swarm":
        facts.network = None
    facts.info = {**facts.info, "Swarm": {"LocalNodeState": "inactive"}}


class LeaveSwarm(Step[None]):
    """kv: leave any swarm (the cluster store cannot coexist with swarm mode); a manager with
    services only with --force-leave-swarm. Teardown of swarm mode: the workers, then the manager."""

    name = "swarm"

    def __init__(self, teardown: bool = False) -> None:
        self.teardown = teardown
        self.order = Order.WORKERS_FIRST if teardown else Order.PARALLEL
        self.scope = Scope.ALL if teardown else Scope.TARGETS

    def plan(self, ctx: Context, node: Node) -> Action[None]:
        if not needed(node):
            return Action(node.name, False, "not in a swarm")
        f = node.facts
        refused = None if self.teardown else refusal(node, ctx.opts.force_leave_swarm)
        role = ", manager" if f.swarm_manager else ""
        return Action(node.name, True, f"leave the swarm (was {f.swarm_state}{role})", refusal=refused, project=_left)

    def apply(self, ctx: Context, node: Node, action: Action[None]) -> str:
        node.sh(
            "docker swarm leave --force >/dev/null"
            if node.facts.swarm_manager or self.teardown
            else "docker swarm leave"
        )
        return f"left the swarm (was {node.facts.swarm_state}{', manager' if node.facts.swarm_manager else ''})"


# ---- swarm mode: the backend for engines without a cluster store ------------------------

SWARM_PORT = 2377


def manager_addr(manager: Node) -> str:
    return f"{manager.advertise_ip}:{SWARM_PORT}"


def manager_state(manager: Node, leave_other: bool) -> tuple[str, str]:
    """('ok'|'init'|'reinit'|'refuse', why) for the manager."""
    f = manager.facts
    if f.swarm_state == "inactive":
        return "init", "not in a swarm"
    if f.swarm_state == "active" and f.swarm_manager:
        return "ok", f"manages swarm {f.swarm_cluster_id[:12]}"
    if leave_other:
        return "reinit", f"in another swarm as a worker ({f.swarm_state}): leaving it (--leave-other-swarm)"
    return "refuse", f"is a worker of another swarm ({f.swarm_state}): pass --leave-other-swarm to leave it"


def worker_state(node: Node, manager: Node, leave_other: bool) -> tuple[str, str]:
    """('ok'|'join'|'rejoin'|'refuse', why) for a worker."""
    f = node.facts
    if f.swarm_state == "inactive":
        return "join", "not in a swarm"
    if f.swarm_state == "active" and manager_addr(manager) in f.swarm_remote_managers and not f.swarm_manager:
        return "ok", f"worker of {manager.name}'s swarm"
    if leave_other:
        return "rejoin", f"in another swarm ({f.swarm_state}): leaving it (--leave-other-swarm)"
    return (
        "refuse",
        f"is in another swarm ({f.swarm_state}, managers {f.swarm_remote_managers}): pass --leave-other-swarm",
    )


def init(manager: Node, pool: str | None, rejoin: bool) -> str:
    leave = "docker swarm leave --force >/dev/null && " if rejoin else ""
    ip = manager.advertise_ip
    pool_arg = f" --default-addr-pool {pool}" if pool else ""
    manager.sh(f"{leave}docker swarm init --advertise-addr {ip} --listen-addr {ip}:{SWARM_PORT}{pool_arg} >/dev/null")
    return f"swarm initialised on {ip}:{SWARM_PORT}"


def worker_token(manager: Node) -> str:
    return manager.sh("docker swarm join-token -q worker").strip()


def join(node: Node, manager: Node, token: str, rejoin: bool) -> str:
    leave = "docker swarm leave --force >/dev/null; " if rejoin else ""
    ip = node.advertise_ip
    try:
        node.sh(
            f"{leave}docker swarm join --token {token} --advertise-addr {ip} --listen-addr {ip}:{SWARM_PORT} "
            f"{manager_addr(manager)} >/dev/null"
        )
    except OverlaylabError as exc:  # the join token is a secret: never in a message
        raise OverlaylabError(str(exc).replace(token, "<join-token>")) from None
    return f"joined {manager.name}'s swarm"


class SwarmInit(Step[str]):
    """Swarm mode: the manager manages a swarm (an existing one it manages is `ok`)."""

    name = "swarm"
    scope = Scope.MANAGER

    def plan(self, ctx: Context, node: Node) -> Action[str] | None:
        state, why = manager_state(node, ctx.opts.leave_other_swarm)
        early = foundation(ctx, node, state, why, f"no swarm managed by {node.name}")
        if early is not None:
            return early
        if state == "ok":
            return Action(node.name, False, why)

        def project(facts: HostFacts) -> None:
            if state == "reinit":
                _left(facts)
            facts.info = {**facts.info, "Swarm": {"LocalNodeState": "active", "ControlAvailable": True}}

        return Action(node.name, True, f"initialise a swarm ({why})", data=state, project=project)

    def apply(self, ctx: Context, node: Node, action: Action[str]) -> str:
        return init(node, ctx.inv.swarm_addr_pool, action.payload() == "reinit")


class SwarmJoin(Step[tuple[str, str]]):
    """Swarm mode: the workers join with the worker token (never printed), at once."""

    name = "swarm"

    def hosts(self, ctx: Context) -> list[str]:
        return [n for n in super().hosts(ctx) if n != ctx.topo.manager]

    def plan(self, ctx: Context, node: Node) -> Action[tuple[str, str]]:
        state, why = worker_state(node, ctx.manager, ctx.opts.leave_other_swarm)
        if state == "refuse":
            return Action(node.name, False, why, refusal=why)
        if state == "ok":
            return Action(node.name, False, why)
        return Action(node.name, True, f"join {ctx.topo.manager}'s swarm ({why})", data=(state, ""), project=_left)

    def apply_all(self, ctx: Context, actions: list[Action[tuple[str, str]]]) -> None:
        """The token is read once for all joins, and travels only inside this run."""
        token = worker_token(ctx.manager) if any(a.change for a in actions) else ""
        super().apply_all(ctx, [dataclasses.replace(a, data=(a.data[0], token)) if a.data else a for a in actions])

    def apply(self, ctx: Context, node: Node, action: Action[tuple[str, str]]) -> str:
        state, token = action.payload()
        return join(node, ctx.manager, token, state == "rejoin")
