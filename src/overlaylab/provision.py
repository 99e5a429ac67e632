"""The tasks: bootstrap-cluster and join-node (the pipeline of the cluster's mode),
verify, status and teardown. Each runs in the frame of overlaylab.run."""

from __future__ import annotations

import sys

from overlaylab import render
from overlaylab.cluster import Node, parallel
from overlaylab.errors import InputError, OverlaylabError
from overlaylab.inventory import Inventory
from overlaylab.pipelines import kv
from overlaylab.pipelines import swarm as swarm_pipeline
from overlaylab.report import RunReport, columns
from overlaylab.run import Options, manager_of, mode_step, refuse, run_task, verify_step
from overlaylab.steps import anchor, consul, dockerd, network, swarm

__all__ = ["Options", "bootstrap", "join_node", "status", "teardown", "verify_only"]


def _bootstrap(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport, only: str | None) -> int:
    if only is not None and only == manager_of(nodes).name:
        raise InputError(f"join-node: {only} is the manager; use bootstrap-cluster")
    pipeline = swarm_pipeline.bootstrap if mode_step(inv, nodes, report) == "swarm" else kv.bootstrap
    return pipeline(inv, opts, nodes, report, only)


def bootstrap(inv: Inventory, opts: Options) -> int:
    return run_task("bootstrap-cluster", inv, opts, _bootstrap, None)


def join_node(inv: Inventory, opts: Options, node: str) -> int:
    inv.host(node)  # an unknown name is an input error before any connection
    return run_task("join-node", inv, opts, _bootstrap, node)


def _verify_task(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    manager = manager_of(nodes)
    if manager.facts.network is None:
        raise InputError(f"network {inv.network} does not exist on {manager.name}: run bootstrap-cluster first")
    return 0 if verify_step(inv, nodes, report) else 1


def verify_only(inv: Inventory, opts: Options) -> int:
    return run_task("verify", inv, opts, _verify_task)


def _status_task(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    manager = manager_of(nodes)
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
        print("\n".join(columns([[c.upper() for c in cols] + ["OVERLAYS"], *table])), file=sys.stdout)
    return 0


def status(inv: Inventory, opts: Options) -> int:
    return run_task("status", inv, opts, _status_task)


def _teardown(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    manager = manager_of(nodes)
    blockers = {
        node.name: why
        for node in nodes
        if dockerd.has_backup(node)
        and (why := dockerd.restart_refusal(node, "restoring the drop-in", opts.allow_restart))
    }
    refuse(report, blockers)
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

    if mode_step(inv, nodes, report) == "swarm":
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
