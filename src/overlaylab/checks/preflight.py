"""Step 1: everything that must hold before any host is changed. Problems are
collected for all hosts and reported together; any problem means exit 2."""

from __future__ import annotations

from collections import defaultdict

from overlaylab import certs, render, storetls
from overlaylab.checks import probe
from overlaylab.cluster import Node
from overlaylab.errors import InputError
from overlaylab.facts import HostFacts, parse_version
from overlaylab.inventory import Inventory
from overlaylab.mode import Mode, engine_problem
from overlaylab.ports import CONSUL, cluster_ports, on_host
from overlaylab.steps import consul
from overlaylab.topology import Topology

PROBE_IMAGE = "busybox:latest"  # the anchors' and verify's probes
MIN_KERNEL = (3, 16)  # the oldest kernel Docker's overlay driver supports


def kernel_problems(f: HostFacts) -> list[str]:
    problems = []
    if f.vxlan == "missing":
        problems.append(
            "the kernel has no vxlan module (not loaded, and `modprobe vxlan` cannot load it): the overlay needs "
            "it; install the running kernel's modules"
        )
    version = parse_version(f.kernel_release.split("-")[0] + ".0" * (2 - f.kernel_release.split("-")[0].count(".")))
    if version and version[:2] < MIN_KERNEL:
        problems.append(
            f"kernel {f.kernel_release} is older than {'.'.join(map(str, MIN_KERNEL))}, the oldest Docker's overlay "
            "driver supports: upgrade the kernel"
        )
    return problems


def ping_problem(f: HostFacts) -> str | None:
    """verify's full-size check runs the host's own ping in the probe's namespace with
    `-M do` (don't fragment), which busybox's ping and a missing one cannot do."""
    if f.host_ping is None or "iputils" in f.host_ping:
        return None
    found = f.host_ping.splitlines()[0][:80] if f.host_ping else "nothing"
    return (
        f"the host's ping is not iputils' (`ping -V` says {found!r}): verify's full-size check needs it "
        "(don't-fragment pings at the overlay's MTU): install iputils-ping"
    )


def disk_problem(inv: Inventory, f: HostFacts) -> str | None:
    found = f.free_kib(f.data_root) if inv.min_free_disk_mb else None
    if found is None or found[1] >= inv.min_free_disk_mb * 1024:
        return None
    mount, free = found
    return (
        f"only {free // 1024} MB free on {mount}, which holds Docker's data root {f.data_root}; preflight wants "
        f"{inv.min_free_disk_mb} MB (preflight.min_free_disk_mb): free some space there"
    )


def image_problems(inv: Inventory, node: Node, mode: str) -> list[str]:
    """An image the run needs that is not on the host and that the host cannot pull (see
    HostFacts.can_pull); one it can pull, Docker pulls when the step runs it."""
    runs_consul = Topology.of(inv).runs_consul(node.name)  # HA: an agent on every host
    wanted = [PROBE_IMAGE] + ([inv.consul_image] if mode == Mode.KV and runs_consul else [])
    if node.facts.can_pull:
        return []
    return [
        f"{image} is not on this host, and the host cannot pull it (no default route, proxy or registry mirror): "
        f"load it from a host that has it: `docker save {image} | ssh {node.host.address} sudo docker load`"
        for image in wanted
        if not node.facts.has_image(image)
    ]


def port_problems(inv: Inventory, node: Node, mode: str) -> list[str]:
    """The ports the cluster binds on this host, held by another program. dockerd's own
    (gossip, swarm), our running Consul's and the kernel's VXLAN socket are the cluster's use.
    A socket whose owner `ss -p` could not name, on a port a daemon of the cluster's claims
    here, is that daemon's: seen in CI right after a fault's dockerd restart, tcp and udp
    7946 listed with no process, and the heal refused as if the kernel held them."""
    f = node.facts
    consul_running = consul.running(node)
    moving = storetls.wanted(inv, [f.dropin]) == storetls.interim(inv)  # round 1 of storetls.py's move
    needs = on_host(cluster_ports(inv, mode, moving), node.name == Topology.of(inv).manager)
    problems = []
    for port in needs:
        ours = () if port.owner == CONSUL and not consul_running else (port.owner,)
        held = [
            sock
            for sock in f.sockets
            if (sock.proto, sock.port) == (port.proto, port.number)
            and sock.on([node.advertise_ip])
            and sock.process not in ours
            and not (not sock.process and probe.claimed(node, port))
        ]
        if held:
            problems.append(
                f"{port.proto}/{port.number} on {held[0].address} is held by {held[0].holder()}; {port.wording} "
                "needs it: stop that program, or move it to another port"
            )
    return problems


def tls_problems(inv: Inventory, node: Node) -> list[str]:
    """tls.docker_api writes -H and the --tls flags: a daemon.json that sets them too stops
    dockerd ("directives are specified both as a flag and in the configuration file"), and
    an API served already (a docker-machine drop-in's, with its own CA) is someone else's."""
    if not inv.tls.docker_api:
        return []
    f = node.facts
    problems = []
    clash = sorted(k for k in (f.daemon_json or {}) if k == "hosts" or k.startswith("tls"))
    if clash:
        problems.append(
            f"/etc/docker/daemon.json sets {', '.join(clash)}: with tls.docker_api the drop-in sets them as flags, "
            "and dockerd refuses both: remove them there, or set tls.docker_api to false"
        )
    try:
        served = render.tcp_hosts(render.base_command(f.exec_start, f.dropin)) if f.exec_start else []
    except (ValueError, InputError):
        served = []
    if served:
        problems.append(
            f"dockerd already serves {served[0]} (another tool's API, with its own certificates?): remove that "
            "-H tcp:// and its --tls flags from its unit or drop-in first, or set tls.docker_api to false"
        )
    held = [s for s in f.sockets if (s.proto, s.port) == ("tcp", certs.API_PORT) and s.process != "dockerd"]
    if held and not served:
        problems.append(
            f"tcp/{certs.API_PORT} on {held[0].address} is held by {held[0].holder()}; the Docker API over TLS "
            "needs it: stop that program, or set tls.docker_api to false"
        )
    return problems


def host_problems(inv: Inventory, node: Node, mode: str = Mode.KV) -> list[str]:
    f = node.facts
    problems = []
    if f.docker_active != "active":
        problems.append(f"docker.service is {f.docker_active or 'not installed'}, it must be installed and running")
    if not f.advertise_ips:
        problems.append(f"advertise {node.host.advertise!r}: no such interface or address with an IPv4 address")
    problems += kernel_problems(f)
    problems += [p for p in (disk_problem(inv, f), ping_problem(f)) if p]
    problems += image_problems(inv, node, mode)
    problems += port_problems(inv, node, mode)
    problems += tls_problems(inv, node)
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
        gone = consul.moved(node) if node.name == Topology.of(inv).manager and mode == Mode.KV else None
        if gone:  # named first: the workers' `docker info` may stall on it and look like the fault
            problems[node.name].insert(0, gone)
    no_quorum = consul.quorum_problem(inv, {n.name: n for n in nodes}) if mode == Mode.KV else None
    if no_quorum:  # first too: every dockerd's store is then away, and its `docker info` may stall
        problems[inv.manager.name].insert(0, no_quorum)
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


def consul_version_problem(inv: Inventory, nodes: list[Node]) -> tuple[str, str] | None:
    """HA mode, where a Consul is still to be made: (host, refusal) when the image's Consul is
    older than HA needs. Asks the image itself (`consul version`, ~0.8 s), so only then."""
    if not Topology.of(inv).ha:
        return None
    by_name = {n.name: n for n in nodes}
    join = consul.join_list(inv, by_name)
    topo = Topology.of(inv)
    roles = {n.name: topo.consul_role(n.name) or "server" for n in nodes}  # HA: every host has one
    if all(consul.state(inv, n, roles[n.name], join)[0] not in ("create", "recreate") for n in nodes):
        return None
    manager = by_name[inv.manager.name]
    problem = consul.version_problem(inv.consul_image, consul.image_version(inv, manager))
    return (manager.name, problem) if problem else None
