"""The swarm pipeline: no Consul, no cluster flags; swarm init, workers join, an attachable overlay."""

from __future__ import annotations

from overlaylab import render
from overlaylab.cluster import Node, parallel
from overlaylab.errors import OverlaylabError
from overlaylab.inventory import Inventory
from overlaylab.report import RunReport
from overlaylab.run import Options, manager_of, preflight_step, refuse, verify_step
from overlaylab.steps import anchor, consul, dockerd, network, swarm


def bootstrap(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport, only: str | None) -> int:
    """Swarm mode: no Consul, no cluster flags; swarm init, workers join, an attachable overlay."""
    manager = manager_of(nodes)
    targets = [n for n in nodes if only is None or n.name == only]
    preflight_step(inv, nodes, report, "swarm")
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
        stops = dockerd.restart_refusal(node, "removing the cluster flags", opts.allow_restart)
        if stops:
            refusals[node.name] = stops
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
    refuse(report, refusals)

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
    live = [n for n in nodes if n.name not in failed]
    verify_step(inv, live, report, [n for n in targets if n in live] if only else None)
    return 1 if report.failed else 0
