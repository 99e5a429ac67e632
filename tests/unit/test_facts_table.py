"""Unit (no hosts): every entry of the facts table (facts.FACTS) read from output recorded on
lab hosts (tests/unit/data/facts-ha-*.txt: a 3-host lab in HA mode, its 3 Consul servers,
the Docker API over mutual TLS, a user's container on every host after they pinged each
other, a held-back container's record written on bm-docker-02, as a stopped run leaves it;
the ping section, `ping -V`, read later from a legacy lab host of the same image).

Each entry has its expectation here, and a fact without one fails the test: adding a fact
is one table entry and one line below."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from overlaylab import facts
from overlaylab.facts import HostFacts

DATA = Path(__file__).parent / "data"
WHO = {"manager": "bm-docker-01", "worker": "bm-docker-02"}
NID = "d21ca0e3bb"


def read(which: str) -> HostFacts:
    return facts.parse((DATA / f"facts-ha-{which}.txt").read_text(), "eth1")


Check = Callable[[HostFacts, str], bool]  # the parsed facts, and which host ("manager" or "worker")

EXPECTED: dict[str, Check] = {
    "via": lambda f, w: f.facts_via == "",  # recorded before the section (test_facts_via.py reads both paths)
    "hostname": lambda f, w: f.hostname == WHO[w],
    "active": lambda f, w: f.docker_active == "active",
    "mainpid": lambda f, w: f.docker_pid > 1,
    "unit": lambda f, w: (f.exec_start or "").startswith("/usr/sbin/dockerd -H fd://"),
    "info": lambda f, w: f.info.get("ServerVersion") == "20.10.5+dfsg1" and f.info_error == "",
    "dropin": lambda f, w: "--cluster-store=consul://127.0.0.1:8500" in (f.dropin or ""),
    "backup": lambda f, w: f.backup == ["10-machine.conf.absent"],
    "backup_content": lambda f, w: f.backup_content is None,  # there was no drop-in before
    "binary_version": lambda f, w: f.binary_version == "",  # dockerd runs: `docker info` tells its version
    "daemon_json": lambda f, w: (f.daemon_json or {}).get("bip") == "10.214.2.1/24",
    "addrs": lambda f, w: f.advertise_ips == [{"manager": "10.214.1.11", "worker": "10.214.1.12"}[w]],
    "containers": lambda f, w: (
        f.containers[f"overlaylab-anchor-{WHO[w]}"] == "anchor"
        and f.containers["overlaylab-consul"] == "consul"
        and f.containers[{"manager": "users_app1", "worker": "users_app2"}[w]] == ""
    ),
    "consul": lambda f, w: (f.consul or {}).get("State", {}).get("Running") is True,
    "consul_volume": lambda f, w: f.consul_volume is (w == "manager"),  # the store's volume: the manager's alone
    "gossip_key": lambda f, w: f.gossip_key == "afca9c6120c27a15",  # a digest, the same on every host
    "store_leader": lambda f, w: f.store_leader == "10.214.1.11:8300",
    "network": lambda f, w: (f.network or {}).get("Scope") == "global" and str((f.network or {})["Id"]).startswith(NID),
    "attached": lambda f, w: f.attached[{"manager": "users_app1", "worker": "users_app2"}[w]].policy == "always",
    "gossip": lambda f, w: f.gossip,
    "consul_backend": lambda f, w: f.consul_backend,
    "services": lambda f, w: f.services == 0,
    "stray_threads": lambda f, w: f.stray_threads == 0,
    "dead_watches": lambda f, w: f.dead_watches == 0,
    "deaf_sandboxes": lambda f, w: f.deaf_sandboxes == [],
    "peers": lambda f, w: (
        len(f.peers[NID]) == 4
        and set(f.peers[NID].values()) == {"10.214.1.11", "10.214.1.12", "10.214.1.13"} - {f.advertise_ips[0]}
    ),
    "held": lambda f, w: f.held == ({"users_app2": "always"} if w == "worker" else {}),
    "tls": lambda f, w: (
        f.docker_started > 0
        and set(f.tls_files) == {facts.HOST_CA, facts.HOST_CERT, facts.HOST_KEY}
        and f.tls_files[facts.HOST_KEY][1] == "-"
    ),  # the key's content is never read
    "restore_failed": lambda f, w: f.restore_failed is False,
    "gossip_events": lambda f, w: (
        f.gossip_alive == ["bm-docker-01", "bm-docker-02", "bm-docker-03"] and not f.gossip_gone
    ),
    "overlays": lambda f, w: f.overlays == ["ov_net1"],
    "listening": lambda f, w: (
        {(s.proto, s.port, s.process) for s in f.sockets}
        >= {("udp", 4789, ""), ("tcp", 7946, "dockerd"), ("udp", 7946, "dockerd"), ("tcp", 2376, "dockerd")}
    ),
    "kernel": lambda f, w: f.kernel_release != "" and f.vxlan == "loaded",
    "disk": lambda f, w: f.free_kib("/var/lib/docker") is not None,
    "ping": lambda f, w: f.host_ping is not None and f.host_ping.startswith("ping from iputils"),
    "images": lambda f, w: f.images is not None and "busybox:latest" in f.images,
    "route": lambda f, w: f.default_route is False,  # a lab host has no way out
}


def test_every_fact_of_the_table_has_its_expectation_here() -> None:
    assert [f.name for f in facts.FACTS] == list(EXPECTED)


@pytest.mark.parametrize("which", ["manager", "worker"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_fact_read_from_a_recorded_lab_host(name: str, which: str) -> None:
    parsed = read(which)
    assert EXPECTED[name](parsed, which), f"{name} on the {which}: {parsed}"
