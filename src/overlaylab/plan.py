"""The step protocol, and the one loop that runs it.

Every step reads facts, returns one Action per host (computed purely from the facts,
the inventory and the topology: what it would change, why, what it would restart or
stop, or why it refuses), and applies it. A backend is an ordered list of steps;
each step carries its ordering rule (at once, the manager first then one worker at a
time, the workers first then the manager).

A dry run is this loop with apply switched off: each planned action is recorded, and
its declared effect on the facts (``project``) stands in for the change, so that the
later steps plan as they will in the run. A real run makes that same dry pass first,
silently, so that every refusal is known before any host changes (exit 2, and the
report is the dry run's); then it runs the loop again with apply on, planning each
step from facts read after the changes that came before it.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

import paramiko

from overlaylab import certs, gather
from overlaylab.cluster import Node, parallel
from overlaylab.errors import OverlaylabError
from overlaylab.facts import HostFacts
from overlaylab.inventory import Inventory
from overlaylab.options import Options
from overlaylab.report import RunReport
from overlaylab.topology import Topology

P = TypeVar("P")  # a step's payload, from its plan to its apply


class Order(Enum):
    PARALLEL = "every host at once"
    MANAGER_FIRST = "the manager, then one worker at a time"
    WORKERS_FIRST = "the workers at once, then the manager"


class Scope(Enum):
    TARGETS = "the hosts this task changes"  # all, or join-node's one worker
    ALL = "every host still in the run"
    MANAGER = "the manager"


@dataclass
class Action(Generic[P]):
    """What one step does, or would do, on one host; ``data`` is the step's own payload,
    of the type the step declares (`Step[DropIn]`)."""

    host: str
    change: bool
    detail: str  # a change: what it does ("create ov_net1"); otherwise why nothing needs doing
    restart: str | None = None  # why this change restarts dockerd
    stops: tuple[str, ...] = ()  # the user's containers that restart stops
    refusal: str | None = None  # why the run must not go ahead (exit 2, nothing changed anywhere)
    check: bool = False  # no change, but the run verifies something (a leader, a registration)
    diff: str = ""
    project: Callable[[HostFacts], None] | None = None  # the change's effect on the facts, for the dry pass
    data: P | None = None  # the step's own payload (a rendered drop-in)
    reads_back: bool = False  # apply reads back what it changed into the facts: no re-read of the host after it

    def payload(self) -> P:
        """The payload the step's plan gave a changing action (a bug if there is none)."""
        if self.data is None:
            raise RuntimeError(f"{self.host}: a changing action of this step came without its payload (a bug)")
        return self.data


@dataclass(frozen=True)
class Maybe:
    """What a step may change on a host that no fact can foretell, and on what condition.

    Some events happen only during the run itself: a store watch that stops while Consul is
    away, a peer address that a restart of the run's own leaves stale. A dry run cannot
    know them, so it says them as conditional ("may change", "may restart"), each with its
    condition: what the run then does is the certain plan, plus some of these."""

    condition: str  # "if ...": when the step changes the host after all, and what it does then
    restart: bool = False  # the change restarts dockerd


@dataclass(frozen=True)
class RunInput:
    """What a pass is given, and never changes: the inventory, the options, who runs what,
    the hosts the task changes, and whether a failed host leaves the steps that follow."""

    inv: Inventory
    opts: Options
    topo: Topology
    targets: tuple[str, ...]
    halt: bool = True  # teardown: False, every step tried on every host


@dataclass
class Ledger:
    """What a pass has done so far (a dry pass: would do). Steps read each other's work
    here, never from the report's words: a fresh ledger for each pass."""

    restarts: dict[str, str] = field(default_factory=dict)  # host -> why its dockerd restarts
    may_restart: dict[str, str] = field(default_factory=dict)  # a dry run's host -> on what condition it may
    diffs: dict[str, str] = field(default_factory=dict)  # host -> its drop-in's diff
    failed: set[str] = field(default_factory=set)
    stale: set[str] = field(default_factory=set)  # hosts changed since their facts were read
    refusals: dict[str, str] = field(default_factory=dict)
    stores_made: set[str] = field(default_factory=set)  # HA: hosts whose running dockerd got its own agent made again
    consul_made: set[str] = field(default_factory=set)  # hosts whose Consul this pass (re)makes: the store goes away
    anchors_made: set[str] = field(default_factory=set)  # hosts whose anchor this pass made (again)
    held_addresses: dict[str, str] = field(default_factory=dict)  # host -> its anchor's address before our restart
    # hosts whose containers on the network this pass stops and starts again (a restart with any
    # there, an anchor made again, a container reconnected): only theirs can change address;
    # and a host restarted under a moved cluster address (the others' entries toward its old one)
    moved: set[str] = field(default_factory=set)
    # old cluster address -> the host that had it: hosts this pass restarted under a moved
    # address (DHCP); other hosts' overlays may still send its containers' addresses there
    gone: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """One pass over a backend: its frozen input, the hosts (their facts change as the pass
    goes), the report, and the ledger of what the pass has done."""

    input: RunInput
    nodes: dict[str, Node]
    report: RunReport
    dry: bool
    ledger: Ledger = field(default_factory=Ledger)
    ca: certs.Keeper | None = None  # when the inventory turns TLS on: the CA, made only when a real run needs it

    @property
    def inv(self) -> Inventory:
        return self.input.inv

    @property
    def opts(self) -> Options:
        return self.input.opts

    @property
    def topo(self) -> Topology:
        return self.input.topo

    @property
    def targets(self) -> tuple[str, ...]:
        return self.input.targets

    @property
    def manager(self) -> Node:
        return self.nodes[self.topo.manager]

    @property
    def joining(self) -> bool:
        """join-node: one worker joins a cluster that must already be there."""
        return set(self.targets) != set(self.topo.hosts)

    @property
    def store_interrupted(self) -> bool:
        """This pass takes the store away for a while (a Consul made again, a dockerd restarted,
        which in the tutorial's layout stops the manager's Consul too), or may (a dry run)."""
        return bool(self.ledger.restarts or self.ledger.consul_made or self.ledger.may_restart)

    def live(self, names: Sequence[str]) -> list[str]:
        """Hosts still in the run: with ``halt``, a host that failed takes no further step."""
        return [n for n in names if not self.input.halt or n not in self.ledger.failed]


class Step(Generic[P]):
    """One provisioning step. Subclasses set ``name``, ``scope`` and ``order``, and write
    ``plan`` (pure) and ``apply`` (the only place that changes a host); ``P`` is the type of
    the payload its plan hands its apply."""

    name: str
    scope: Scope = Scope.TARGETS
    order: Order = Order.PARALLEL

    def plan(self, ctx: Context, node: Node) -> Action[P] | None:
        """The action for this host, from facts only; None when the step has no business there."""
        raise NotImplementedError

    def apply(self, ctx: Context, node: Node, action: Action[P]) -> str:
        """Carry out one changing (or checking) action; returns what was done. Raises on failure."""
        raise NotImplementedError

    def may(self, ctx: Context, node: Node) -> Maybe | None:
        """For a dry run only: what this step may change on the host beyond its plan, and when
        (None: nothing beyond it). The run's changes are the plan's, plus some of these."""
        return None

    def settle(self, ctx: Context, node: Node, action: Action[P]) -> None:
        """After the manager's action under MANAGER_FIRST, before any worker's (Consul's leader again)."""

    def hosts(self, ctx: Context) -> list[str]:
        if self.scope is Scope.MANAGER:
            names = [ctx.topo.manager]
        elif self.scope is Scope.ALL:
            names = list(ctx.topo.hosts)
        else:
            names = list(ctx.targets)
        return ctx.live(names)

    def apply_all(self, ctx: Context, actions: list[Action[P]]) -> None:
        """Apply in this step's order; a step that acts on the group at once overrides this."""
        manager = ctx.topo.manager
        first = [a for a in actions if a.host == manager]
        rest = [a for a in actions if a.host != manager]
        if self.order is Order.PARALLEL:
            apply_at_once(ctx, self, actions)
        elif self.order is Order.WORKERS_FIRST:
            apply_at_once(ctx, self, rest)
            for action in first:
                apply_one(ctx, self, action)
        else:  # MANAGER_FIRST
            for action in first:
                if apply_one(ctx, self, action) and (action.change or action.check):
                    try:
                        self.settle(ctx, ctx.nodes[manager], action)
                    except OverlaylabError as exc:
                        fail(ctx, self.name, manager, f"after the manager's change: {exc}")
            if manager in ctx.ledger.failed and first:
                return  # the manager failed: no worker is touched
            for action in rest:
                apply_one(ctx, self, action)


def apply_at_once(ctx: Context, step: Step[P], actions: list[Action[P]]) -> None:
    """Every action in parallel; a host's failure is recorded by apply_one, anything else is a bug."""
    for exc in parallel(actions, lambda a: apply_one(ctx, step, a), key=lambda a: a.host).values():
        raise exc


def foundation(ctx: Context, node: Node, state: str, why: str, missing: str) -> Action[Any] | None:
    """The early answers of a step on what the cluster stands on (Consul, the swarm): a
    refusal, or join-node's need for it to be there already; None when the step goes on."""
    if state == "refuse":
        return Action(node.name, False, why, refusal=why)
    if ctx.joining and state != "ok":
        return Action(node.name, False, why, refusal=f"{missing} ({why}): run bootstrap-cluster first")
    return None


def fail(ctx: Context, step: str, host: str, why: str) -> None:
    ctx.report.record(host, step, "failed", why)
    ctx.ledger.failed.add(host)


UNREACHABLE = (OSError, EOFError, paramiko.SSHException)


def apply_one(ctx: Context, step: Step[Any], action: Action[Any]) -> bool:
    """Apply one action and record its outcome; True when it went well."""
    node = ctx.nodes[action.host]
    if not (action.change or action.check):
        ctx.report.record(action.host, step.name, "ok", action.detail)
        return True
    if action.restart:  # even if it then fails: its PID may change
        restarting(ctx, action.host, action.restart)
    if action.diff:
        ctx.ledger.diffs[action.host] = action.diff
    try:
        done = step.apply(ctx, node, action)
    except OverlaylabError as exc:
        fail(ctx, step.name, action.host, str(exc))
        ctx.ledger.stale.add(action.host)
        return False
    except UNREACHABLE as exc:
        fail(ctx, step.name, action.host, f"unreachable: {type(exc).__name__}: {exc}".rstrip(": "))
        return False
    ctx.report.record(action.host, step.name, "changed" if action.change else "ok", done)
    if action.change and not action.reads_back:
        if action.project is not None:
            action.project(node.facts)  # what the host should look like now, until it is read again
        ctx.ledger.stale.add(action.host)
    return True


def _record_planned(ctx: Context, step: Step[Any], action: Action[Any]) -> None:
    if action.change:
        stops = f"; the restart stops: {', '.join(action.stops)}" if action.stops else ""
        ctx.report.record(action.host, step.name, "changed", f"would {action.detail}{stops}")
        if action.diff:
            ctx.ledger.diffs[action.host] = action.diff
            if not ctx.report.json_mode:
                ctx.report.note(action.diff.rstrip())
        if action.restart:
            restarting(ctx, action.host, action.restart)
    elif action.refusal:
        ctx.report.record(action.host, step.name, "failed", action.refusal)
    else:
        ctx.report.record(action.host, step.name, "ok", action.detail)
    if action.refusal:
        ctx.report.record(action.host, "plan", "failed", action.refusal)
        ctx.ledger.refusals[action.host] = action.refusal
    if action.change and action.project is not None:
        action.project(ctx.nodes[action.host].facts)


def restarting(ctx: Context, host: str, why: str) -> None:
    """A restart of this pass, in the ledger; with the containers on the network its facts
    show before it (a restart stops and starts them: their addresses may move), or with
    containers unknown: a dockerd that was stopped or did not answer listed none, and those
    it starts again take the first free addresses all the same. A host whose cluster address
    moved too: the other hosts' entries toward its old address are read after its restart."""
    add_restart(ctx.ledger.restarts, host, why)
    f = ctx.nodes[host].facts
    if f.attached or f.docker_active != "active" or not f.info.get("ServerVersion"):
        ctx.ledger.moved.add(host)
    if ctx.nodes[host].address_moved():
        ctx.ledger.moved.add(host)


def add_restart(restarts: dict[str, str], host: str, why: str) -> None:
    """A host restarted twice in one run (its own reason, then the peers step's) keeps both
    reasons, the first first: a dry run's certain reason stays the start of the run's."""
    restarts[host] = f"{restarts[host]}; then {why}" if host in restarts and restarts[host] != why else why


def _record_maybe(ctx: Context, step: Step[Any], host: str, maybe: Maybe) -> None:
    """A dry run's conditional: said, and its restart kept apart from the certain ones."""
    what = "may restart dockerd" if maybe.restart else "may change"
    ctx.report.record(host, step.name, "may change", f"{what}, {maybe.condition}")
    if maybe.restart:
        ctx.ledger.may_restart[host] = maybe.condition


def _refresh(ctx: Context) -> None:
    """Facts read again where this run changed a host: a later step plans from what is, not what was."""
    stale = [ctx.nodes[n] for n in ctx.live(sorted(ctx.ledger.stale))]
    ctx.ledger.stale.clear()
    for name, exc in parallel(stale, lambda node: gather.read_one(ctx.inv, node)).items():
        fail(ctx, "facts", name, f"reading facts again failed: {type(exc).__name__}: {exc}")


def execute(steps: Sequence[Step[Any]], ctx: Context) -> bool:
    """Run the steps in order (dry or real); False when a failure stopped the run.

    With ``ctx.input.halt``, a failed manager stops the run and a failed worker is left out
    of the steps that follow; without it (teardown) every step is tried on every host.
    """
    for i, step in enumerate(steps):
        if not ctx.dry and i:
            _refresh(ctx)
        planned = [(n, step.plan(ctx, ctx.nodes[n])) for n in step.hosts(ctx)]
        actions = [a for _, a in planned if a is not None]
        if ctx.dry:
            for name, action in planned:
                certain = action is not None and bool(action.change or action.refusal)
                maybe = None if certain else step.may(ctx, ctx.nodes[name])
                if maybe is not None:
                    _record_maybe(ctx, step, name, maybe)
                elif action is not None:
                    _record_planned(ctx, step, action)
            continue
        for action in [a for a in actions if a.refusal]:  # facts changed since the dry pass
            fail(ctx, step.name, action.host, action.refusal or "")
        step.apply_all(ctx, [a for a in actions if not a.refusal])
        if ctx.input.halt and ctx.topo.manager in ctx.ledger.failed:
            return False
    return True


def shadow(nodes: dict[str, Node]) -> dict[str, Node]:
    """Nodes whose facts the dry pass may project changes onto; the connections are shared, unused."""
    return {name: dataclasses.replace(node, facts=copy.deepcopy(node.facts)) for name, node in nodes.items()}


def preview(steps: Sequence[Step[Any]], ctx: Context) -> Context:
    """The dry pass of a real run: recorded into a report of its own, printed only if it refuses."""
    quiet = RunReport(ctx.report.task, ctx.report.hosts, ctx.report.json_mode, stream=io.StringIO())
    dry = dataclasses.replace(ctx, nodes=shadow(ctx.nodes), report=quiet, dry=True, ledger=Ledger())
    execute(steps, dry)
    return dry


def replay(planned: Context, report: RunReport) -> None:
    """A refused run's report is the dry run's: what would have changed, and why it did not."""
    for outcome in planned.report.outcomes:
        report.record(outcome["host"], outcome["step"], outcome["status"], outcome["detail"])
    for text in planned.report.notes:
        report.note(text)
