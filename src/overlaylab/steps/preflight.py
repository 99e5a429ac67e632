"""Step 1: everything that must hold before any host is changed. Problems are
collected for all hosts and reported together; any problem means exit 2."""

from __future__ import annotations

from collections import defaultdict

from overlaylab import render
from overlaylab.cluster import Node
from overlaylab.inventory import Inventory
from overlaylab.mode import Mode, engine_problem


def host_problems(inv: Inventory, node: Node, mode: str = Mode.KV) -> list[str]:
    f = node.facts
    problems = []
    if f.docker_active != "active":
        problems.append(f"docker.service is {f.docker_active or 'not installed'}, it must be installed and running")
    if not f.advertise_ips:
        problems.append(f"advertise {node.host.advertise!r}: no such interface or address with an IPv4 address")
    if mode == Mode.SWARM:
        return problems  # swarm mode writes no drop-in: the cluster-store checks do not apply
    engine = engine_problem(node)
    if engine:
        problems.append(engine + " (or set mode: swarm in the inventory)")
    if f.daemon_json_error:
        problems.append(f"/etc/docker/daemon.json is {f.daemon_json_error}")
    clash = sorted(k for k in (f.daemon_json or {}) if k.startswith("cluster-"))
    if clash:
        problems.append(
            f"/etc/docker/daemon.json sets {', '.join(clash)}: with our drop-in's flags dockerd would not start"
        )
    if f.exec_start is None:
        problems.append("docker.service has no ExecStart")
    else:
        try:
            base = render.base_command(f.exec_start, f.dropin)
        except ValueError as exc:
            problems.append(f"cannot parse docker.service ExecStart: {exc}")
        else:
            tcp = render.insecure_tcp(base)
            if tcp:
                problems.append(
                    f"dockerd listens on {tcp} without --tlsverify (an unauthenticated root API): "
                    "configure TLS or remove it before overlaylab writes its drop-in"
                )
    return problems


def check(inv: Inventory, nodes: list[Node], mode: str = Mode.KV) -> dict[str, list[str]]:
    """Problems by host name (empty when all is well)."""
    problems: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        problems[node.name].extend(host_problems(inv, node, mode))
    by_hostname: dict[str, list[str]] = defaultdict(list)
    by_ip: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        by_hostname[node.facts.hostname].append(node.name)
        if node.advertise_ip:
            by_ip[node.advertise_ip].append(node.name)
    for hostname, names in by_hostname.items():
        if len(names) > 1:
            for name in names:
                others = ", ".join(n for n in names if n != name)
                problems[name].append(
                    f"hostname {hostname!r} is also the hostname of {others}: the overlay's gossip names nodes "
                    "by hostname, so duplicates break cross-host traffic"
                )
    for ip, names in by_ip.items():
        if len(names) > 1:
            for name in names:
                problems[name].append(
                    f"advertise address {ip} is shared with {', '.join(n for n in names if n != name)}"
                )
    return {name: probs for name, probs in problems.items() if probs}
