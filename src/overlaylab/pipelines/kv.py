"""The kv pipeline (the tutorial's): Consul with a leader; the manager's dockerd; Consul
again; then the workers one at a time; gossip up before any container joins the overlay."""

from __future__ import annotations

import contextlib

from overlaylab.cluster import Node, parallel
from overlaylab.errors import OverlaylabError
from overlaylab.inventory import Inventory
from overlaylab.report import RunReport
from overlaylab.run import Options, manager_of, preflight_step, refuse, verify_step
from overlaylab.steps import anchor, consul, dockerd, network, swarm


def bootstrap(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport, only: str | None) -> int:
    """kv mode; with ``only``, join-node of that worker."""
    manager = manager_of(nodes)
    targets = [n for n in nodes if only is None or n.name == only]
    preflight_step(inv, nodes, report)

    # Plan everything before changing anything.
    refusals: dict[str, str] = {}
    consul_state, consul_why = consul.state(inv, manager)
    if consul_state == "refuse":
        refusals[manager.name] = consul_why
    if only is not None and consul_state != "ok":
        refusals[manager.name] = f"Consul is not running as wanted ({consul_why}): run bootstrap-cluster first"
    plans = {n.name: dockerd.plan(inv, n, manager.advertise_ip) for n in targets}
    wanted_store = f"consul://{manager.advertise_ip}:{inv.consul_port}"
    restart = {n.name: restart_reason(n, plans[n.name], wanted_store) for n in targets}
    for node in targets:
        why = swarm.refusal(node, opts.force_leave_swarm)
        if why:
            refusals[node.name] = why
        reason = restart[node.name]
        stops = dockerd.restart_refusal(node, reason, opts.allow_restart) if reason else None
        if stops:
            refusals[node.name] = stops
    if opts.dry_run:
        return dry_run(inv, report, manager, targets, plans, restart, consul_state, consul_why, refusals)
    refuse(report, refusals)

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
    live = [n for n in nodes if n.name not in failed]
    verify_step(inv, live, report, [n for n in targets if n in live] if only else None)
    return 1 if report.failed else 0


def restart_reason(node: Node, plan: dockerd.Plan, wanted_store: str) -> str | None:
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


def dry_run(
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
