"""The tasks: bootstrap-cluster and join-node (the pipeline of the cluster's mode),
verify, status and teardown. Each runs in the frame of overlaylab.run."""

from __future__ import annotations

import shlex
import sys
from typing import Any

from fabric import Connection

from overlaylab import certs, peers, render, repairs, storetls
from overlaylab.checks import pathmtu, probe
from overlaylab.cluster import Node
from overlaylab.errors import InputError
from overlaylab.facts import VERIFY_SECTIONS
from overlaylab.inventory import Inventory
from overlaylab.mode import Mode
from overlaylab.options import Options
from overlaylab.pipelines import kv, swarm
from overlaylab.plan import Context, RunInput
from overlaylab.report import RunReport, columns
from overlaylab.run import auto_mtu, mode_step, preflight_step, run_steps, run_task, verify_step
from overlaylab.steps import consul, holdback, network, tls
from overlaylab.topology import Topology

__all__ = ["Options", "bootstrap", "docker_env", "join_node", "status", "teardown", "verify_only"]


BACKENDS = {Mode.KV: kv, Mode.SWARM: swarm}


def keeper(inv: Inventory, opts: Options) -> certs.Keeper | None:
    """The cluster's CA, read before any host is touched (an unreadable one: exit 2)."""
    if not inv.tls.on:
        if opts.reissue_certs:
            raise InputError(f"{inv.path}: --reissue-certs, but neither tls.docker_api nor tls.store is on")
        return None
    return certs.Keeper(inv.ca_dir, inv.cluster, opts.reissue_certs)


def _bootstrap(
    inv: Inventory, opts: Options, nodes: list[Node], report: RunReport, only: str | None, ca: certs.Keeper | None
) -> int:
    if only is not None and only == inv.manager.name:
        raise InputError(f"join-node: {only} is the manager; use bootstrap-cluster")
    report.extra.update(dry_run=opts.dry_run, restarts={}, diffs={})  # also when preflight refuses
    if opts.dry_run:
        report.extra["may_restart"] = {}
    mode = mode_step(inv, nodes, report)
    preflight_step(inv, nodes, report, mode)
    if inv.mtu_auto:
        inv = auto_mtu(inv, nodes, report)
    targets = [only] if only else [h.name for h in inv.hosts]
    ports = lambda: probe.check(inv, nodes, mode)  # noqa: E731
    backend = BACKENDS[mode]
    return run_steps(inv, opts, nodes, report, backend.BOOTSTRAP, targets, ports=ports, ca=ca, anchors=backend.ANCHORS)


def bootstrap(inv: Inventory, opts: Options) -> int:
    return run_task("bootstrap-cluster", inv, opts, _bootstrap, None, keeper(inv, opts))


def join_node(inv: Inventory, opts: Options, node: str) -> int:
    inv.host(node)  # an unknown name is an input error before any connection
    return run_task("join-node", inv, opts, _bootstrap, node, keeper(inv, opts))


def store_reader(inv: Inventory, nodes: list[Node]) -> Node:
    """The host whose view of the cluster a task reads: the manager, or, when it does not
    answer, another host (in HA mode its own agent still serves the store)."""
    return next((n for n in nodes if n.name == inv.manager.name), nodes[0])


def _verify_task(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    reader = store_reader(inv, nodes)
    no_quorum = consul.quorum_problem(inv, {n.name: n for n in nodes})
    if no_quorum:  # no network can be read, and no probe can join it: said as what it is
        for node in nodes:
            report.record(node.name, "verify", "failed", no_quorum)
        return 1
    if reader.facts.network is None:
        raise InputError(f"network {inv.network} does not exist on {reader.name}: run bootstrap-cluster first")
    return 0 if verify_step(inv, nodes, report, problems=unseen_problems(nodes)) else 1


DEAF = (
    "its overlay sandbox was made before dockerd's gossip was up (a restart) and never looks up peers: "
    "its containers neither reach nor are reached by those they did not see join "
    "(fresh probes ping, as long as each one's join event reaches it); "
    "a bootstrap-cluster re-run with --allow-restart restarts its dockerd, with them started after gossip"
)


def unseen_problems(nodes: list[Node]) -> dict[str, str]:
    """What fresh probes cannot see: a sandbox of the cluster's network with no miss
    watcher (steps/holdback.py), stale peers (peers.py)."""
    found = peers.stale_hosts(nodes)
    for n in nodes:
        if holdback.deaf(n):
            found[n.name] = DEAF + (f"; {found[n.name]}" if n.name in found else "")
    return found


def verify_only(inv: Inventory, opts: Options) -> int:
    sections = VERIFY_SECTIONS + (("consul", "store_leader") if Topology.of(inv).ha else ())  # HA: a quorum?
    return run_task("verify", inv, opts, _verify_task, facts=sections, carry_on=True)


def _status_task(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    manager = store_reader(inv, nodes)
    registered: set[str] | None = None
    if consul.running(manager):
        try:
            registered = consul.registered(inv, manager)
        except Exception as exc:
            report.note(f"Consul not readable: {exc}")
    rows = []
    needs = mends(inv, opts, nodes, report, registered)
    made = next((network.effective_mtu(n.facts.network) for n in nodes if n.facts.network), None)
    carried = made or inv.mtu or network.DEFAULT_MTU  # the network's, else the one a run would make
    paths, links = pathmtu.measure(nodes, carried)
    for node in nodes:
        f = node.facts
        is_registered = None if registered is None else f"{node.advertise_ip}:2376" in registered
        narrow = pathmtu.narrowest(paths.get(node.name, {}))
        rows.append(
            {
                "host": node.name,
                "role": node.host.role,
                "engine": f.version,
                "docker": f.docker_active,
                # docker info names the store alike over HTTP and HTTPS: the drop-in tells which
                "cluster_store": f.cluster_store + (" (tls)" if storetls.secure(f.dropin) else ""),
                "cluster_advertise": f.cluster_advertise,
                "dropin": "overlaylab" if render.is_ours(f.dropin) else ("other" if f.dropin is not None else "none"),
                "registered": is_registered,
                "overlay_networks": f.overlays,
                "swarm": f.swarm_state,
                "stray_threads": f.stray_threads,
                "tls_expires": tls.expiry(node),
                "link_mtu": links.get(node.name) or None,  # of the interface holding the cluster address
                "network_mtu": network.effective_mtu(f.network) if f.network else None,
                "narrowest_path": {"to": narrow[0], "mtu": narrow[1]} if narrow else None,
                "repair": needs[node.name],
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
            *(["tls_expires"] if any(r["tls_expires"] for r in rows) or inv.tls.docker_api else []),
            "link_mtu",
            "network_mtu",
        ]

        def path(row: dict[str, Any]) -> str:
            found = row["narrowest_path"]
            return f"{found['mtu']} (to {found['to']})" if found else "-"

        table = [[str(r[c]) for c in cols] + [path(r), ",".join(r["overlay_networks"]) or "-"] for r in rows]  # type: ignore[arg-type]
        print("\n".join(columns([[c.upper() for c in cols] + ["NARROWEST_PATH", "OVERLAYS"], *table])), file=sys.stdout)
    if inv.tls.docker_api:
        report.note(admin_line(inv))
    broken = [f"{name} ({', '.join(why)})" for name, why in needs.items() if why]
    if broken:  # said after the table, on stderr with --json
        report.note("a re-run of bootstrap-cluster repairs: " + "; ".join(broken))
    too_narrow = [
        said
        for src, found in paths.items()
        for dst, size in found.items()
        if (said := pathmtu.too_narrow(src, dst, size, carried))
    ]
    for said in too_narrow:  # no re-run mends the path: the underlay, or network.mtu
        report.note(said)
    if Topology.of(inv).ha and inv.mode != Mode.SWARM:
        by_name = {n.name: n for n in nodes}
        report.extra["consul"] = line = consul.quorum_line(inv, by_name)
        report.note(line)
        if not consul.leader(inv, by_name):
            return 1  # the store can be neither read nor written: nothing on the overlay changes
    return 1 if too_narrow else 0


def admin_line(inv: Inventory) -> str:
    """The admin's certificate, as status reads it (never made here: status changes nothing)."""
    directory = inv.ca_dir
    path = directory / certs.CLIENT_CERT
    cert = certs.read_cert(path)
    if cert is None:
        return f"admin certificate: none in {directory} (bootstrap-cluster makes it)"
    renew = " (a re-run renews it)" if certs.needs_renewal(cert) else ""
    return f"admin certificate in {directory}: valid until {tls.day(certs.expires(cert))}{renew}"


def mends(
    inv: Inventory, opts: Options, nodes: list[Node], report: RunReport, registered: set[str] | None
) -> dict[str, list[str]]:
    """What a bootstrap-cluster re-run would mend, per host of a kv cluster (our drop-in on it),
    as the run's own plan reads it: the list of repairs (repairs/), evaluated on these facts.
    A host that did not answer is left out, as a run leaves a failed host out."""
    given = RunInput(inv, opts, Topology.of(inv), tuple(n.name for n in nodes))
    view = Context(given, {n.name: n for n in nodes}, report, dry=True)
    view.ledger.failed.update(h.name for h in inv.hosts if h.name not in view.nodes)
    seen = repairs.Seen(frozenset(registered) if registered is not None else None)
    return {n.name: repairs.found(view, n, seen) if kv_host(n) else [] for n in nodes}


def kv_host(node: Node) -> bool:
    """A host of a kv cluster of ours: our drop-in, with a cluster store in it (read from the
    host itself: a host whose `docker info` stalls must not hide the others' repairs)."""
    return render.is_ours_with_store(node.facts.dropin)


def status(inv: Inventory, opts: Options) -> int:
    return run_task("status", inv, opts, _status_task, carry_on=True)


def _teardown(inv: Inventory, opts: Options, nodes: list[Node], report: RunReport) -> int:
    report.extra.update(dry_run=opts.dry_run, restarts={}, diffs={})
    mode = mode_step(inv, nodes, report)
    return run_steps(inv, opts, nodes, report, BACKENDS[mode].TEARDOWN, [n.name for n in nodes], teardown=True)


def teardown(inv: Inventory, opts: Options) -> int:
    code = run_task("teardown", inv, opts, _teardown)
    if opts.remove_ca and not opts.dry_run:
        where = inv.ca_dir
        if code != 0:
            print(f"kept the CA in {where}: the teardown did not finish (exit {code})", file=sys.stderr)
        else:
            print(certs.remove(where), file=sys.stderr)
    return code


def docker_env(inv: Inventory, name: str) -> str:
    """What `docker-machine env` printed: `export` lines a shell can eval, and the matching
    `docker context create`. The host is reached at the inventory's address (an ssh
    alias resolved through ~/.ssh/config, as Fabric connects); no host is contacted."""
    host = inv.host(name)
    if not inv.tls.docker_api:
        raise InputError(f"{inv.path}: tls.docker_api is not on: no host serves the Docker API")
    keeper = certs.Keeper(inv.ca_dir, inv.cluster)
    if keeper.found is None:
        raise InputError(f"{keeper.directory}: no CA for cluster {inv.cluster}: run bootstrap-cluster first")
    directory, _ = certs.ensure_client(keeper.found)
    address = str(Connection(host.address).host)  # a HostName from ~/.ssh/config, else the address itself
    url = f"tcp://{address}:{certs.API_PORT}"
    q = shlex.quote
    context = f"docker context create {q(inv.cluster + '-' + host.name)} --docker " + q(
        f"host={url},ca={directory / certs.CA_CERT},cert={directory / certs.CLIENT_CERT},"
        f"key={directory / certs.CLIENT_KEY}"
    )
    return "\n".join(
        [
            f"export DOCKER_HOST={q(url)}",
            "export DOCKER_TLS_VERIFY=1",
            f"export DOCKER_CERT_PATH={q(str(directory))}",
            f"# or, as a docker context: {context}",
            f"# run this command to configure your shell: eval $(fab docker-env --node {host.name})",
        ]
    )
