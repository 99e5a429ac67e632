"""The cluster smoke checks. Each test is named after what it proves and runs per host
or per ordered pair of hosts; every container and network a test creates has a
unique name and the label overlaylab.role=smoke, and is removed even on failure.

Run: pytest --pyargs overlaylab.smoke --inventory FILE  (from a clone: pytest tests/smoke --inventory FILE)
"""

from __future__ import annotations

import shlex
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlaylab import certs, dropins, peers, remote, render, storetls
from overlaylab.checks.pathmtu import ICMP_HEADERS
from overlaylab.checks.verify import STREAM_BYTES, serve
from overlaylab.cluster import parallel
from overlaylab.consulapi import Forward, consul_client
from overlaylab.facts import DROPIN, ROLE_LABEL
from overlaylab.ports import LOOPBACK
from overlaylab.smoke.plugin import Cluster
from overlaylab.steps import tls
from overlaylab.steps.network import DEFAULT_MTU, VXLAN_OVERHEAD
from overlaylab.topology import Topology

LABEL = f"--label {ROLE_LABEL}=smoke"
# A probe serves verify's stream (checks/verify.py); it is read once its web server answers,
# so that no pair's TCP check races the server's start. Then its MTU on the overlay.
READY = (
    "for i in $(seq 50); do wget -q -O /dev/null http://127.0.0.1/stream && break; sleep 0.1; done; "
    "cat /sys/class/net/eth0/mtu"
)


@dataclass(frozen=True)
class Probe:
    name: str
    ip: str
    pid: str
    mtu: int  # of its interface on the overlay: the network's real MTU, as its containers get it


@pytest.fixture(scope="session")
def probes(smoke_cluster: Cluster) -> Iterator[dict[str, Probe | str]]:
    """One busybox per host on the overlay network, for the pair checks; a host whose
    probe cannot start maps to the reason, so only the pairs involving it fail."""
    c = smoke_cluster
    net = shlex.quote(c.inv.network)
    made: dict[str, Probe | str] = {}

    def start(host: str) -> None:
        name = c.name(f"probe-{host}")
        fmt = "'{{(index .NetworkSettings.Networks " + f'"{c.inv.network}"' + ").IPAddress}} {{.State.Pid}}'"
        code, out, err = c.result(
            host,
            f"docker run -d --name {name} {LABEL} --network {net} busybox sh -c {shlex.quote(serve(900))} >/dev/null && "
            f"docker inspect -f {fmt} {name} && docker exec {name} sh -c {shlex.quote(READY)}",
        )
        words = out.split()
        made[host] = (
            Probe(name, words[0], words[1], int(words[2]))
            if code == 0 and len(words) == 3 and words[2].isdigit()
            else f"{host}: no probe container on {c.inv.network}: {(err or out).strip()[-200:]}"
        )

    def stop(host: str) -> None:
        probe = made.get(host)
        if isinstance(probe, Probe):
            c.sh(host, f"docker rm -f {probe.name} >/dev/null 2>&1; true", check=False)

    hosts = list(c.nodes)
    try:
        for host, exc in parallel(hosts, start, key=str).items():  # one host at a time: a second per host
            made[host] = f"{host}: no probe container on {c.inv.network}: {exc}"
        yield made
    finally:
        parallel(hosts, stop, key=str)


def _probe(probes: dict[str, Probe | str], host: str) -> Probe:
    probe = probes[host]
    if isinstance(probe, str):
        pytest.fail(probe, pytrace=False)
    return probe


# ---- each host --------------------------------------------------------------------


def test_ssh_works_with_the_pinned_host_key(smoke_cluster: Cluster, host: str) -> None:
    node = smoke_cluster.nodes[host]
    transport = node.conn.client.get_transport()
    assert transport is not None and transport.is_active(), f"{host}: no SSH session"
    key = transport.get_remote_server_key()
    known = node.conn.client.get_host_keys()
    entry = known.lookup(node.host.address) or known.lookup(f"[{node.host.address}]:{node.conn.port}")
    assert entry is not None and entry.get(key.get_name()) == key, (
        f"{host}: host key {remote.fingerprint(key)} is not the one pinned in {smoke_cluster.inv.known_hosts}"
    )


def test_dockerd_runs(smoke_cluster: Cluster, host: str) -> None:
    state = smoke_cluster.sh(host, "systemctl is-active docker.service", check=False)
    assert state == "active", f"{host}: docker.service is {state}"


@pytest.mark.mode("kv")
def test_engine_version_has_the_cluster_store(smoke_cluster: Cluster, host: str) -> None:
    version = smoke_cluster.sh(host, "docker version --format '{{.Server.Version}}'", check=False)
    assert version, f"{host}: dockerd does not answer"
    major = int(version.split(".")[0])
    assert major < 23, f"{host}: Docker {version} has no cluster store (removed in 23.0)"


@pytest.mark.mode("kv")
def test_dockerd_runs_with_our_cluster_flags(smoke_cluster: Cluster, host: str) -> None:
    c = smoke_cluster
    args = c.sh(host, "ps -o args= -C dockerd", check=False)
    store = f"--cluster-store=consul://{dropins.store_ip(c.inv, c.manager.advertise_ip)}:{c.inv.consul_port}"
    advertise = f"--cluster-advertise={c.nodes[host].host.advertise}:2376"
    assert store in args and advertise in args, (
        f"{host}: dockerd runs `{args or 'nothing'}`, wanted {store} {advertise}"
    )


@pytest.mark.mode("kv")
def test_drop_in_on_disk_is_what_the_templates_render(smoke_cluster: Cluster, host: str) -> None:
    c = smoke_cluster
    node = c.nodes[host]
    assert render.is_ours(node.facts.dropin), f"{host}: {DROPIN} is missing or not overlaylab's"
    wanted = dropins.dropin(c.inv, node, c.manager.advertise_ip)
    assert not wanted.changed, f"{host}: the drop-in drifted from the templates:\n{wanted.diff()}"


@pytest.mark.tls
def test_the_docker_api_answers_the_admins_certificate_and_refuses_a_client_without_one(
    smoke_cluster: Cluster, host: str
) -> None:
    c = smoke_cluster
    directory = c.inv.ca_dir
    missing = [n for n in (certs.CA_CERT, certs.CLIENT_CERT, certs.CLIENT_KEY) if not (directory / n).exists()]
    assert not missing, (
        f"{directory} lacks {', '.join(missing)}: run the smoke suite where the cluster's CA is (tls.ca_dir)"
    )
    address = str(c.nodes[host].conn.host)
    answered, detail = tls.probe(address, directory / certs.CA_CERT, directory)
    assert answered, (
        f"{host}: the Docker API at {address}:{certs.API_PORT} did not answer the admin's certificate: {detail}"
    )
    answered, detail = tls.probe(address, directory / certs.CA_CERT, None)
    assert not answered, f"{host}: the Docker API at {address}:{certs.API_PORT} answered a client without a certificate"


@pytest.mark.mode("kv")
@pytest.mark.tls_store
def test_dockerd_reaches_its_store_over_tls_with_its_certificate(smoke_cluster: Cluster, host: str) -> None:
    args = smoke_cluster.sh(host, "ps -o args= -C dockerd", check=False)
    missing = [opt for opt in storetls.kv_opts() if opt not in args]
    assert not missing, f"{host}: dockerd runs without {', '.join(missing)}: its store is in clear text"


@pytest.mark.mode("kv")
@pytest.mark.tls_store
def test_consul_serves_https_alone_and_answers_only_the_cas_certificates(smoke_cluster: Cluster) -> None:
    """Through an SSH forward to the manager's Consul, as overlaylab's own client reaches it."""
    c = smoke_cluster
    manager, directory = c.manager, c.inv.ca_dir
    transport = manager.conn.client.get_transport()
    assert transport is not None, f"{manager.name}: no SSH transport"
    forward = Forward(transport, manager.advertise_ip, c.inv.consul_port)
    where = f"Consul at {manager.advertise_ip}:{c.inv.consul_port}"
    try:
        ca = directory / certs.CA_CERT
        answered, detail = tls.probe(LOOPBACK, ca, directory, port=forward.port, path="/v1/status/leader")
        assert answered, f"{where} did not answer the admin's certificate: {detail}"
        answered, detail = tls.probe(LOOPBACK, ca, None, port=forward.port, path="/v1/status/leader")
        assert not answered, f"{where} answered a client without a certificate: {detail}"
        with socket.create_connection((LOOPBACK, forward.port), timeout=10) as raw:
            raw.sendall(b"GET /v1/status/leader HTTP/1.0\r\n\r\n")
            status = raw.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
        assert " 200 " not in status, f"{where} answered plain HTTP: {status}"
    finally:
        forward.close()


@pytest.mark.mode("swarm")
def test_host_is_an_active_node_of_the_managers_swarm(smoke_cluster: Cluster, host: str) -> None:
    c = smoke_cluster
    state = c.sh(host, "docker info --format '{{.Swarm.LocalNodeState}}'", check=False)
    assert state == "active", f"{host}: swarm state is {state or 'unknown'}"
    managers = c.sh(host, "docker info --format '{{range .Swarm.RemoteManagers}}{{.Addr}} {{end}}'", check=False)
    assert f"{c.manager.advertise_ip}:2377" in managers.split(), (
        f"{host}: not in {c.manager.name}'s swarm (managers: {managers})"
    )


@pytest.mark.mode("swarm")
def test_the_manager_sees_every_node_ready(smoke_cluster: Cluster) -> None:
    c = smoke_cluster
    nodes = c.sh(c.manager.name, "docker node ls --format '{{.Hostname}} {{.Status}} {{.Availability}}'")
    ready = {line.split()[0] for line in nodes.splitlines() if line.split()[1:] == ["Ready", "Active"]}
    missing = sorted(n.facts.hostname for n in c.nodes.values() if n.facts.hostname not in ready)
    assert not missing, f"{c.manager.name}: nodes not Ready/Active in the swarm: {missing}\n{nodes}"


# ---- Consul and the overlay network --------------------------------------------------


@pytest.mark.mode("kv")
def test_consul_has_a_leader(smoke_cluster: Cluster) -> None:
    c = smoke_cluster
    with consul_client(c.inv, c.manager) as client:
        assert client.status.leader(), f"{c.manager.name}: Consul on {c.manager.advertise_ip} has no leader"


@pytest.mark.mode("kv")
@pytest.mark.ha
def test_consul_has_as_many_raft_peers_as_servers(smoke_cluster: Cluster) -> None:
    c = smoke_cluster
    with consul_client(c.inv, c.manager) as client:
        peers = sorted(client.status.peers())
    wanted = sorted(f"{c.nodes[s].advertise_ip}:8300" for s in Topology.of(c.inv).consul_servers)
    assert peers == wanted, f"Consul's Raft peers are {peers}, the inventory's servers {wanted}"


@pytest.mark.mode("kv")
@pytest.mark.ha
def test_hosts_consul_agent_is_an_alive_member_with_encrypted_gossip(smoke_cluster: Cluster, host: str) -> None:
    c = smoke_cluster
    node = c.nodes[host]
    with consul_client(c.inv, node) as client:  # this host's own agent
        me = client.agent.self()
        members = {m["Addr"]: m["Status"] for m in client.agent.members()}
    assert me["Member"]["Addr"] == node.advertise_ip, f"{host}: the agent answering is {me['Member']['Addr']}'s"
    assert members.get(node.advertise_ip) == 1, f"{host}: not an alive member of Consul's gossip ({members})"
    encrypted = me["Stats"]["serf_lan"]["encrypted"]
    assert encrypted == "true", f"{host}: Consul's gossip is not encrypted (serf_lan.encrypted={encrypted})"


RPC_PORT, RPC_CONSUL, RPC_TLS = 8300, b"\x00", b"\x03"  # Consul's server RPC and its first byte's meanings


def _msgpack_str(text: str) -> bytes:
    data = text.encode()
    return bytes([0xA0 | len(data)]) + data  # a fixstr: the few names below are short


def _rpc_ping(port: int, ca: Path | None = None, client: Path | None = None) -> bytes:
    """Status.Ping to a Consul server's RPC through a forward, in clear text, or (``ca``)
    inside TLS with ``client``'s certificate: what it answered (b"": it closed the connection)."""
    header = b"\x82" + _msgpack_str("ServiceMethod") + _msgpack_str("Status.Ping") + _msgpack_str("Seq") + b"\x00"
    request = RPC_CONSUL + header + b"\x80"  # net/rpc's header, then the empty arguments
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        conn: socket.socket = raw
        if ca is not None:
            raw.sendall(RPC_TLS)
            context = ssl.create_default_context(cafile=str(ca))
            if client is not None:
                context.load_cert_chain(client / certs.CLIENT_CERT, client / certs.CLIENT_KEY)
            conn = context.wrap_socket(raw, server_hostname=LOOPBACK)
        conn.sendall(request)
        try:
            return conn.recv(4096)
        except OSError:
            return b""


@pytest.mark.mode("kv")
@pytest.mark.ha
@pytest.mark.tls_store
def test_consul_servers_rpc_answers_the_cas_certificates_over_tls_alone(smoke_cluster: Cluster) -> None:
    c = smoke_cluster
    for server in Topology.of(c.inv).consul_servers:
        node = c.nodes[server]
        transport = node.conn.client.get_transport()
        assert transport is not None, f"{server}: no SSH transport"
        forward = Forward(transport, node.advertise_ip, RPC_PORT)
        where = f"{server}: Consul's RPC at {node.advertise_ip}:{RPC_PORT}"
        try:
            answer = _rpc_ping(forward.port, c.inv.ca_dir / certs.CA_CERT, c.inv.ca_dir)
            assert answer, f"{where} did not answer a ping over TLS with the admin's certificate"
            assert not _rpc_ping(forward.port), f"{where} answered a ping in clear text"
        finally:
            forward.close()


@pytest.mark.mode("kv")
@pytest.mark.ha
def test_dockerds_cluster_store_is_its_own_hosts_agent(smoke_cluster: Cluster, host: str) -> None:
    c = smoke_cluster
    store = c.sh(host, "docker info --format '{{.ClusterStore}}'", check=False)
    assert store == f"consul://127.0.0.1:{c.inv.consul_port}", f"{host}: dockerd's cluster store is {store!r}"


@pytest.mark.mode("kv")
def test_host_is_registered_in_consul(smoke_cluster: Cluster, host: str) -> None:
    c = smoke_cluster
    key = f"docker/nodes/{c.nodes[host].advertise_ip}:2376"
    with consul_client(c.inv, c.manager) as client:
        _, value = client.kv.get(key)
    assert value is not None, f"{host}: no {key} in Consul"


@pytest.mark.mode("kv")
def test_the_overlay_sends_no_address_to_a_host_that_runs_no_container_there(smoke_cluster: Cluster, host: str) -> None:
    """A stale peer (overlaylab/peers.py): a container later given that address on another
    host would be unreachable from this one. Read from the session's facts."""
    c = smoke_cluster
    found = peers.stale(c.nodes[host], list(c.nodes.values()))
    assert not found, f"{host}: {peers.describe(found)}"


@pytest.mark.mode("kv")
def test_overlay_network_is_in_the_kv_store(smoke_cluster: Cluster) -> None:
    c = smoke_cluster
    net = c.manager.facts.network
    assert net is not None, f"{c.manager.name}: network {c.inv.network} does not exist"
    with consul_client(c.inv, c.manager) as client:
        _, keys = client.kv.get("docker/network/v1.0/network/", keys=True)
    assert any(net["Id"] in k for k in keys or []), f"network {c.inv.network} ({net['Id'][:12]}) is not in Consul's KV"


@pytest.mark.mode("kv")
def test_overlay_network_exists_with_one_id_and_global_scope(smoke_cluster: Cluster, host: str) -> None:
    c = smoke_cluster
    net = c.nodes[host].facts.network
    assert net is not None, f"{host}: network {c.inv.network} does not exist"
    assert net["Driver"] == "overlay" and net["Scope"] == "global", f"{host}: {net['Driver']}/{net['Scope']}"
    ids = {n.facts.network["Id"] for n in c.nodes.values() if n.facts.network}
    assert len(ids) == 1, f"{host}: network {c.inv.network} has different IDs across hosts: {sorted(ids)}"


@pytest.mark.mode("swarm")
def test_overlay_network_is_an_attachable_swarm_network(smoke_cluster: Cluster) -> None:
    c = smoke_cluster
    net = c.manager.facts.network
    assert net is not None, f"{c.manager.name}: network {c.inv.network} does not exist"
    assert (net["Driver"], net["Scope"], net.get("Attachable")) == ("overlay", "swarm", True), (
        f"{c.manager.name}: {c.inv.network} is {net['Driver']}/{net['Scope']}, attachable={net.get('Attachable')}"
    )


# ---- every ordered pair -------------------------------------------------------------


def _ping(c: Cluster, probes: dict[str, Probe | str], src: str, target: str, how: str) -> None:
    # -A: the second echo leaves as the first reply arrives, not a second later (12 pairs at 3 hosts)
    code, out, err = c.result(src, f"docker exec {_probe(probes, src).name} ping -c 2 -A -W 2 {target}")
    last = (out.strip() or err.strip()).splitlines()[-1:] or ["no output"]
    assert code == 0, f"{src} -> {how}: {last[0]}"


def test_containers_ping_by_ip(smoke_cluster: Cluster, probes: dict[str, Probe | str], pair: tuple[str, str]) -> None:
    src, dst = pair
    _ping(smoke_cluster, probes, src, _probe(probes, dst).ip, f"{dst} by IP")


def test_containers_ping_by_name(smoke_cluster: Cluster, probes: dict[str, Probe | str], pair: tuple[str, str]) -> None:
    src, dst = pair
    _ping(smoke_cluster, probes, src, _probe(probes, dst).name, f"{dst} by name")


def _df_ping(c: Cluster, probes: dict[str, Probe | str], src: str, dst: str, size: int) -> tuple[int, str]:
    """The host's own ping inside the probe's network namespace: busybox ping cannot set DF."""
    code, out, err = c.result(
        src, f"nsenter -t {_probe(probes, src).pid} -n ping -M do -s {size} -c 1 -W 2 {_probe(probes, dst).ip}"
    )
    return code, (out + err).strip().splitlines()[-1] if (out + err).strip() else "no output"


def test_a_full_size_packet_with_dont_fragment_crosses_the_overlay(
    smoke_cluster: Cluster, probes: dict[str, Probe | str], pair: tuple[str, str]
) -> None:
    src, dst = pair
    mtu = min(_probe(probes, src).mtu, _probe(probes, dst).mtu)
    code, last = _df_ping(smoke_cluster, probes, src, dst, mtu - ICMP_HEADERS)
    assert code == 0, (
        f"{src} -> {dst}: a ping of {mtu} bytes (the overlay's MTU) with DF failed "
        f"(the path between the hosts cannot carry {mtu + VXLAN_OVERHEAD}?): {last}"
    )


def test_a_tcp_stream_of_1_mib_crosses_the_overlay_by_name(
    smoke_cluster: Cluster, probes: dict[str, Probe | str], pair: tuple[str, str]
) -> None:
    """What a ping does not prove: TCP's full-size segments, both ways, as applications send them."""
    src, dst = pair
    url = f"http://{_probe(probes, dst).name}/stream"
    fetch = f"for try in 1 2 3; do n=$(timeout 10 wget -q -O - {url} | wc -c); [ $n -eq {STREAM_BYTES} ] && break; done; echo $n"
    _, out, err = smoke_cluster.result(src, f"docker exec {_probe(probes, src).name} sh -c {shlex.quote(fetch)}")
    got = out.strip() or "0"
    assert got == str(STREAM_BYTES), (
        f"{src} -> {dst}: a TCP stream by name brought {got} of {STREAM_BYTES} bytes (the last of 3 tries of 10 s) "
        f"(small pings may pass: something on the path drops TCP or its full-size segments) {err.strip()[-200:]}"
    )


def test_the_overlays_mtu_is_the_inventorys(smoke_cluster: Cluster, probes: dict[str, Probe | str], host: str) -> None:
    """network.mtu, or the driver's 1450 without it, as the probe's interface on the overlay has it."""
    wanted = smoke_cluster.inv.mtu or DEFAULT_MTU
    got = _probe(probes, host).mtu
    assert got == wanted, (
        f"{host}: a container's interface on {smoke_cluster.inv.network} has MTU {got}, wanted {wanted}"
    )


def test_an_overlay_container_has_a_second_nic_on_docker_gwbridge(
    smoke_cluster: Cluster, probes: dict[str, Probe | str], host: str
) -> None:
    c = smoke_cluster
    subnet = c.sh(host, "docker network inspect docker_gwbridge -f '{{(index .IPAM.Config 0).Subnet}}'", check=False)
    routes = c.sh(host, f"docker exec {_probe(probes, host).name} ip -4 route", check=False)
    gateway = c.sh(host, "docker network inspect docker_gwbridge -f '{{(index .IPAM.Config 0).Gateway}}'", check=False)
    assert subnet and f"default via {gateway}" in routes, (
        f"{host}: no default route via docker_gwbridge ({subnet}):\n{routes}"
    )


# ---- the tutorial's other lessons, on one host ---------------------------------------


@pytest.fixture
def lesson(smoke_cluster: Cluster) -> Iterator[Cluster]:
    yield smoke_cluster


def _run(c: Cluster, host: str, name: str, args: str, command: str = "sleep 300") -> None:
    c.sh(host, f"docker run -d --name {name} {LABEL} {args} busybox {command} >/dev/null")


def _rm(c: Cluster, host: str, containers: list[str], networks: tuple[str, ...] = ()) -> None:
    c.sh(host, f"docker rm -f {' '.join(containers)} >/dev/null 2>&1; true", check=False)
    if networks:
        c.sh(host, f"docker network rm {' '.join(networks)} >/dev/null 2>&1; true", check=False)


def test_names_resolve_on_a_user_defined_bridge_but_not_on_the_default_one(lesson: Cluster) -> None:
    c, host = lesson, lesson.manager.name
    net, a, b, d1, d2 = (c.name(x) for x in ("net", "a", "b", "d1", "d2"))
    try:
        c.sh(host, f"docker network create {LABEL} {net} >/dev/null")
        _run(c, host, a, f"--network {net}")
        _run(c, host, b, f"--network {net}")
        _run(c, host, d1, "")
        _run(c, host, d2, "")
        code, out, err = c.result(host, f"docker exec {b} ping -c 1 -W 2 {a}")
        assert code == 0, f"{host}: {b} cannot reach {a} by name on a user-defined bridge: {(out + err).strip()}"
        code, out, err = c.result(host, f"docker exec {d2} ping -c 1 -W 2 {d1}")
        assert code != 0 and "bad address" in out + err, (
            f"{host}: a name resolved on the default bridge: {(out + err).strip()}"
        )
    finally:
        _rm(c, host, [a, b, d1, d2], (net,))


def test_two_user_defined_bridges_are_isolated_until_network_connect(lesson: Cluster) -> None:
    c, host = lesson, lesson.manager.name
    n1, n2, a, b = (c.name(x) for x in ("n1", "n2", "a", "b"))
    try:
        c.sh(host, f"docker network create {LABEL} {n1} >/dev/null && docker network create {LABEL} {n2} >/dev/null")
        _run(c, host, a, f"--network {n1}")
        _run(c, host, b, f"--network {n2}")
        b_ip = c.sh(host, f"docker inspect -f '{{{{(index .NetworkSettings.Networks \"{n2}\").IPAddress}}}}' {b}")
        code, _, _ = c.result(host, f"docker exec {a} ping -c 1 -W 1 {b_ip}")  # meant to fail: no need to wait long
        assert code != 0, f"{host}: {a} on {n1} reached {b} on {n2}: the bridges are not isolated"
        c.sh(host, f"docker network connect {n1} {b}")
        code, out, err = c.result(host, f"docker exec {a} ping -c 1 -W 2 {b}")
        assert code == 0, f"{host}: after `docker network connect`, {a} still cannot reach {b}: {(out + err).strip()}"
    finally:
        _rm(c, host, [a, b], (n1, n2))


def test_network_container_mode_shares_the_other_containers_interface(lesson: Cluster) -> None:
    c, host = lesson, lesson.manager.name
    a = c.name("a")
    try:
        _run(c, host, a, "")
        mine = c.sh(host, f"docker exec {a} ip -4 -o addr show eth0")
        shared = c.sh(host, f"docker run --rm {LABEL} --network container:{a} busybox ip -4 -o addr show eth0")
        assert mine.split()[3] == shared.split()[3], f"{host}: --network container:{a} sees {shared}, not {mine}"
    finally:
        _rm(c, host, [a])


def test_a_fixed_ip_needs_a_network_created_with_a_subnet(lesson: Cluster) -> None:
    c, host = lesson, lesson.manager.name
    auto, fixed, a, b = (c.name(x) for x in ("auto", "fixed", "a", "b"))
    try:
        c.sh(host, f"docker network create {LABEL} {auto} >/dev/null")
        subnet = c.sh(host, f"docker network inspect {auto} -f '{{{{(index .IPAM.Config 0).Subnet}}}}'")
        ip = subnet.split("/")[0].rsplit(".", 1)[0] + ".77"
        code, out, err = c.result(host, f"docker run -d --name {a} {LABEL} --network {auto} --ip {ip} busybox sleep 60")
        assert code != 0 and "user configured subnets" in out + err, (
            f"{host}: --ip on a network without --subnet: {(out + err).strip()}"
        )
        c.sh(
            host,
            f"docker network rm {auto} >/dev/null && docker network create {LABEL} --subnet {subnet} {fixed} >/dev/null",
        )
        _run(c, host, b, f"--network {fixed} --ip {ip}")
        got = c.sh(host, f"docker inspect -f '{{{{(index .NetworkSettings.Networks \"{fixed}\").IPAddress}}}}' {b}")
        assert got == ip, f"{host}: asked for {ip}, got {got}"
    finally:
        _rm(c, host, [a, b], (auto, fixed))


def test_a_published_port_answers_from_another_host(lesson: Cluster) -> None:
    c = lesson
    if len(c.nodes) < 2:
        pytest.skip("needs two hosts")
    server, client = c.manager, next(n for n in c.nodes.values() if n is not c.manager)
    web = c.name("web")
    token = c.token
    try:
        c.sh(
            server.name,
            f"docker run -d --name {web} {LABEL} -p {server.advertise_ip}::80 busybox sh -c "
            f"{shlex.quote(f'mkdir -p /www && echo {token} > /www/index.html && exec httpd -f -p 80 -h /www')} >/dev/null",
        )
        port = c.sh(server.name, f"docker port {web} 80/tcp").splitlines()[0].rsplit(":", 1)[1]
        got = ""
        for _ in range(10):
            code, got, _ = c.result(
                client.name,
                f"docker run --rm {LABEL} --network host busybox wget -qO- http://{server.advertise_ip}:{port}/",
            )
            if code == 0:
                break
        assert got.strip() == token, f"{client.name} -> {server.name}:{port}: published port gave {got.strip()!r}"
    finally:
        _rm(c, server.name, [web])


def test_network_none_has_only_loopback(lesson: Cluster) -> None:
    c, host = lesson, lesson.manager.name
    links = c.sh(host, f"docker run --rm {LABEL} --network none busybox ip -o link").splitlines()
    names = [line.split(":")[1].strip() for line in links]
    assert names == ["lo"], f"{host}: --network none has {names}"


def test_network_host_sees_the_hosts_interfaces(lesson: Cluster) -> None:
    c, host = lesson, lesson.manager.name
    inside = c.sh(host, f"docker run --rm {LABEL} --network host busybox ip -o link")
    advertise = c.nodes[host].host.advertise
    assert f": {advertise}" in inside or c.nodes[host].advertise_ip in c.sh(
        host, f"docker run --rm {LABEL} --network host busybox ip -4 -o addr"
    ), f"{host}: --network host does not see {advertise}"
