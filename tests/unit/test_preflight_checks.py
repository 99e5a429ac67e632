"""Unit (no hosts): preflight's checks of what will fail before anything changes: the
cluster's ports held by other programs, the kernel's VXLAN, free space under Docker's
data root, the images there. The facts are recorded from a real lab manager (a kv
cluster running: our Consul on 8500, dockerd's gossip on 7946, the kernel's VXLAN socket
on 4789) and changed one field at a time; the lab shares one kernel and one disk, so
these cases cannot be made for real there."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from overlaylab.checks import preflight, probe
from overlaylab.cluster import Node
from overlaylab.facts import HostFacts, Socket
from overlaylab.inventory import Host, Inventory, Tls
from overlaylab.mode import Mode
from tests.unit.test_facts_render import FakeConn, recorded

MANAGER = recorded("facts-manager-preflight.txt")
INV = Inventory(path=Path("inv.yaml"), cluster="lab", hosts=(Host("bm-docker-01", "10.0.0.11", "manager", "eth1"),))


def node(f: HostFacts | None = None, role: str = "manager") -> Node:
    host = Host("bm-docker-01", "10.0.0.11", role, "eth1")
    return Node(host, FakeConn(), copy.deepcopy(f or MANAGER))


def problems(n: Node, inv: Inventory = INV, mode: str = Mode.KV) -> list[str]:
    return (
        preflight.port_problems(inv, n, mode)
        + preflight.kernel_problems(n.facts)
        + [p for p in [preflight.disk_problem(inv, n.facts)] if p]
        + preflight.image_problems(inv, n, mode)
    )


def test_a_running_cluster_uses_its_own_ports_and_passes() -> None:
    n = node()
    assert {(s.proto, s.port, s.process) for s in n.facts.sockets} == {
        ("udp", 4789, ""), ("udp", 7946, "dockerd"), ("tcp", 8500, "consul"), ("tcp", 7946, "dockerd")
    }  # fmt: skip
    assert n.facts.vxlan == "loaded" and n.facts.free_kib("/var/lib/docker") == ("/var/lib/docker", 79030852)
    assert problems(n) == []


def test_the_consul_port_held_by_another_program_is_named_with_its_pid() -> None:
    n = node()
    n.facts.consul = None  # ours is not there: whoever holds 8500 is someone else
    n.facts.sockets = [Socket("tcp", "0.0.0.0", 8500, "python3", 4242)]
    assert problems(n) == [
        "tcp/8500 on 0.0.0.0 is held by python3 (PID 4242); Consul (consul.port) needs it: stop that program, "
        "or move it to another port"
    ]
    n.facts.sockets = [Socket("tcp", "127.0.0.1", 8500, "python3", 4242)]  # loopback: no clash with the cluster IP
    assert problems(n) == []


def test_gossip_and_vxlan_ports_held_by_other_programs_are_refused_on_a_worker_too() -> None:
    n = node(role="worker")
    n.facts.sockets = [Socket("udp", n.advertise_ip, 7946, "serf", 77), Socket("udp", "0.0.0.0", 4789, "vxland", 78)]
    found = problems(n)
    assert any("udp/7946" in p and "serf (PID 77)" in p and "dockerd's gossip" in p for p in found)
    assert any("udp/4789" in p and "vxland (PID 78)" in p and "VXLAN data" in p for p in found)
    assert not any("8500" in p or "consul" in p.lower() for p in found)  # a worker needs no Consul port or image


def test_swarm_mode_wants_2377_on_the_manager() -> None:
    n = node()
    n.facts.sockets = [Socket("tcp", "0.0.0.0", 2377, "haproxy", 9)]
    assert any("tcp/2377" in p and "haproxy (PID 9)" in p for p in problems(n, mode=Mode.SWARM))
    assert problems(node(), mode=Mode.SWARM) == []


def test_a_kernel_without_vxlan_or_too_old_is_refused() -> None:
    n = node()
    n.facts.vxlan = "missing"
    assert problems(n) == [
        "the kernel has no vxlan module (not loaded, and `modprobe vxlan` cannot load it): the overlay needs it; "
        "install the running kernel's modules"
    ]
    n.facts.vxlan, n.facts.kernel_release = "loadable", "3.10.0-1160.el7.x86_64"
    assert problems(n) == [
        "kernel 3.10.0-1160.el7.x86_64 is older than 3.16, the oldest Docker's overlay driver supports: upgrade the kernel"
    ]
    n.facts.kernel_release = "4.19"
    assert problems(n) == []


def test_too_little_free_space_under_the_data_root_is_refused_and_the_threshold_can_be_set() -> None:
    n = node()
    n.facts.disk["/var/lib/docker"] = 300 * 1024
    assert problems(n) == [
        "only 300 MB free on /var/lib/docker, which holds Docker's data root /var/lib/docker; preflight wants "
        "1024 MB (preflight.min_free_disk_mb): free some space there"
    ]
    low = Inventory(path=INV.path, cluster="lab", hosts=INV.hosts, min_free_disk_mb=200)
    assert problems(n, low) == []
    n.facts.info = {**n.facts.info, "DockerRootDir": "/srv/docker"}  # on the root filesystem, 75 GB free
    assert problems(n) == []


def test_a_missing_image_on_a_host_that_cannot_pull_is_refused_with_how_to_load_it() -> None:
    n = node()
    assert n.facts.images is not None and n.facts.default_route is False  # the lab's hosts: no way out
    n.facts.images -= {"busybox:latest", "progrium/consul:latest"}
    assert problems(n) == [
        f"{image} is not on this host, and the host cannot pull it (no default route, proxy or registry mirror): "
        f"load it from a host that has it: `docker save {image} | ssh 10.0.0.11 sudo docker load`"
        for image in ("busybox:latest", "progrium/consul")
    ]
    assert len(problems(n, mode=Mode.SWARM)) == 1  # swarm mode needs no Consul image
    n.facts.default_route = True  # it can pull: Docker pulls when the step runs the image
    assert problems(n) == []
    n.facts.default_route = False
    n.facts.info = {**n.facts.info, "HttpsProxy": "http://proxy.example:3128"}
    assert problems(n) == []


def test_the_port_probe_leaves_alone_the_ports_a_starting_daemon_of_the_cluster_will_take() -> None:
    """Just after a reboot the recorded manager's dockerd runs but has not bound its gossip
    yet, and our Consul comes back by its restart policy: none of their ports gets a
    listener of ours (a listener there took udp/7946's datagrams from dockerd on the lab).
    A host whose dockerd is not the cluster's yet gets every port probed."""
    n = node()
    n.facts.sockets = []  # nothing bound yet
    wanted = probe.wanted(INV, Mode.KV)
    assert "--cluster-advertise" in (n.facts.exec_start or "") and n.facts.consul is not None
    assert [p.label for p in wanted if probe.claimed(n, p)] == [
        "udp/4789 (VXLAN data)", "tcp/7946 (gossip)", "udp/7946 (gossip)", "tcp/8500 (Consul)"
    ]  # fmt: skip
    n.facts.exec_start, n.facts.consul = "/usr/sbin/dockerd -H fd://", None  # the distribution's own
    assert [p for p in wanted if probe.claimed(n, p)] == []
    n.facts.info["Swarm"] = {"LocalNodeState": "active"}
    assert [p.label for p in wanted if probe.claimed(n, p)] == [
        "udp/4789 (VXLAN data)", "tcp/7946 (gossip)", "udp/7946 (gossip)"
    ]  # fmt: skip
    n.facts.docker_active = "inactive"
    assert [p for p in wanted if probe.claimed(n, p)] == []


def test_a_gossip_socket_whose_owner_ss_could_not_name_is_dockerds_only_where_dockerd_claims_the_port() -> None:
    """Seen in CI right after a fault's `systemctl restart docker`: tcp and udp 7946 listed
    with no process, and the heal refused as if the kernel held them."""
    n = node(role="worker")
    n.facts.sockets = [Socket("tcp", "0.0.0.0", 7946, ""), Socket("udp", "0.0.0.0", 7946, "")]
    assert "--cluster-advertise" in (n.facts.exec_start or "") and n.facts.docker_active == "active"
    assert problems(n) == []
    n.facts.exec_start = (n.facts.exec_start or "").replace("--cluster-advertise", "--label")  # no kv dockerd here
    found = problems(n)
    assert len(found) == 2 and all("held by the kernel" in p for p in found)


def test_the_next_port_held_by_another_program_is_refused_only_when_the_store_moves_to_tls() -> None:
    """storetls.py's round 1 serves HTTPS on consul.port + 1 beside HTTP on consul.port."""
    n = node()
    n.facts.dropin = (
        "# Managed by overlaylab\n[Service]\nExecStart=\nExecStart=/usr/sbin/dockerd "
        "--cluster-store=consul://10.0.0.11:8500 --cluster-advertise=eth1:2376\n"
    )
    n.facts.sockets = [*n.facts.sockets, Socket("tcp", "0.0.0.0", 8501, "nginx", 77)]
    assert problems(n) == []  # store TLS off: 8501 is none of the cluster's business
    store = dataclasses.replace(INV, tls=Tls(store=True))
    assert problems(n, store) == [
        "tcp/8501 on 0.0.0.0 is held by nginx (PID 77); Consul's second port while the store moves between "
        "HTTP and HTTPS needs it: stop that program, or move it to another port"
    ]
    n.facts.dropin = n.facts.dropin.replace(
        "eth1:2376", "eth1:2376 --cluster-store-opt=kv.certfile=/etc/overlaylab/tls/server.pem"
    )
    assert problems(n, store) == []  # moved already: 8501 is not used
