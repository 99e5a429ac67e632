"""The tasks' pipelines: facts for every host first, a plan, then the steps in the
order that keeps the legacy overlay whole (Consul with a leader; the manager's
dockerd; Consul again; then the workers; gossip up before any container joins).

Exit codes: 0 all good; 1 a host failed after changes began; 2 bad input or a
refused preflight/plan, in which case nothing was changed anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

from overlaylab import cluster, render
from overlaylab import mode as modes
from overlaylab.cluster import Node, parallel
from overlaylab.errors import InputError, OverlaylabError
from overlaylab.inventory import Inventory
from overlaylab.report import RunReport
from overlaylab.steps import anchor, consul, dockerd, network, preflight, swarm, verify


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    json: bool = False
    accept_new_host_keys: bool = False
    force_leave_swarm: bool = False
    leave_other_swarm: bool = False
    allow_restart: bool = False
    sudo_password: str | None = None


class Refused(InputError):
    """Preflight or plan refused: nothing has been changed on any host."""


def _open(inv: Inventory, opts: Options) -> list[Node]:
    nodes = cluster.connect_all(inv, list(inv.hosts), opts.accept_new_host_keys, opts.sudo_password)
    try:
        cluster.read_facts(inv, nodes)
    except BaseException:
        cluster.close_all(nodes)
        raise
    return nodes


def _finish(report: RunReport, code: int) -> int:
    if report.json_mode:
        print(json.dumps(report.document(code), indent=2))
    elif report.outcomes:
        report.note(report.table())
    return code


def _manager(nodes: list[Node]) -> Node:
    return next(n for n in nodes if n.host.is_manager)


def _preflight(inv: Inventory, nodes: list[Node], report: RunReport, mode: str = "kv") -> None:
    problems = preflight.check(inv, nodes, mode)
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


def run_task(task: str, inv: Inventory, opts: Options, fn: object, *args: object) -> int:
    """Common frame: report, connections, facts; maps every path to an exit code."""
    report = RunReport(task, [h.name for h in inv.hosts], opts.json)
    try:
        nodes = _open(inv, opts)
    except InputError as exc:
        report.note(f"error: {exc}")
        return _finish(report, 2)
    try:
        code = fn(inv, opts, nodes, report, *args)  # type: ignore[operator]
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
    return _finish(report, int(code))


def _mode(inv: Inventory, nodes: list[Node], report: RunReport) -> str:
    mode, why = modes.resolve(inv.mode, nodes)
    report.extra["mode"] = mode
    report.note(why)
    return mode


def _bootstrap(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport, only: str | None) -> int:
    manager = _manager(nodes)
    if only is not None and only == manager.name:
        raise InputError(f"join-node: {only} is the manager; use bootstrap-cluster")
    if _mode(inv, nodes, report) == "swarm":
        return _bootstrap_swarm(inv, opts, nodes, report, only)
    started = report.started
    targets = [n for n in nodes if only is None or n.name == only]
    _preflight(inv, nodes, report)

    # Plan everything before changing anything.
    refusals: dict[str, str] = {}
    consul_state, consul_why = consul.state(inv, manager)
    if consul_state == "refuse":
        refusals[manager.name] = consul_why
    if only is not None and consul_state != "ok":
        refusals[manager.name] = f"Consul is not running as wanted ({consul_why}): run bootstrap-cluster first"
    plans = {n.name: dockerd.plan(inv, n, manager.advertise_ip) for n in targets}
    wanted_store = f"consul://{manager.advertise_ip}:{inv.consul_port}"
    restart = {n.name: _restart_reason(n, plans[n.name], wanted_store) for n in targets}
    for node in targets:
        why = swarm.refusal(node, opts.force_leave_swarm)
        if why:
            refusals[node.name] = why
        if restart[node.name] and node.facts.foreign_containers:
            running = ", ".join(node.facts.foreign_containers)
            if not opts.allow_restart:
                refusals[node.name] = (
                    f"dockerd must restart, which stops these running containers: {running}; "
                    "pass --allow-restart to go ahead"
                )
    if opts.dry_run:
        return _dry_run(inv, report, manager, targets, plans, restart, consul_state, consul_why, refusals)
    if refusals:
        for name, why in refusals.items():
            report.record(name, "plan", "failed", why)
        raise Refused("; ".join(f"{h}: {w}" for h, w in refusals.items()))

    # Step 2: leave any swarm.
    def leave(node: Node) -> None:
        if swarm.needed(node):
            report.record(node.name, "swarm", "changed", swarm.leave(node))
        else:
            report.record(node.name, "swarm", "ok", "not in a swarm")

    failed: set[str] = set()
    for i, exc in parallel(targets, leave).items():
        report.record(targets[i].name, "swarm", "failed", str(exc))
        failed.add(targets[i].name)

    # Step 3: Consul on the manager, with a leader. Nothing else proceeds without it.
    try:
        changed, why = consul.ensure(inv, manager)
        leader = consul.wait_leader(inv, manager)
        report.record(manager.name, "consul", "changed" if changed else "ok", f"{why}; leader {leader}")
    except OverlaylabError as exc:
        report.record(manager.name, "consul", "failed", str(exc))
        return 1

    # Steps 4-5: drop-ins; the manager first, Consul again, then the workers.
    restarted: set[str] = set()

    def converge(node: Node) -> None:
        plan = plans[node.name]
        try:
            reason = restart[node.name]
            if reason:
                restarted.add(node.name)
                detail = dockerd.apply(plan, before_restart=anchor.stop_command(node), expect_peers=node is not manager)
                report.record(node.name, "dockerd", "changed", detail if plan.changed else reason)
            else:
                if not node.facts.gossip:
                    dockerd.wait_ready(node)
                report.record(node.name, "dockerd", "ok", "drop-in up to date, dockerd running with it")
        except OverlaylabError as exc:
            report.record(node.name, "dockerd", "failed", str(exc))
            failed.add(node.name)
            if anchor.present(node):
                # The rollback restarted dockerd and it is ready again: its anchor, stopped
                # with the daemon, comes back only now (see steps/anchor.py).
                with contextlib.suppress(OverlaylabError):
                    anchor.ensure(node, inv.network, force=True)

    if manager in targets and manager.name not in failed:
        converge(manager)
        if manager.name in failed:
            return 1
        if restart[manager.name]:
            try:
                consul.wait_leader(inv, manager)
            except OverlaylabError as exc:
                report.record(manager.name, "consul", "failed", f"after the manager's restart: {exc}")
                return 1
    # One worker at a time: dockerd joins gossip through one registered neighbor and
    # never retries; two daemons restarting at once can pick each other and each stay
    # alone (seen on the lab, ~1 run in 7 with parallel restarts).
    for worker in [n for n in targets if n is not manager and n.name not in failed]:
        converge(worker)

    # Step 6: every dockerd registered in Consul.
    live = [n for n in nodes if n.name not in failed]
    try:
        registered = consul.wait_registered(inv, manager, {n.name: n.advertise_ip for n in live})
    except Exception as exc:
        registered = {}
        report.note(f"reading docker/nodes/ from Consul failed: {exc}")
    for node in live:
        if registered.get(node.name):
            report.record(node.name, "registered", "ok", f"docker/nodes/{node.advertise_ip}:2376")
        else:
            report.record(node.name, "registered", "failed", f"no docker/nodes/{node.advertise_ip}:2376 in Consul")
            failed.add(node.name)

    # Step 7: the overlay network, once.
    if manager.name not in failed:
        try:
            changed, why = network.ensure(inv, manager)
            report.record(manager.name, "network", "changed" if changed else "ok", why)
        except OverlaylabError as exc:
            report.record(manager.name, "network", "failed", str(exc))
            return 1
    else:
        return 1

    # Step 7b: an anchor container per host keeps the overlay sandbox alive (see steps/anchor.py).
    live = [n for n in nodes if n.name not in failed]

    def anchored(node: Node) -> None:
        created = anchor.ensure(node, inv.network, force=node.name in restarted)
        report.record(node.name, "anchor", "changed" if created else "ok", "created" if created else "running")

    for i, error in parallel(live, anchored).items():
        report.record(live[i].name, "anchor", "failed", str(error))
        failed.add(live[i].name)

    # Step 8: the ping matrix (probes are not changes).
    report.extra["seconds_to_verify"] = round(time.monotonic() - started, 2)
    live = [n for n in nodes if n.name not in failed]
    _verify(inv, live, report, [n for n in targets if n in live] if only else None)
    report.extra["seconds_verify"] = round(time.monotonic() - started - float(report.extra["seconds_to_verify"]), 2)  # type: ignore[arg-type]
    return 1 if report.failed else 0


def _bootstrap_swarm(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport, only: str | None) -> int:
    """Swarm mode: no Consul, no cluster flags; swarm init, workers join, an attachable overlay."""
    started = report.started
    manager = _manager(nodes)
    targets = [n for n in nodes if only is None or n.name == only]
    _preflight(inv, nodes, report, "swarm")
    refusals: dict[str, str] = {}
    m_state, m_why = swarm.manager_state(manager, opts.leave_other_swarm)
    if m_state == "refuse":
        refusals[manager.name] = m_why
    if only is not None and m_state != "ok":
        refusals[manager.name] = f"no swarm managed by {manager.name} ({m_why}): run bootstrap-cluster first"
    w_state = {n.name: swarm.worker_state(n, manager, opts.leave_other_swarm) for n in targets if n is not manager}
    for name, (state, why) in w_state.items():
        if state == "refuse":
            refusals[name] = why
    # Cluster flags of ours (a kv cluster before) come out before the swarm forms.
    unflag = [n for n in targets if render.is_ours(n.facts.dropin)]
    for node in unflag:
        if node.facts.foreign_containers and not opts.allow_restart:
            refusals[node.name] = (
                "removing the cluster flags restarts dockerd, which stops: "
                f"{', '.join(node.facts.foreign_containers)}; pass --allow-restart to go ahead"
            )
    if opts.dry_run:
        report.extra["dry_run"] = True
        for node in unflag:
            report.record(node.name, "dockerd", "changed", "would restore the original drop-in (no cluster flags)")
        if manager in targets:
            report.record(manager.name, "swarm", "ok" if m_state == "ok" else "changed", m_why)
        for name, (state, why) in w_state.items():
            report.record(name, "swarm", "ok" if state == "ok" else ("failed" if state == "refuse" else "changed"), why)
        for name, why in refusals.items():
            report.record(name, "plan", "failed", why)
        report.note("dry run: nothing was changed")
        return 2 if refusals else 0
    if refusals:
        for name, why in refusals.items():
            report.record(name, "plan", "failed", why)
        raise Refused("; ".join(f"{h}: {w}" for h, w in refusals.items()))

    failed: set[str] = set()
    for node in sorted(unflag, key=lambda n: n is not manager):
        try:
            if anchor.remove(node):  # kv leftovers: swarm mode needs no anchor
                report.record(node.name, "anchor", "changed", "removed (a kv-mode leftover)")
            report.record(node.name, "dockerd", "changed", dockerd.restore_original(node) or "no drop-in of ours")
            network.refresh(inv, node)
        except OverlaylabError as exc:
            report.record(node.name, "dockerd", "failed", str(exc))
            failed.add(node.name)
    if manager.name in failed:
        return 1
    if manager in targets and consul.remove(inv, manager):
        report.record(manager.name, "consul", "changed", "removed (swarm mode needs no Consul)")
    try:
        if m_state == "ok":
            report.record(manager.name, "swarm", "ok", m_why)
        elif manager in targets:
            report.record(
                manager.name, "swarm", "changed", swarm.init(manager, inv.swarm_addr_pool, m_state == "reinit")
            )
    except OverlaylabError as exc:
        report.record(manager.name, "swarm", "failed", str(exc))
        return 1
    joining = [n for n in targets if n is not manager and w_state[n.name][0] != "ok" and n.name not in failed]
    token = swarm.worker_token(manager) if joining else ""

    def join(node: Node) -> None:
        try:
            detail = swarm.join(node, manager, token, w_state[node.name][0] == "rejoin")
            report.record(node.name, "swarm", "changed", detail)
        except OverlaylabError as exc:
            report.record(node.name, "swarm", "failed", str(exc))
            failed.add(node.name)

    for node in targets:
        if node is not manager and node not in joining and node.name not in failed:
            report.record(node.name, "swarm", "ok", w_state[node.name][1])
    parallel(joining, join)
    if m_state != "ok":
        network.refresh(inv, manager)
    try:
        changed, why = network.ensure(inv, manager, swarm=True)
        report.record(manager.name, "network", "changed" if changed else "ok", why)
    except OverlaylabError as exc:
        report.record(manager.name, "network", "failed", str(exc))
        return 1
    report.extra["seconds_to_verify"] = round(time.monotonic() - started, 2)
    live = [n for n in nodes if n.name not in failed]
    _verify(inv, live, report, [n for n in targets if n in live] if only else None)
    report.extra["seconds_verify"] = round(time.monotonic() - started - float(report.extra["seconds_to_verify"]), 2)  # type: ignore[arg-type]
    return 1 if report.failed else 0


def _restart_reason(node: Node, plan: dockerd.Plan, wanted_store: str) -> str | None:
    """Why dockerd must restart, or None: only a changed drop-in or a daemon not running as wanted."""
    f = node.facts
    if plan.changed:
        return "drop-in changed"
    if f.docker_active != "active":
        return f"docker.service is {f.docker_active}"
    if f.cluster_store != wanted_store:
        return f"dockerd runs with cluster store {f.cluster_store or 'none'}, the drop-in says {wanted_store}"
    if f.stray_threads:
        return (
            f"dockerd has {f.stray_threads} thread(s) left in a deleted network namespace (Docker 20.10 overlay "
            "defect, see steps/anchor.py): restarted to clear them"
        )
    return None


def _verify(inv: Inventory, nodes: list[Node], report: RunReport, sources: list[Node] | None = None) -> bool:
    matrix = verify.run(inv.network, nodes, sources)
    report.note(matrix.render())
    for host, lines in sorted(matrix.journals.items()):
        report.note(f"--- {host}: dockerd journal (last lines) ---\n{lines}")
    report.extra["ping_matrix"] = matrix.as_dict()
    failures = matrix.failures()
    for node in nodes:
        if sources is not None and node not in sources and not any(f.startswith(f"{node.name} ") for f in failures):
            continue
        mine = [f for f in failures if f.startswith((f"{node.name} ", f"{node.name}:"))]
        if mine:
            report.record(node.name, "verify", "failed", "; ".join(mine))
        else:
            report.record(node.name, "verify", "ok", "pings every other host by IP and by name")
    return matrix.ok


def _dry_run(
    inv: Inventory,
    report: RunReport,
    manager: Node,
    targets: list[Node],
    plans: dict[str, dockerd.Plan],
    restart: dict[str, str | None],
    consul_state: str,
    consul_why: str,
    refusals: dict[str, str],
) -> int:
    report.extra["dry_run"] = True
    report.extra["diffs"] = {name: plan.diff() for name, plan in plans.items() if plan.changed}
    for node in targets:
        if swarm.needed(node):
            report.record(node.name, "swarm", "changed", f"would leave the swarm ({node.facts.swarm_state})")
        if node is manager:
            status = "ok" if consul_state == "ok" else ("failed" if consul_state == "refuse" else "changed")
            report.record(node.name, "consul", status, consul_why if status != "changed" else f"would {consul_state}")
        plan = plans[node.name]
        if restart[node.name]:
            stops = node.facts.foreign_containers
            detail = (
                "would write the drop-in and restart dockerd"
                if plan.changed
                else f"would restart: {restart[node.name]}"
            ) + (f"; the restart stops: {', '.join(stops)}" if stops else "")
            report.record(node.name, "dockerd", "changed", detail)
            if plan.changed and not report.json_mode:
                report.note(plan.diff().rstrip())
        else:
            report.record(node.name, "dockerd", "ok", "drop-in up to date")
        if node.name in refusals:
            report.record(node.name, "plan", "failed", refusals[node.name])
    if manager in targets:
        if manager.facts.network is None:
            report.record(manager.name, "network", "changed", f"would create {inv.network}")
        else:
            diffs = network.differences(inv, manager.facts.network)
            report.record(manager.name, "network", "failed" if diffs else "ok", "; ".join(diffs) or "exists")
    report.note("dry run: nothing was changed")
    return 2 if refusals else 0


def bootstrap(inv: Inventory, opts: Options) -> int:
    return run_task("bootstrap-cluster", inv, opts, _bootstrap, None)


def join_node(inv: Inventory, opts: Options, node: str) -> int:
    inv.host(node)  # an unknown name is an input error before any connection
    return run_task("join-node", inv, opts, _bootstrap, node)


def _verify_task(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    manager = _manager(nodes)
    if manager.facts.network is None:
        raise InputError(f"network {inv.network} does not exist on {manager.name}: run bootstrap-cluster first")
    return 0 if _verify(inv, nodes, report) else 1


def verify_only(inv: Inventory, opts: Options) -> int:
    return run_task("verify", inv, opts, _verify_task)


def _status_task(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    manager = _manager(nodes)
    registered: set[str] | None = None
    if consul.state(inv, manager)[0] == "ok":
        try:
            registered = consul.registered(inv, manager)
        except Exception as exc:
            report.note(f"Consul not readable: {exc}")
    rows = []
    for node in nodes:
        f = node.facts
        rows.append(
            {
                "host": node.name,
                "role": node.host.role,
                "engine": f.version,
                "docker": f.docker_active,
                "cluster_store": f.cluster_store,
                "cluster_advertise": f.cluster_advertise,
                "dropin": "overlaylab" if render.is_ours(f.dropin) else ("other" if f.dropin is not None else "none"),
                "registered": None if registered is None else f"{node.advertise_ip}:2376" in registered,
                "overlay_networks": f.overlays,
                "swarm": f.swarm_state,
                "stray_threads": f.stray_threads,
            }
        )
    report.extra["status"] = rows
    if not report.json_mode:
        cols = [
            "host",
            "role",
            "engine",
            "docker",
            "cluster_store",
            "cluster_advertise",
            "dropin",
            "registered",
            "stray_threads",
        ]
        table = [[str(r[c]) for c in cols] + [",".join(r["overlay_networks"]) or "-"] for r in rows]  # type: ignore[arg-type]
        head = [c.upper() for c in cols] + ["OVERLAYS"]
        widths = [max(len(x) for x in col) for col in zip(head, *table, strict=True)]
        for line in [head, *table]:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)), file=sys.stdout)
    return 0


def status(inv: Inventory, opts: Options) -> int:
    return run_task("status", inv, opts, _status_task)


def _teardown(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    manager = _manager(nodes)
    blockers = {}
    for node in nodes:
        needs_restart = "10-machine.conf" in node.facts.backup or "10-machine.conf.absent" in node.facts.backup
        if needs_restart and node.facts.foreign_containers and not opts.allow_restart:
            blockers[node.name] = (
                f"restoring the drop-in restarts dockerd, which stops: {', '.join(node.facts.foreign_containers)}; "
                "pass --allow-restart to go ahead"
            )
    if blockers:
        for name, why in blockers.items():
            report.record(name, "plan", "failed", why)
        raise Refused("; ".join(f"{h}: {w}" for h, w in blockers.items()))
    if opts.dry_run:
        report.note("dry run: teardown would restore the original drop-ins, remove Consul and the network")
        return 0

    def probes(node: Node) -> None:
        ours = [name for name, role in node.facts.containers.items() if role == "probe"]
        if ours:
            node.sh("docker rm -f " + " ".join(ours) + " >/dev/null")
            report.record(node.name, "probes", "changed", f"removed {', '.join(ours)}")

    parallel(nodes, probes)

    def unanchor(node: Node) -> None:
        if anchor.remove(node):
            report.record(node.name, "anchor", "changed", "removed")

    parallel(nodes, unanchor)
    try:
        result = network.remove(inv, manager)
        if result == "removed":
            report.record(manager.name, "network", "changed", f"removed {inv.network}")
        else:
            report.record(manager.name, "network", "ok", result or "absent")
    except OverlaylabError as exc:
        report.record(manager.name, "network", "failed", str(exc))

    def restore(node: Node) -> None:
        try:
            done = dockerd.restore_original(node)
            report.record(node.name, "dockerd", "changed" if done else "ok", done or "no drop-in of overlaylab's")
        except OverlaylabError as exc:
            report.record(node.name, "dockerd", "failed", str(exc))

    if _mode(inv, nodes, report) == "swarm":
        for node in [*(n for n in nodes if n is not manager), manager]:  # workers first, then the manager
            try:
                if swarm.leave_swarm(node):
                    report.record(node.name, "swarm", "changed", "left the swarm")
                else:
                    report.record(node.name, "swarm", "ok", "not in a swarm")
            except OverlaylabError as exc:
                report.record(node.name, "swarm", "failed", str(exc))
    parallel([n for n in nodes if n is not manager], restore)
    restore(manager)
    try:
        removed = consul.remove(inv, manager)
        report.record(manager.name, "consul", "changed" if removed else "ok", "removed" if removed else "absent")
    except OverlaylabError as exc:
        report.record(manager.name, "consul", "failed", str(exc))
    return 1 if report.failed else 0


def teardown(inv: Inventory, opts: Options) -> int:
    return run_task("teardown", inv, opts, _teardown)
