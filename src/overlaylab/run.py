"""The frame every task runs in: one verified connection per host, facts read once,
a report, and the mapping of every outcome to an exit code.

Exit codes: 0 all good; 1 a host failed after changes began; 2 bad input or a
refused preflight/plan, in which case nothing was changed anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from overlaylab import certs, cluster, gather
from overlaylab import mode as modes
from overlaylab.checks import pathmtu, preflight, probe, verify
from overlaylab.cluster import Node
from overlaylab.errors import InputError, OverlaylabError
from overlaylab.inventory import Inventory
from overlaylab.mode import Mode
from overlaylab.options import Options
from overlaylab.plan import Context, RunInput, Step, execute, preview, replay
from overlaylab.report import RunReport
from overlaylab.steps import anchor, consul
from overlaylab.steps.network import VXLAN_OVERHEAD
from overlaylab.topology import Topology

Pipeline = Callable[..., int]


class Refused(InputError):
    """Preflight or plan refused: nothing has been changed on any host."""


def open_nodes(
    inv: Inventory, opts: Options, only: tuple[str, ...] | None = None, gone: dict[str, str] | None = None
) -> list[Node]:
    """Connected nodes with their facts. With ``gone`` (a dict to fill), a host that does not
    answer is left out and named there instead of failing the task (status and verify)."""
    nodes, missing = cluster.connect_reachable(
        inv, list(inv.hosts), opts.accept_new_host_keys, opts.sudo_password, tolerate=gone is not None
    )
    if gone is not None:
        gone.update(missing)
    try:
        gather.read_facts(inv, nodes, only)
    except BaseException:
        cluster.close_all(nodes)
        raise
    return nodes


def finish(report: RunReport, code: int) -> int:
    if report.json_mode:
        print(json.dumps(report.document(code), indent=2))
    elif report.outcomes:
        report.note(report.table())
    return code


def preflight_step(inv: Inventory, nodes: list[Node], report: RunReport, mode: Mode = Mode.KV) -> None:
    problems = preflight.check(inv, nodes, mode)
    if not problems and mode == Mode.KV:
        old = preflight.consul_version_problem(inv, nodes)
        if old is not None:
            problems = {old[0]: [old[1]]}
    for node in nodes:
        if node.name in problems:
            report.record(node.name, "preflight", "failed", "; ".join(problems[node.name]))
        else:
            f = node.facts
            report.record(
                node.name, "preflight", "ok", f"Docker {f.version}, {node.host.advertise}={node.advertise_ip}"
            )
    if problems:
        raise Refused("preflight refused: " + "; ".join(f"{h}: {'; '.join(p)}" for h, p in problems.items()))


def auto_mtu(inv: Inventory, nodes: list[Node], report: RunReport) -> Inventory:
    """network.mtu: auto, sized before the plan (the network step's action needs the value):
    the path MTU from every host to every other, one command a host, and the largest overlay
    MTU they all carry. A path that cannot be sized or fits none refuses the run (exit 2)."""
    paths, _ = pathmtu.measure(nodes, pathmtu.AUTO_CEILING - VXLAN_OVERHEAD)
    report.extra["path_mtu"] = paths
    mtu, said = pathmtu.choose(paths)
    if mtu is None:
        for node in nodes:
            mine = [line for line in said if line.startswith(f"{node.name} -> ")]
            if mine:
                report.record(node.name, "preflight", "failed", "; ".join(mine))
        raise Refused("preflight refused: " + "; ".join(said))
    report.note(said[0])
    report.extra["mtu_auto"] = mtu
    return dataclasses.replace(inv, mtu=mtu)


def run_task(
    task: str,
    inv: Inventory,
    opts: Options,
    fn: Pipeline,
    *args: object,
    facts: tuple[str, ...] | None = None,
    carry_on: bool = False,
) -> int:
    """Common frame: report, connections, facts (``facts``: only those sections); maps every
    path to an exit code. ``carry_on`` (status, verify): a host that does not answer is
    reported unreachable and the task goes on with the others, exiting 1 at the end."""
    report = RunReport(task, [h.name for h in inv.hosts], opts.json)
    gone: dict[str, str] | None = {} if carry_on else None
    try:
        cluster.set_parallel(opts.parallel)
        nodes = open_nodes(inv, opts, facts, gone)
    except InputError as exc:
        report.note(f"error: {exc}")
        return finish(report, 2)
    for host, why in sorted((gone or {}).items()):
        report.record(host, task, "failed", f"unreachable: {why}")
    if gone:
        report.extra["unreachable"] = sorted(gone)
    if not nodes:
        report.note("error: no host answered")
        return finish(report, 1)
    report.extra["facts_via"] = {n.name: n.facts.facts_via for n in nodes}
    slow = [n.name for n in nodes if n.facts.facts_via == "cli"]
    if slow:
        report.note(
            f"facts: {', '.join(slow)} read by the docker CLI (slower): no curl there, or no /var/run/docker.sock "
            "for dockerd's Engine API"
        )
    try:
        code = fn(inv, opts, nodes, report, *args)
    except Refused as exc:
        report.note(f"refused, nothing changed: {exc}")
        code = 2
    except InputError as exc:
        report.note(f"error: {exc}")
        code = 2
    except OverlaylabError as exc:
        report.note(f"error: {exc}")
        code = 1
    except Exception as exc:
        report.note(f"internal error (please report): {type(exc).__name__}: {exc}")
        if os.environ.get("OVERLAYLAB_DEBUG"):
            traceback.print_exc()
        code = 1
    finally:
        report.extra["remote_commands"] = {n.name: n.commands for n in nodes}
        cluster.close_all(nodes)
    return finish(report, max(int(code), 1) if gone else int(code))


def mode_step(inv: Inventory, nodes: list[Node], report: RunReport) -> Mode:
    mode, why = modes.resolve(inv.mode, nodes)
    report.extra["mode"] = mode.value
    report.note(why)
    return mode


def run_steps(
    inv: Inventory,
    opts: Options,
    nodes: list[Node],
    report: RunReport,
    steps: Sequence[Step[Any]],
    targets: Sequence[str],
    teardown: bool = False,
    ports: Callable[[], probe.Probed] | None = None,
    ca: certs.Keeper | None = None,
    anchors: bool = False,
) -> int:
    """A backend's steps, dry or for real. The real run is planned whole first (a silent dry
    pass), so that a refusal anywhere leaves every host as it was, and its report is then
    the dry run's: the same plan, refused. ``anchors``: the backend keeps an anchor on every
    host (kv), which verify may ping with."""
    given = RunInput(inv, opts, Topology.of(inv), tuple(targets), halt=not teardown)
    ctx = Context(given, {n.name: n for n in nodes}, report, dry=False, ca=ca)
    planned = preview(steps, ctx)
    if ports is not None and planned.report.changes and not planned.ledger.refusals:
        probe_ports(report, ports)  # only where something will change: a no-op re-run stays two commands a host
    if opts.dry_run or planned.ledger.refusals:
        return report_plan(planned, report, teardown)
    whole = execute(steps, ctx)
    if ca is not None and not teardown and whole:
        made = ca.admin()
        changes = [*ca.events, *([made] if made else [])]
        for event in changes:
            report.note(event)
        report.extra["ca"] = {"directory": str(ca.directory), "changes": changes}
    report.extra.update(restarts=ctx.ledger.restarts, diffs=ctx.ledger.diffs)
    if whole and not teardown:
        live = [n for n in nodes if n.name not in ctx.ledger.failed]
        anchored = anchors and not ctx.joining and not report.failed
        sources = [n for n in live if n.name in targets] if ctx.joining else None
        verify_step(inv, live, report, sources, anchored, made=ctx.ledger.anchors_made)
    return 1 if report.failed or not whole else 0


def probe_ports(report: RunReport, ports: Callable[[], probe.Probed]) -> None:
    """The preflight's port probe between the hosts: a blocked path, or one too narrow for the
    overlay's packets (its path MTU, measured in the same round), refuses the run (exit 2,
    nothing changed); a port it could not probe is said so, with why."""
    probing = time.monotonic()
    probed = ports()
    report.extra["seconds_port_probe"] = round(time.monotonic() - probing, 2)
    report.extra["ports_not_probed"] = probed.unprobed
    report.extra["path_mtu"] = probed.paths
    for line in (line for found in probed.unprobed.values() for line in found):
        report.note(f"preflight: {line}")
    refused = {h: probed.blocked.get(h, []) + probed.narrow.get(h, []) for h in {*probed.blocked, *probed.narrow}}
    for host, found in sorted(refused.items()):
        report.record(host, "preflight", "failed", "; ".join(found))
    if refused:
        raise Refused("preflight refused: " + "; ".join(f for _, found in sorted(refused.items()) for f in found))


def report_plan(planned: Context, report: RunReport, teardown: bool) -> int:
    """A dry run's report, or a refused run's: the plan, its restarts certain and conditional,
    its diffs; a refusal raises (exit 2, nothing changed)."""
    ledger, opts, ca = planned.ledger, planned.opts, planned.ca
    replay(planned, report)
    report.extra.update(dry_run=opts.dry_run, restarts={} if ledger.refusals else ledger.restarts)
    # what may restart besides, each on its condition (plan.Maybe); a refused run: nothing
    report.extra["may_restart"] = {} if ledger.refusals else ledger.may_restart
    report.extra["diffs"] = ledger.diffs
    if ledger.refusals and not opts.dry_run:
        report.extra["refused"] = True
        raise Refused("; ".join(f"{h}: {w}" for h, w in ledger.refusals.items()))
    if not teardown and not ledger.refusals:
        for name in planned.targets:  # join-node: the pairs of the joining worker
            report.record(name, "verify", "skipped", "dry run: no probes started")
    if ca is not None and ca.current is None and not teardown:
        report.note(f"would make a new CA in {ca.directory}")
    report.note("dry run: nothing was changed")
    return 2 if ledger.refusals else 0


def standing_anchors(inv: Inventory, nodes: list[Node], made: set[str]) -> dict[str, tuple[str, str]] | None:
    """The anchors as verify's probes: each one running (as the facts saw it, or created by
    this run after its host's last change, the way a probe would be) and shown by the store
    with its address, on its own host's registration. Any doubt, and None: fresh probes."""
    manager = next((n for n in nodes if n.name == Topology.of(inv).manager), None)
    held = consul.network_endpoints(inv, manager) if manager else None
    if held is None:
        return None
    found = {}
    for node in nodes:
        name = anchor.name(node)
        ip, on = held.get(name, ("", ""))
        if not ip or on != node.advertise_ip or not (anchor.present(node) or node.name in made):
            return None
        found[node.name] = (name, ip)
    return found


def verify_step(
    inv: Inventory,
    nodes: list[Node],
    report: RunReport,
    sources: list[Node] | None = None,
    anchored: bool = False,
    problems: dict[str, str] | None = None,
    made: set[str] | frozenset[str] = frozenset(),
) -> bool:
    """The ping matrix; its time and the time before it are figures of the report (bench/).

    ``anchored`` (a kv run that failed nowhere): the anchors ping each other, if the store
    shows them all (``made``: the hosts whose anchor this run made, after its host's last
    change); only if they fail are fresh probes started, whose result stands.
    `fab verify` alone always starts fresh probes. ``problems`` (host -> why) fail those
    hosts whatever their probes do: what fresh probes cannot see (steps/holdback.py)."""
    before = time.monotonic()
    report.extra["seconds_to_verify"] = round(before - report.started, 2)
    standing = standing_anchors(inv, nodes, set(made)) if anchored else None
    # a run that changed something proves the stream too, between the anchors (they serve it)
    stream = report.changes > 0
    matrix = verify.run(inv.network, nodes, sources, standing, inv.mtu, stream) if standing else None
    report.extra["verified_with"] = "anchors" if matrix is not None and matrix.ok else "probes"
    if matrix is None or not matrix.ok:
        matrix = verify.run(inv.network, nodes, sources, mtu=inv.mtu)
    report.extra["seconds_verify"] = round(time.monotonic() - before, 2)
    report.note(matrix.render())
    for host, lines in sorted(matrix.journals.items()):
        report.note(f"--- {host}: dockerd journal (last lines) ---\n{lines}")
    report.extra["ping_matrix"] = matrix.as_dict()
    failures = matrix.failures()
    hints = verify.diagnose(matrix, nodes)
    for (src, dst), hint in sorted(hints.items()):
        report.note(f"{src} -> {dst}: {hint}")
    failures += [f"{src} -> {dst}: {hint}" for (src, dst), hint in sorted(hints.items())]
    failures += [f"{host}: {why}" for host, why in sorted((problems or {}).items())]
    for node in nodes:
        if sources is not None and node not in sources and not any(f.startswith(f"{node.name} ") for f in failures):
            continue
        mine = [f for f in failures if f.startswith((f"{node.name} ", f"{node.name}:"))]
        if mine:
            report.record(node.name, "verify", "failed", "; ".join(mine))
        else:
            report.record(node.name, "verify", "ok", matrix.passed())
    return matrix.ok and not problems
