"""Unit tests (no hosts): each backend's order, refusals and failure handling, run by the
real step protocol on fake connections. The facts are recorded from real lab hosts; the
fake nodes log every command and answer the few whose output a step reads. Consul's
API, the fact re-reads and the ping matrix are stubbed: the end-to-end suite runs them."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from overlaylab import dropins, gather, run
from overlaylab.cluster import Node
from overlaylab.errors import OverlaylabError
from overlaylab.facts import ROLE_LABEL, Attachment, HostFacts
from overlaylab.inventory import Host, Inventory
from overlaylab.mode import Mode
from overlaylab.options import Options
from overlaylab.pipelines import kv, swarm
from overlaylab.plan import Action
from overlaylab.report import RunReport
from overlaylab.run import Refused, run_steps
from overlaylab.steps import consul, dockerd, watches
from overlaylab.steps import network as network_step
from tests import dry_run_rule
from tests.unit.test_facts_render import FakeConn, recorded, with_info

NAMES = ("m", "w1", "w2")


@dataclass
class Log:
    lines: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fail: dict[str, str] = field(default_factory=dict)  # host -> a command fragment that fails there
    secrets: list[str] = field(default_factory=list)  # what put_secret wrote, never in a command
    consul_version: str = "Consul v1.8.7"  # what `consul version` of the image answers
    dead_watches: dict[str, int | str] = field(
        default_factory=dict
    )  # host -> its stopped store watches now, or "unknown"

    def add(self, host: str, what: str) -> None:
        with self.lock:
            self.lines.append((host, what))

    def commands(self, fragment: str) -> list[str]:
        return [h for h, c in self.lines if fragment in c]


@dataclass
class FakeNode(Node):
    log: Log = field(default_factory=Log)

    def result(self, command: str) -> tuple[int, str, str]:
        self.commands += 1
        if "systemctl restart docker.service" in command:  # a restart takes time: overlaps would show
            self.log.add(self.name, "restart-start")
            time.sleep(0.02)
        self.log.add(self.name, command)
        for host, fragment in self.log.fail.items():
            if host == self.name and fragment in command:
                return 1, "not-ready", "failed"
        if "docker network create" in command:  # and the inspect that reads it back
            return 0, '[{"Id": "0123456789abcdef", "Name": "ov_net1", "Driver": "overlay", "Scope": "global"}]\n', ""
        if "join-token" in command:
            return 0, "SWMTKN-secret\n", ""
        if "consul version" in command:
            return 0, self.log.consul_version + "\n", ""
        if "systemctl is-active docker.service" in command:
            return 0, "active\n", ""
        if "goroutine-stacks" in command:  # facts.dead_watches_script: no store watch stopped
            return 0, f"{self.log.dead_watches.get(self.name, 0)}\n", ""
        return 0, "ready\n", ""

    def put_secrets(self, files: dict[str, str]) -> None:
        for path, content in files.items():
            self.log.add(self.name, f"put-secret {path} {len(content)} bytes")
            self.log.secrets.append(content)

    def sh(self, command: str, check: bool = True) -> str:
        code, out, err = self.result(command)
        if check and code:
            from overlaylab.errors import OverlaylabError

            raise OverlaylabError(f"{self.name}: `{command[:40]}` failed: {err}")
        return out


def fresh(f: HostFacts, ip: str, hostname: str) -> HostFacts:
    """A host before overlaylab: no drop-in, backup, Consul, network or containers."""
    f = copy.deepcopy(f)
    f.dropin, f.backup, f.consul, f.network, f.containers, f.gossip = None, [], None, None, {}, False
    f.attached = {}
    f.advertise_ips, f.hostname = [ip], hostname
    return with_info(f, ClusterStore="", ClusterAdvertise="")


def cluster(state: str = "fresh") -> tuple[Inventory, list[FakeNode], Log]:
    log = Log()
    manager, worker = recorded("facts-manager-kv.txt"), recorded("facts-worker-kv.txt")
    facts = {"m": manager, "w1": worker, "w2": copy.deepcopy(worker)}
    facts["w2"].advertise_ips, facts["w2"].hostname = ["10.210.1.13"], "bm-docker-03"
    facts["w2"].info = {**facts["w2"].info, "ClusterAdvertise": "10.210.1.13:2376"}
    if state == "fresh":
        facts = {n: fresh(f, f.advertise_ips[0], f.hostname) for n, f in facts.items()}
    hosts = tuple(Host(n, f"{n}.example", "manager" if n == "m" else "worker", "eth1") for n in NAMES)
    nodes = [FakeNode(h, FakeConn(), facts[h.name], log=log) for h in hosts]
    inv = Inventory(path=Path("inv.yaml"), cluster="lab", hosts=hosts)
    if state != "fresh":  # recorded before the discovery and raft options: today's drop-ins and Consul
        for node in nodes:
            node.facts.dropin = dropins.dropin(inv, node, "10.210.1.11").wanted
        labels = nodes[0].facts.consul["Config"]["Labels"]  # type: ignore[index]
        labels[consul.SPEC_LABEL] = consul.spec_hash(inv, "10.210.1.11")
    return inv, nodes, log


@pytest.fixture(autouse=True)
def no_remote_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consul's API (an SSH forward), the fact re-reads and the ping matrix need real hosts."""
    monkeypatch.setattr(consul, "wait_leader", lambda inv, node, timeout=60: "10.210.1.11:8300")
    monkeypatch.setattr(consul, "wait_registered", lambda inv, node, wanted, timeout=45: dict.fromkeys(wanted, True))
    monkeypatch.setattr(gather, "read_one", lambda inv, node: None)
    monkeypatch.setattr(consul, "endpoints", lambda inv, node, network_id: None)  # the store cannot tell
    monkeypatch.setattr(run, "verify_step", lambda inv, nodes, report, sources=None, anchored=False, made=(): True)


def go(
    inv: Inventory, nodes: list[FakeNode], steps: Any, targets: tuple[str, ...] = NAMES, **opts: Any
) -> tuple[int, RunReport]:
    report = RunReport("t", list(NAMES), json_mode=True, stream=io.StringIO())
    teardown = opts.pop("teardown", False)
    ca = opts.pop("ca", None)
    code = run_steps(inv, Options(**opts), list(nodes), report, steps, targets, teardown=teardown, ca=ca)
    return code, report


def outcomes(report: RunReport) -> set[tuple[str, str, bool]]:
    return {(o["host"], o["step"], o["status"] == "changed") for o in report.outcomes if o["step"] != "verify"}


def test_kv_bootstrap_order_consul_then_the_manager_then_one_worker_at_a_time() -> None:
    inv, nodes, log = cluster()
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0, report.outcomes
    consul_run = log.lines.index(next(x for x in log.lines if "overlaylab-consul" in x[1] and "docker run" in x[1]))
    restarts = [(i, h) for i, (h, c) in enumerate(log.lines) if c == "restart-start"]
    assert [h for _, h in restarts] == ["m", "w1", "w2"]
    assert consul_run < restarts[0][0]
    # one at a time: each restart's command is logged before the next restart starts
    ends = [next(i for i, (h, c) in enumerate(log.lines) if h == host and "systemctl restart" in c) for host in NAMES]
    assert ends[0] < restarts[1][0] and ends[1] < restarts[2][0]
    creates = [i for i, (h, c) in enumerate(log.lines) if "docker network create" in c]
    anchors = [i for i, (h, c) in enumerate(log.lines) if "overlaylab-anchor" in c and "docker run" in c]
    assert len(creates) == 1 and len(anchors) == 3 and creates[0] < min(anchors) and max(ends) < creates[0]
    assert report.extra["restarts"] == dict.fromkeys(NAMES, "drop-in changed")


def test_the_dry_run_plans_exactly_what_the_run_reports_and_runs_nothing() -> None:
    inv, nodes, log = cluster()
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 0 and log.lines == []
    assert dry.extra["diffs"].keys() == set(NAMES)  # type: ignore[attr-defined]
    code, real = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0
    dry_run_rule.check(dry.document(0), real.document(0), left_out=("verify",))
    assert dry.extra["restarts"] == real.extra["restarts"]
    # what facts cannot foretell is said as such: the store watches (the restarts take the store
    # away); the peers are not read again on a fresh bootstrap, whose restarts held no container
    # on the network (every address is given once, after its host's restart)
    maybe = {(o["host"], o["step"]) for o in dry.outcomes if o["status"] == "may change"}
    assert maybe == {(h, "watches") for h in NAMES}
    assert not [o for o in [*dry.outcomes, *real.outcomes] if o["step"] == "peers"]
    assert dry.extra["may_restart"] == {}
    assert not any(o["status"] == "may change" for o in real.outcomes)


def test_a_second_run_on_a_bootstrapped_cluster_changes_and_restarts_nothing() -> None:
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:  # the recorded manager has its anchor; give the workers theirs
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nodes[0].facts.containers.pop("overlaylab-anchor-bm-docker-01", None)
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0 and report.changes == 0, [o for o in report.outcomes if o["status"] == "changed"]
    assert report.extra["restarts"] == {} and log.commands("systemctl restart") == []


def test_a_failed_overlay_restore_after_a_power_cut_restarts_that_dockerd_alone() -> None:
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nodes[1].facts.restore_failed = True
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    # twice: once without the cluster store (its driver drops the power cut's records), once with it
    assert code == 0 and log.commands("systemctl restart") == ["w1", "w1"]
    restarts = report.extra["restarts"]
    assert isinstance(restarts, dict) and list(restarts) == ["w1"] and "overlay restore failed" in restarts["w1"]


def test_a_workers_moved_address_restarts_that_worker_and_a_moved_manager_is_refused() -> None:
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nodes[2].facts.advertise_ips = ["10.210.1.113"]  # DHCP gave w2's eth1 another address
    code, report = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 0
    assert report.extra["restarts"] == {"w2": "dockerd advertises 10.210.1.13, but eth1 now has 10.210.1.113"}
    nodes[2].facts.advertise_ips = ["10.210.1.13"]
    nodes[0].facts.advertise_ips = ["10.210.1.111"]
    with pytest.raises(Refused, match=r"m: the manager's cluster address changed from 10.210.1.11 to 10.210.1.111 "):
        go(inv, nodes, kv.BOOTSTRAP)
    assert log.lines == []


def test_a_manager_cut_off_from_gossip_is_restarted_alone() -> None:
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    names = {n.name: n.facts.hostname for n in nodes}
    nodes[0].facts.gossip_gone = [names["w1"], names["w2"]]  # the manager last saw both workers fail
    nodes[1].facts.gossip_gone = nodes[2].facts.gossip_gone = [names["m"]]  # each worker misses only it
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0 and log.commands("systemctl restart") == ["m"]
    assert report.extra["restarts"] == {
        "m": "its gossip last saw w1, w2 fail and never joined them again, while they run"
    }


def mended_cluster(monkeypatch: pytest.MonkeyPatch) -> tuple[Inventory, list[FakeNode], Log]:
    """w1's drop-in edited by hand, so the run restarts w1; read again after that restart,
    w2's overlay sends 10.210.9.9 to w1, which has no container there (the address its
    restart moved); read after w2's own restart, no longer."""
    inv, nodes, log = cluster("bootstrapped")
    net = str((nodes[0].facts.network or {})["Id"])
    for i, node in enumerate(nodes):
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        # each anchor on the network: w1's restart stops and starts one (the peers step reads again)
        node.facts.attached = {
            f"overlaylab-anchor-{node.name}": Attachment("a" * 64, net, True, (), f"10.210.9.{i + 2}")
        }
        node.facts.gossip = True
    nodes[1].facts.dropin = (nodes[1].facts.dropin or "") + "# edited by hand\n"
    nid = str((nodes[2].facts.network or {})["Id"])[:10]
    reads = {"w2": 0}

    def read_one(inv: Inventory, node: Node) -> None:
        if node.name == "w2":
            node.facts.peers = {nid: {"10.210.9.9": "10.210.1.12"}} if reads["w2"] == 0 else {}
            reads["w2"] += 1

    monkeypatch.setattr(gather, "read_one", read_one)
    return inv, nodes, log


def test_a_host_the_runs_own_restart_left_with_a_stale_peer_is_restarted_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inv, nodes, log = mended_cluster(monkeypatch)
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 0 and dry.extra["restarts"] == {"w1": "drop-in changed"}
    checks = {o["host"]: o["detail"] for o in dry.outcomes if o["step"] == "peers"}
    assert set(checks) == set(NAMES) and all("(on w1)" in d for d in checks.values())
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0 and log.commands("systemctl restart") == ["w1", "w2"]
    restarts = report.extra["restarts"]
    assert isinstance(restarts, dict) and restarts["w2"].startswith("its overlay still sends 10.210.9.9 to w1")
    peers = {o["host"]: o["status"] for o in report.outcomes if o["step"] == "peers"}
    assert peers == {"w2": "changed", "m": "ok", "w1": "ok"}
    w2 = [c for h, c in log.lines if h == "w2"]
    restart = next(i for i, c in enumerate(w2) if "systemctl restart" in c)
    assert any("overlaylab-anchor-w2" in c and "docker run" in c for c in w2[restart:])  # its anchor again


def test_a_stale_peer_left_by_the_run_on_a_host_with_users_containers_needs_allow_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inv, nodes, log = mended_cluster(monkeypatch)
    nodes[2].facts.containers["app"] = ""  # a user's container: a restart stops it
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 1 and log.commands("systemctl restart") == ["w1"]
    failed = {o["host"]: o["detail"] for o in report.outcomes if o["status"] == "failed"}
    assert list(failed) == ["w2"] and "pass --allow-restart" in failed["w2"], failed


@pytest.mark.parametrize("w1_restarts", [True, False], ids=["w1 restarts for a power cut", "w1 stays"])
def test_entries_toward_a_host_the_run_restarts_are_judged_after_its_restart(
    monkeypatch: pytest.MonkeyPatch, w1_restarts: bool
) -> None:
    """m and w2 send 10.210.9.9 to w1, where no container has it now. If w1 restarts for a
    reason of its own (its overlay restore failed: its containers are not back yet), the
    entries are not judged before its restart: only w1 restarts, and the peers step reads
    them again after it (here w1's container took the address again: nothing more). If w1
    stays as it is, they are stale, and m and w2 restart for them."""
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nid = str((nodes[0].facts.network or {})["Id"])[:10]
    for node in (nodes[0], nodes[2]):
        node.facts.network = copy.deepcopy(nodes[0].facts.network)
        node.facts.peers = {nid: {"10.210.9.9": "10.210.1.12"}}
    nodes[1].facts.restore_failed = w1_restarts

    def read_one(inv: Inventory, node: Node) -> None:
        """Read again: a restart empties a host's table; after w1's, w1 serves 10.210.9.9 again."""
        if {"w1", node.name} & set(log.commands("systemctl restart")):
            node.facts.peers = {}

    monkeypatch.setattr(gather, "read_one", read_one)
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    restarts = report.extra["restarts"]
    assert code == 0 and isinstance(restarts, dict), [o for o in report.outcomes if o["status"] == "failed"]
    if w1_restarts:
        assert list(restarts) == ["w1"] and "overlay restore failed" in restarts["w1"], restarts
    else:
        assert sorted(restarts) == ["m", "w2"], restarts
        assert all(why.startswith("its overlay still sends 10.210.9.9 to w1") for why in restarts.values())


OLD = "0ld1d" * 8


def store_lost(nodes: list[FakeNode]) -> None:
    """Consul's data lost: the store answers, without the network; each host runs an anchor
    and a user container on the lost network, and w2 also has a stopped one with an alias."""
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.containers[f"app-{node.name}"] = ""
        node.facts.attached = {
            f"overlaylab-anchor-{node.name}": Attachment("a" * 64, OLD, True),
            f"app-{node.name}": Attachment("b" * 64, OLD, True),
        }
        node.facts.gossip = True
    nodes[2].facts.stopped["db"] = ""
    nodes[2].facts.attached["db"] = Attachment("c" * 64, OLD, False, ("database",), "10.0.9.50")
    nodes[0].facts.network, nodes[0].facts.store_leader = None, "10.210.1.11:8300"


def test_a_network_the_store_lost_restarts_the_daemons_holding_it_then_is_made_again_and_reconnected() -> None:
    inv, nodes, log = cluster("bootstrapped")
    inv = Inventory(path=inv.path, cluster="lab", hosts=inv.hosts, subnet="10.0.9.0/24")
    store_lost(nodes)
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True, allow_restart=True)
    assert code == 0
    detail = {(o["host"], o["step"]): o["detail"] for o in dry.outcomes}
    assert detail[("m", "network")] == (
        "would recreate ov_net1: the cluster store lost its definition (containers are on 0ld1d0ld1d0l)"
    )
    assert dry.extra["restarts"] == {
        n: f"the store lost ov_net1 (0ld1d0ld1d0l); this dockerd still runs it for app-{n}, overlaylab-anchor-{n}, "
        "and its VXLAN ID would block the new one"
        for n in NAMES
    }
    assert (
        detail[("w2", "reconnect")]
        == "would reconnect app-w2, db to ov_net1 (on the lost 0ld1d0ld1d0l), then start app-w2"
    )
    assert all(detail[(n, "anchor")] == "would create (dockerd restarted)" for n in NAMES)
    with pytest.raises(Refused, match="restarting dockerd stops app-m"):
        go(inv, nodes, kv.BOOTSTRAP)  # the restarts stop the user's containers: only with --allow-restart
    assert log.lines == []
    code, report = go(inv, nodes, kv.BOOTSTRAP, allow_restart=True)
    assert code == 0 and log.commands("systemctl restart docker.service") == list(NAMES)
    assert report.extra["left_on_lost_network"] == {"m": ["app-m"], "w1": ["app-w1"], "w2": ["app-w2", "db"]}
    w2 = [c for h, c in log.lines if h == "w2" and "docker network connect" in c]
    assert w2 == [
        "docker network disconnect -f ov_net1 app-w2 && docker network connect ov_net1 app-w2 && "
        "docker network disconnect -f ov_net1 db && docker network connect --alias database --ip 10.0.9.50 ov_net1 db"
        " && docker start app-w2 >/dev/null"
    ]
    commands = [c for _, c in log.lines]
    created = next(i for i, c in enumerate(commands) if "docker network create" in c)
    assert created < commands.index(w2[0])  # connected to the network made again, once it is there
    removed = [part for c in commands for part in re.split(r"&&|;", c) if "docker rm" in part]
    assert removed and not [p for p in removed if "app-" in p or " db" in p]  # nothing of the user's removed


def test_a_store_that_did_not_answer_lost_nothing_the_dry_run_waits_for_it() -> None:
    """The Consul container removed, its volume kept: the facts, read while it was away, show
    no network; the dry run plans no restart, no new network and no anchor change."""
    inv, nodes, _ = cluster("bootstrapped")
    store_lost(nodes)
    nodes[0].facts.store_leader, nodes[0].facts.consul, nodes[0].facts.consul_volume = "", None, True
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 0 and dry.extra["restarts"] == {}
    detail = {(o["host"], o["step"]): o["detail"] for o in dry.outcomes}
    assert detail[("m", "consul")] == "would create Consul (missing)"
    assert detail[("m", "network")] == (
        "ov_net1: not known until Consul is back with its data (kept on overlaylab-consul-data)"
    )
    assert all(detail[(n, "anchor")] == "running" for n in NAMES)
    assert not [k for k in detail if k[1] == "reconnect"]


def test_consul_made_without_its_volume_is_an_empty_store_the_network_is_created_not_waited_for() -> None:
    inv, nodes, _ = cluster("fresh")
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    detail = {(o["host"], o["step"]): o["detail"] for o in dry.outcomes}
    assert code == 0 and detail[("m", "network")] == "would create ov_net1"


def test_a_restart_that_stops_a_users_container_refuses_the_whole_run_before_any_command() -> None:
    inv, nodes, log = cluster()
    nodes[2].facts.containers["users_app"] = ""
    with pytest.raises(Refused, match=r"w2: drop-in changed: restarting dockerd stops users_app; pass --allow-restart"):
        go(inv, nodes, kv.BOOTSTRAP)
    assert log.lines == []
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 2 and "the restart stops: users_app" in next(
        o["detail"] for o in dry.outcomes if o["host"] == "w2" and o["step"] == "dockerd"
    )
    assert dry.extra["restarts"] == {}  # a refused run restarts nothing
    code, _ = go(inv, nodes, kv.BOOTSTRAP, allow_restart=True)
    assert code == 0 and log.commands("systemctl restart") == list(NAMES)


def test_a_network_with_other_settings_is_a_refusal_in_the_dry_run_and_the_run() -> None:
    inv, nodes, log = cluster("bootstrapped")
    inv = Inventory(path=inv.path, cluster="lab", hosts=inv.hosts, subnet="10.99.0.0/24")
    code, _ = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 2
    with pytest.raises(Refused, match="network ov_net1 exists with other settings"):
        go(inv, nodes, kv.BOOTSTRAP)
    assert log.lines == []


def test_an_mtu_compared_as_the_network_has_it_an_explicit_1450_is_docker_s_default() -> None:
    inv, nodes, log = cluster("bootstrapped")
    assert "com.docker.network.driver.mtu" not in (nodes[0].facts.network or {}).get("Options", {})
    same = Inventory(path=inv.path, cluster="lab", hosts=inv.hosts, mtu=1450)
    code, _ = go(same, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 0
    other = Inventory(path=inv.path, cluster="lab", hosts=inv.hosts, mtu=1400)
    with pytest.raises(Refused, match=r"MTU 1450, wanted 1400: set network.mtu: 1450 to keep it"):
        go(other, nodes, kv.BOOTSTRAP)
    assert log.lines == []


def test_a_network_is_created_with_the_inventorys_mtu_in_each_mode() -> None:
    for pipeline in (kv.BOOTSTRAP, swarm.BOOTSTRAP):
        inv, nodes, log = cluster("fresh")
        inv = Inventory(path=inv.path, cluster=inv.cluster, hosts=inv.hosts, mtu=1400)
        code, _ = go(inv, nodes, pipeline)
        created = [c for _, c in log.lines if "docker network create" in c]
        assert code == 0 and len(created) == 1, log.lines
        # the driver's option is the underlay's MTU: its containers get 50 bytes less (VXLAN)
        assert "--opt com.docker.network.driver.mtu=1450" in created[0], created


@pytest.mark.parametrize(
    ("options", "mtu"), [({}, 1450), ({"com.docker.network.driver.mtu": "1500"}, 1450),
                         ({"com.docker.network.driver.mtu": "1450"}, 1400), ({"com.docker.network.driver.mtu": "0"}, 1450),
                         ({"com.docker.network.driver.mtu": "9050"}, 9000)],
)  # fmt: skip
def test_a_networks_mtu_is_what_its_containers_get(options: dict[str, str], mtu: int) -> None:
    assert network_step.effective_mtu({"Options": options}) == mtu


def test_a_manager_that_fails_to_come_up_stops_the_run_before_any_worker() -> None:
    inv, nodes, log = cluster()
    log.fail["m"] = "systemctl restart docker.service && end="
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 1
    assert log.commands("systemctl restart docker.service && end=") == ["m"]
    assert log.commands("systemctl reset-failed docker.service; systemctl restart") == ["m"]  # the rollback
    assert not [h for h in log.commands("systemctl restart") if h != "m"]
    assert not log.commands("docker network create")
    failed = [o for o in report.outcomes if o["status"] == "failed"]
    assert [(o["host"], o["step"]) for o in failed] == [("m", "dockerd")]
    assert "rolled back" in failed[0]["detail"]


def test_join_node_touches_only_its_worker_and_needs_consul_running() -> None:
    inv, nodes, log = cluster("bootstrapped")
    nodes[2].facts = fresh(nodes[2].facts, "10.210.1.13", "bm-docker-03")
    for node in nodes[:2]:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    code, report = go(inv, nodes, kv.BOOTSTRAP, targets=("w2",))
    assert code == 0
    assert {h for h, c in log.lines if c == "restart-start"} == {"w2"}
    assert report.extra["restarts"] == {"w2": "drop-in changed"}
    nodes[0].facts.consul = None
    with pytest.raises(Refused, match="run bootstrap-cluster first"):
        go(inv, nodes, kv.BOOTSTRAP, targets=("w2",))


def test_swarm_undoes_kv_first_manager_first_then_inits_and_joins_without_printing_the_token() -> None:
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.backup, node.facts.backup_content = ["10-machine.conf.absent"], None
    code, report = go(inv, nodes, swarm.BOOTSTRAP)
    assert code == 0, [o for o in report.outcomes if o["status"] == "failed"]
    restores = [h for h, c in log.lines if "systemctl restart docker.service && rm -f" in c]
    assert restores == ["m", "w1", "w2"]
    order = [c.split()[2] for h, c in log.lines if c.startswith("docker swarm") and "join-token" not in c]
    assert order[0] == "init" and sorted(order[1:]) == ["join", "join"]
    assert log.commands("docker rm -f overlaylab-consul") == ["m"]
    assert all("SWMTKN" not in o["detail"] for o in report.outcomes)
    assert report.extra["restarts"] == dict.fromkeys(NAMES, "removing the cluster flags")


def test_teardown_restores_the_workers_before_the_manager_and_removes_consul_last() -> None:
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.backup = ["10-machine.conf.absent"]
    code, report = go(inv, nodes, kv.TEARDOWN, teardown=True)
    assert code == 0, report.outcomes
    restores = [h for h, c in log.lines if "systemctl restart docker.service && rm -f" in c]
    assert set(restores[:2]) == {"w1", "w2"} and restores[2] == "m"
    last = log.lines[-1]
    assert last[0] == "m" and "docker volume rm" in last[1]
    assert report.extra["restarts"] == dict.fromkeys(NAMES, "restoring the drop-in")
    code, again = go(inv, nodes, kv.TEARDOWN, teardown=True)  # the facts now say: nothing of ours is left
    assert code == 0 and again.changes == 0 and not dockerd.has_backup(nodes[0])


def swarm_cluster() -> tuple[Inventory, list[FakeNode], Log]:
    """A swarm made by overlaylab: the manager manages it, the workers are its workers."""
    inv, nodes, log = cluster()
    info = {"LocalNodeState": "active", "ControlAvailable": True, "Cluster": {"ID": "cid"}}
    with_info(nodes[0].facts, Swarm={**info, "RemoteManagers": [{"Addr": "10.210.1.11:2377"}]})
    for node in nodes[1:]:
        with_info(node.facts, Swarm={"LocalNodeState": "active", "RemoteManagers": [{"Addr": "10.210.1.11:2377"}]})
    nodes[0].facts.network = {"Driver": "overlay", "Scope": "swarm", "Attachable": True, "Labels": {}, "Id": "n1"}
    nodes[0].facts.network["Labels"]["overlaylab.role"] = "network"
    return inv, nodes, log


@pytest.mark.parametrize(
    ("targets", "fresh"),
    [(NAMES, True), (("w2",), False), (NAMES, False)],
    ids=["bootstrap", "join-node", "a re-run where one worker left the swarm"],
)
def test_swarm_dry_runs_plan_what_the_run_does(targets: tuple[str, ...], fresh: bool) -> None:
    """The third: one worker joins while the other is in the swarm already (its action no
    change, and no payload: the join's token goes only to those that join)."""
    inv, nodes, log = cluster()
    if not fresh:
        inv, nodes, log = swarm_cluster()
        with_info(nodes[2].facts, Swarm={"LocalNodeState": "inactive"})
    code, dry = go(inv, nodes, swarm.BOOTSTRAP, targets=targets, dry_run=True)
    assert code == 0 and log.lines == []
    code, real = go(inv, nodes, swarm.BOOTSTRAP, targets=targets)
    assert code == 0 and outcomes(dry) == outcomes(real), real.outcomes
    joined = {h for h, c in log.lines if "docker swarm join --token" in c}
    assert joined == ({"w1", "w2"} if fresh else {"w2"})


def test_swarm_teardown_leaves_with_the_workers_first_and_its_dry_run_matches() -> None:
    inv, nodes, log = swarm_cluster()
    code, dry = go(inv, nodes, swarm.TEARDOWN, teardown=True, dry_run=True)
    assert code == 0 and log.lines == []
    code, real = go(inv, nodes, swarm.TEARDOWN, teardown=True)
    assert code == 0 and outcomes(dry) == outcomes(real)
    leaves = [h for h, c in log.lines if c.startswith("docker swarm leave")]
    assert set(leaves[:2]) == {"w1", "w2"} and leaves[2] == "m"
    assert log.commands("docker network rm") == ["m"] and log.lines.index(
        next(x for x in log.lines if "docker network rm" in x[1])
    ) < log.lines.index(next(x for x in log.lines if x[1].startswith("docker swarm leave")))


def test_status_names_what_a_re_run_would_mend_on_a_kv_host() -> None:
    """`fab status` evaluates the plan's own repairs (repairs/): the first restart reason
    (one restart mends them all, and the plan names that one), then each other mend's."""
    from overlaylab.provision import mends

    inv, nodes, _ = cluster("bootstrapped")
    manager, worker = nodes[0], nodes[1]
    report = RunReport("status", list(NAMES), json_mode=True, stream=io.StringIO())
    worker.facts.gossip = True
    worker.facts.containers[f"overlaylab-anchor-{worker.name}"] = "anchor"
    registered = {f"{n.advertise_ip}:2376" for n in (manager, worker)}
    assert mends(inv, Options(), [manager, worker], report, registered)[worker.name] == []
    worker.facts.containers.clear()  # its dockerd restarted: the anchor (no restart policy) stopped
    worker.facts.stray_threads = 2
    worker.facts.restore_failed = True
    assert mends(inv, Options(), [manager, worker], report, {f"{manager.advertise_ip}:2376"})[worker.name] == [
        "dockerd's overlay restore failed at its start (state left by a power cut): "
        "no container of this host can join the overlay until it restarts",
        "its anchor is not running",
        "dockerd not registered in Consul",
    ]
    worker.facts.held = {"users_app2": "always"}  # a run stopped while it held it back
    assert mends(inv, Options(), [manager, worker], report, registered)[worker.name][-1] == (
        "users_app2 held back by a run that stopped: not running, restart policies set aside"
    )
    worker.facts.held = {}
    worker.facts.docker_active = "failed"
    assert mends(inv, Options(), [manager, worker], report, None)[worker.name] == ["docker.service is failed"]
    worker.facts.dropin = None  # not a host of a kv cluster of ours
    assert mends(inv, Options(), [manager, worker], report, registered)[worker.name] == []


@pytest.mark.parametrize(
    ("version", "args"),
    [
        ("Consul v1.8.7\n", ["-hcl", "performance { raft_multiplier = 1 }"]),
        ("Consul v0.5.2\n", []),  # progrium/consul: no such setting, and already fast
        ("", []),
    ],
)
def test_the_raft_multiplier_is_passed_only_to_a_consul_that_knows_it(version: str, args: list[str]) -> None:
    inv, nodes, _ = cluster()

    class Versioned(FakeNode):
        def sh(self, command: str, check: bool = True) -> str:
            return version if "version" in command else super().sh(command, check)

    manager = Versioned(nodes[0].host, nodes[0].conn, nodes[0].facts)
    assert consul.raft_args(inv, manager)[0] == args


def test_an_anchor_whose_name_the_store_does_not_hold_is_created_in_one_command_without_a_witness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inv, nodes, log = cluster()
    monkeypatch.setattr(consul, "endpoints", lambda inv, node, network_id: {})  # the network, no endpoint yet
    code, _ = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0
    assert not log.commands("docker network disconnect")
    assert sorted(log.commands("docker run -d --name overlaylab-anchor-")) == sorted(NAMES)


def test_an_anchor_whose_name_the_store_may_hold_clears_the_record_from_another_host_first() -> None:
    inv, nodes, log = cluster()  # the fixture's store cannot tell (None): the careful way
    code, _ = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0
    clears = [(h, c) for h, c in log.lines if "docker network disconnect -f ov_net1 overlaylab-anchor-" in c]
    assert {c.split()[5] for h, c in clears if not c.startswith("docker rm")} == {
        f"overlaylab-anchor-{n}" for n in NAMES
    }
    assert all(h != c.split()[5].removeprefix("overlaylab-anchor-") for h, c in clears if not c.startswith("docker rm"))


def test_a_restarted_hosts_anchor_asks_for_its_old_address_again() -> None:
    """w1's drop-in edited by hand, its anchor at 10.210.9.3: the Anchor step makes it again
    after the restart at 10.210.9.3 (`--ip`), not at the first free address."""
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    w1 = nodes[1].facts
    w1.dropin = (w1.dropin or "") + "# edited by hand\n"
    network = dict(w1.network or {})
    network["Containers"] = {"c0ffee": {"Name": "overlaylab-anchor-w1", "IPv4Address": "10.210.9.3/24"}}
    w1.network = network
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0, report.outcomes
    runs = [c for h, c in log.lines if h == "w1" and "docker run -d --name overlaylab-anchor-w1" in c]
    assert len(runs) == 1 and "--ip 10.210.9.3 " in runs[0]


def test_verify_uses_the_anchors_only_when_the_store_shows_each_on_its_own_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inv, nodes, _ = cluster("bootstrapped")
    ips = {n.name: n.advertise_ip for n in nodes}
    held = {f"overlaylab-anchor-{n}": (f"10.0.9.{i + 2}", ips[n]) for i, n in enumerate(NAMES)}
    monkeypatch.setattr(consul, "endpoints", lambda inv, node, network_id: held)
    assert run.standing_anchors(inv, list(nodes), set(NAMES)) == {
        n: (f"overlaylab-anchor-{n}", f"10.0.9.{i + 2}") for i, n in enumerate(NAMES)
    }
    assert run.standing_anchors(inv, list(nodes), {"m", "w1"}) is None  # w2's: neither seen nor made
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
    assert run.standing_anchors(inv, list(nodes), set()) is not None  # running, as the facts saw
    held["overlaylab-anchor-w2"] = ("10.0.9.4", ips["w1"])  # the record is another host's
    assert run.standing_anchors(inv, list(nodes), set()) is None
    del held["overlaylab-anchor-w2"]
    assert run.standing_anchors(inv, list(nodes), set()) is None


def test_swarm_mode_creates_its_network_whatever_consul_says() -> None:
    """kv's "the store did not answer" does not apply: a swarm keeps its networks itself."""
    inv, nodes, _ = cluster("fresh")
    code, dry = go(inv, nodes, swarm.BOOTSTRAP, dry_run=True)
    detail = {(o["host"], o["step"]): o["detail"] for o in dry.outcomes}
    assert code == 0 and detail[("m", "network")] == "would create ov_net1"


def test_teardown_plans_to_remove_the_network_its_anchors_leave_as_the_run_does() -> None:
    """The dry pass projects the anchors gone; the network's own record still lists them
    (it is read once): they are overlaylab's by name, not a user's containers on it."""
    inv, nodes, _ = cluster("bootstrapped")
    m = nodes[0].facts
    assert m.network is not None
    m.network["Containers"] = {"ep-1": {"Name": "overlaylab-anchor-m"}}
    m.containers["overlaylab-anchor-m"] = "anchor"
    code, dry = go(inv, nodes, kv.TEARDOWN, dry_run=True, teardown=True, allow_restart=True)
    detail = {(o["host"], o["step"]): o["detail"] for o in dry.outcomes}
    assert code == 0 and detail[("m", "network")] == "would remove ov_net1"
    m.network["Containers"]["ep-2"] = {"Name": "users_app"}
    code, dry = go(inv, nodes, kv.TEARDOWN, dry_run=True, teardown=True, allow_restart=True)
    detail = {(o["host"], o["step"]): o["detail"] for o in dry.outcomes}
    assert detail[("m", "network")] == "ov_net1 kept: containers of yours are on it (users_app)"


def ha_cluster(count: int = 5, servers: int = 3) -> tuple[Inventory, list[FakeNode], Log]:
    """A fresh cluster of ``count`` hosts whose inventory asks for ``servers`` Consul servers."""
    log = Log()
    manager, worker = recorded("facts-manager-kv.txt"), recorded("facts-worker-kv.txt")
    names = ["m", *[f"w{i}" for i in range(1, count)]]
    hosts = tuple(Host(n, f"{n}.example", "manager" if n == "m" else "worker", "eth1") for n in names)
    nodes = [
        FakeNode(h, FakeConn(), fresh(manager if i == 0 else worker, f"10.210.1.{11 + i}", f"bm-{i}"), log=log)
        for i, h in enumerate(hosts)
    ]
    inv = Inventory(path=Path("inv.yaml"), cluster="lab", hosts=hosts, consul_servers=tuple(names[:servers]))
    return inv, nodes, log


def test_ha_bootstrap_writes_one_key_everywhere_then_the_servers_then_the_agents_and_points_dockerd_at_its_agent() -> (
    None
):
    inv, nodes, log = ha_cluster()
    report = RunReport("t", [n.name for n in nodes], json_mode=True, stream=io.StringIO())
    code = run_steps(inv, Options(), list(nodes), report, kv.BOOTSTRAP, [n.name for n in nodes])
    assert code == 0, report.outcomes
    assert sorted(log.commands("put-secret")) == ["m", "w1", "w2", "w3", "w4"]
    assert len(set(log.secrets)) == 1  # one key, the same on every host
    key = log.secrets[0]
    assert all(key not in c for _, c in log.lines)  # never on a command line
    runs = {h: (i, c) for i, (h, c) in enumerate(log.lines) if "docker run -d --name overlaylab-consul" in c}
    assert set(runs) == {"m", "w1", "w2", "w3", "w4"}
    assert max(runs[s][0] for s in ("m", "w1", "w2")) < min(runs[a][0] for a in ("w3", "w4"))
    assert all("-bootstrap-expect=3" in runs[s][1] for s in ("m", "w1", "w2"))
    assert all("-server" not in runs[a][1] and "-retry-join=10.210.1.11" in runs[a][1] for a in ("w3", "w4"))
    assert all("'-client=127.0.0.1 10.210.1.1" in c for _, c in runs.values())
    assert all(f"{consul.KEY_FILE}:{consul.KEY_MOUNT}:ro" in c for _, c in runs.values())
    written = [c for _, c in log.lines if "10-machine.conf" in c and "base64 -d" in c]
    assert len(written) == 5


def test_ha_mode_refuses_a_consul_older_than_1_0_in_preflight_before_anything_changes() -> None:
    inv, nodes, log = ha_cluster()
    log.consul_version = "Consul v0.5.2"
    from overlaylab.checks import preflight

    problem = preflight.consul_version_problem(inv, list(nodes))
    assert problem is not None and problem[0] == "m"
    assert "needs Consul 1.0 or later in progrium/consul" in problem[1] and "Consul v0.5.2" in problem[1]
    assert [c for _, c in log.lines] == ["docker run --rm --entrypoint consul progrium/consul version 2>&1 | head -n 1"]
    log.consul_version = "Consul v1.8.7"
    assert preflight.consul_version_problem(inv, list(nodes)) is None
    single, _, _ = ha_cluster(servers=1)
    assert preflight.consul_version_problem(single, list(nodes)) is None  # one server: any Consul


def running_consul(status: str = "running") -> dict[str, Any]:
    return {
        "Config": {"Labels": {ROLE_LABEL: "consul"}},
        "State": {"Running": status == "running", "Status": status},
    }


def test_without_a_quorum_of_servers_the_run_refuses_before_any_change_and_says_how_to_bring_them_back() -> None:
    """HA mode once its servers exist: 2 of 3 stopped is refused (exit 2, no command run);
    1 of 3 stopped keeps the quorum and goes on; the switch from one server (only the
    manager's exists) is not mistaken for a lost quorum."""
    inv, nodes, log = ha_cluster()
    by_name = {n.name: n for n in nodes}
    for n in nodes:
        n.facts.consul = running_consul()
    by_name["m"].facts.store_leader = "10.210.1.12:8300"  # what a lone server says for a few seconds
    by_name["w1"].facts.consul = running_consul("exited")
    by_name["w2"].facts.consul = running_consul("exited")
    problem = consul.quorum_problem(inv, by_name)
    assert problem is not None and problem.startswith(
        "Consul: no leader, 1 of 3 servers up; down: w1 (exited), w2 (exited). Without a quorum (2 of 3)"
    )
    assert "docker start overlaylab-consul" in problem
    report = RunReport("t", [n.name for n in nodes], json_mode=True, stream=io.StringIO())
    with pytest.raises(Refused):
        run.preflight_step(inv, list(nodes), report, Mode.KV)
    failed = {o["host"]: o["detail"] for o in report.outcomes if o["status"] == "failed"}
    assert list(failed) == ["m"] and failed["m"].startswith("Consul: no leader, 1 of 3 servers up")
    assert log.lines == []
    by_name["w2"].facts.consul, by_name["m"].facts.store_leader = running_consul(), "10.210.1.12:8300"
    assert consul.quorum_problem(inv, by_name) is None
    assert consul.quorum_line(inv, by_name) == "Consul: leader 10.210.1.12:8300, 2 of 3 servers up; down: w1 (exited)"
    for name in ("w1", "w2"):
        by_name[name].facts.consul = None  # the switch from one server: only the manager's exists
    assert consul.quorum_problem(inv, by_name) is None
    del by_name["w1"]  # a server host that did not answer (status, verify)
    assert consul.quorum_line(inv, by_name).endswith("1 of 3 servers up; down: w1 (unreachable), w2 (missing)")


def test_the_hashicorp_flavour_in_ha_keeps_root_to_read_the_root_only_key() -> None:
    inv, _, _ = ha_cluster()
    hashi = dataclasses.replace(inv, consul_image="hashicorp/consul", consul_flavor="hashicorp")
    command = consul.run_command(hashi, "10.210.1.11", None, "server", ("10.210.1.11", "10.210.1.12"))
    assert (
        "-e CONSUL_DISABLE_PERM_MGMT=1" in command
        and "/etc/overlaylab/consul/gossip.json:/overlaylab/gossip.json:ro" in command
    )
    assert command.split("hashicorp/consul ")[1].startswith("agent -server -bootstrap-expect=3")
    assert "CONSUL_DISABLE_PERM_MGMT" not in consul.run_command(inv, "10.210.1.11", None, "server", ())


def test_five_servers_each_expect_five_and_retry_join_the_four_others() -> None:
    inv, nodes, log = ha_cluster(count=6, servers=5)
    report = RunReport("t", [n.name for n in nodes], json_mode=True, stream=io.StringIO())
    assert run_steps(inv, Options(), list(nodes), report, kv.BOOTSTRAP, [n.name for n in nodes]) == 0
    runs = {h: c for h, c in log.lines if "docker run -d --name overlaylab-consul" in c}
    servers = ["m", "w1", "w2", "w3", "w4"]
    assert all("-bootstrap-expect=5" in runs[s] for s in servers) and "-server" not in runs["w5"]
    for i, s in enumerate(servers):
        joins = {part.split("=")[1] for part in runs[s].split() if part.startswith("-retry-join=")}
        assert joins == {f"10.210.1.{11 + j}" for j in range(5) if j != i}
    assert {part for part in runs["w5"].split() if part.startswith("-retry-join=")} == {
        f"-retry-join=10.210.1.{11 + j}" for j in range(5)
    }


class FakeConsul:
    """Consul's KV API as the store-watch step uses it: each write recorded; the event
    starts the stopped watches again where ``restarts`` says so."""

    def __init__(self, written: list[tuple[str, ...]], log: Log, restarts: bool) -> None:
        self.kv = self
        self.written, self.log, self.restarts = written, log, restarts

    def put(self, key: str, value: str) -> bool:
        self.written.append(("put", key, value))
        return True

    def delete(self, key: str) -> bool:
        self.written.append(("delete", key))
        if self.restarts:
            self.log.dead_watches.clear()
        return True


@pytest.mark.parametrize("case", ["started by the event", "still stopped", "started by discovery itself"])
def test_a_stopped_store_watch_is_started_again_by_one_discovery_event_without_a_restart(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Fake hosts and Consul: the dry run says the check; the run reads the stacks again,
    and only where the watch still stopped writes one empty key under docker/nodes/ and
    removes it, restarts nothing, and reads the stacks again."""
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:  # nothing else to do: no anchor to make, gossip up
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nodes[0].facts.containers.pop("overlaylab-anchor-bm-docker-01", None)
    nodes[1].facts.dead_watches = 1
    log.dead_watches["w1"] = 0 if case == "started by discovery itself" else 1
    written: list[tuple[str, ...]] = []

    @contextlib.contextmanager
    def client(inv: Inventory, node: Any) -> Iterator[FakeConsul]:
        yield FakeConsul(written, log, restarts=case == "started by the event")

    monkeypatch.setattr(watches, "consul_client", client)
    monkeypatch.setattr(watches, "WAIT", 0.1)
    _, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    planned = [o for o in dry.outcomes if o["step"] == "watches"]
    assert [(o["host"], o["status"]) for o in planned] == [("w1", "may change")]  # discovery may start it first
    assert planned[0]["detail"].startswith("may change, if it is still so when read again (1 store watch(es)")
    assert written == [] and dry.extra["may_restart"] == {}
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert "w1" not in report.extra["restarts"]  # type: ignore[operator]
    done = {o["host"]: (o["status"], o["detail"]) for o in report.outcomes if o["step"] == "watches"}
    if case == "started by discovery itself":
        assert written == [] and done == {"w1": ("ok", "its store watch runs (started again by discovery)")}
        return
    assert written == [("put", watches.NUDGE_KEY, ""), ("delete", watches.NUDGE_KEY)]
    assert watches.NUDGE_KEY.startswith("docker/nodes/")
    if case == "started by the event":
        assert done == {"w1": ("changed", "its store watch started again (no restart)")}
    else:
        assert done["w1"][0] == "failed" and "still, after a discovery event" in done["w1"][1]
        assert code != 0


def test_a_no_op_run_with_every_store_watch_alive_has_no_watches_step(monkeypatch: pytest.MonkeyPatch) -> None:
    inv, nodes, _ = cluster("bootstrapped")
    monkeypatch.setattr(watches, "consul_client", lambda inv, node: pytest.fail("Consul written"))
    _, report = go(inv, nodes, kv.BOOTSTRAP)
    assert not [o for o in report.outcomes if o["step"] == "watches"]


def test_a_stack_dump_that_never_comes_is_unknown_and_fails_the_host_never_counts_as_none_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fake hosts: w1's facts had no stack dump (None). The dry run says the watches step may
    change it; the run reads again, gets no dump either, and fails that host (exit 1),
    writing nothing to Consul."""
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nodes[0].facts.containers.pop("overlaylab-anchor-bm-docker-01", None)
    nodes[1].facts.dead_watches = None
    log.dead_watches["w1"] = "unknown"
    monkeypatch.setattr(watches, "consul_client", lambda inv, node: pytest.fail("Consul written"))
    _, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    planned = {o["host"]: (o["status"], o["detail"]) for o in dry.outcomes if o["step"] == "watches"}
    assert list(planned) == ["w1"] and planned["w1"][0] == "may change"
    assert "no goroutine stack dump" in planned["w1"][1]
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    done = {o["host"]: (o["status"], o["detail"]) for o in report.outcomes if o["step"] == "watches"}
    assert code == 1 and done["w1"][0] == "failed" and "cannot be told" in done["w1"][1], done
    assert len(log.commands("goroutine-stacks")) == 1  # read once more, in the step


def test_a_run_that_takes_the_store_away_says_every_hosts_watch_may_change_and_reads_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fake hosts: Consul made again on the manager (its container gone), no restart. Every
    host's watch may stop while the store is away: the dry run says so on each, as a
    condition; the run reads every host's stacks after it, and mends the one that stopped.
    The watches of a run that leaves the store alone are not mentioned (above)."""
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nodes[0].facts.consul = None
    nodes[0].facts.containers.pop("overlaylab-consul", None)
    _, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    said = {(o["host"], o["step"]): (o["status"], o["detail"]) for o in dry.outcomes}
    assert said[("m", "consul")][0] == "changed"
    assert dry.extra["restarts"] == {} and dry.extra["may_restart"] == {}
    for host in NAMES:
        status, detail = said[(host, "watches")]
        assert status == "may change" and "while this run makes the store unavailable" in detail, (host, detail)
    # the run reads every host's stacks once more after it (no later step read them again)
    # and where w2's watch stopped meanwhile, makes it watch again
    log.dead_watches["w2"] = 1
    written: list[tuple[str, ...]] = []

    @contextlib.contextmanager
    def client(inv: Inventory, node: Any) -> Iterator[FakeConsul]:
        yield FakeConsul(written, log, restarts=True)

    monkeypatch.setattr(watches, "consul_client", client)
    code, real = go(inv, nodes, kv.BOOTSTRAP)
    done = {o["host"]: o["status"] for o in real.outcomes if o["step"] == "watches"}
    assert code == 0 and done == {"m": "ok", "w1": "ok", "w2": "changed"}, real.outcomes
    assert written == [("put", watches.NUDGE_KEY, ""), ("delete", watches.NUDGE_KEY)]
    dry_run_rule.check(dry.document(0), real.document(0), left_out=("verify",))


def anchored_cluster() -> tuple[Inventory, list[FakeNode], Log]:
    """A bootstrapped cluster, each host with its anchor, gossip up."""
    inv, nodes, log = cluster("bootstrapped")
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
    nodes[0].facts.containers.pop("overlaylab-anchor-bm-docker-01", None)
    return inv, nodes, log


def test_a_stopped_dockerd_started_again_has_the_peers_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dockerd that did not answer listed no container, yet those it starts again take the
    first free addresses: the dry run says the peers will be read after it, and the run does."""
    inv, nodes, log = anchored_cluster()
    nodes[1].facts.docker_active, nodes[1].facts.info = "inactive", {}
    reads: list[str] = []
    monkeypatch.setattr(gather, "read_one", lambda inv, node: reads.append(node.name))
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    maybe = {o["host"]: o["detail"] for o in dry.outcomes if o["step"] == "peers" and o["status"] == "may change"}
    assert code == 0 and dry.extra["restarts"] == {"w1": "docker.service is inactive"}, dry.outcomes
    assert set(maybe) == set(NAMES) and all("(on w1)" in d for d in maybe.values()), maybe
    code, _ = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0 and log.commands("systemctl restart") == ["w1"] and set(reads) >= set(NAMES), reads


def test_an_anchor_made_again_where_one_was_on_the_network_has_the_peers_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No restart: w2's anchor is stopped (its address still on record), so it is made again,
    and whoever had looked its address up may hold it stale: the peers are read again."""
    inv, nodes, log = anchored_cluster()
    net = str((nodes[0].facts.network or {})["Id"])
    nodes[2].facts.containers.pop("overlaylab-anchor-w2")
    nodes[2].facts.attached = {"overlaylab-anchor-w2": Attachment("b" * 64, net, False, (), "10.210.9.4")}
    reads: list[str] = []
    monkeypatch.setattr(gather, "read_one", lambda inv, node: reads.append(node.name))
    code, real = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0 and log.commands("systemctl restart") == [], real.outcomes
    assert real.extra["restarts"] == {} and set(reads) >= set(NAMES), reads
    peers = {o["host"]: o["status"] for o in real.outcomes if o["step"] == "peers"}
    assert peers == dict.fromkeys(NAMES, "ok"), peers


class Releasing:
    """A manager whose dockerd says the network has active endpoints the first ``busy`` times."""

    name = "m"

    def __init__(self, busy: int, said: str = "has active endpoints") -> None:
        self.busy, self.said, self.tries = busy, said, 0

    def result(self, command: str) -> tuple[int, str, str]:
        assert command == "docker network rm ov_net1 >/dev/null"
        self.tries += 1
        if self.tries <= self.busy:
            return (
                1,
                "",
                f"Error response from daemon: error while removing network: network ov_net1 id 0123 {self.said}",
            )
        return 0, "", ""


def test_teardown_waits_for_the_endpoints_of_containers_just_removed_to_leave(monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker rm -f` returns before the daemon releases the container's endpoint (seen in CI
    right after the anchors went): the removal waits for it, and only for that error."""
    monkeypatch.setattr("overlaylab.steps.network.time.sleep", lambda s: None)
    ctx: Any = dataclasses.make_dataclass("Ctx", ["inv"])(Inventory(path=Path("inv.yaml"), cluster="lab", hosts=()))
    node = Releasing(busy=2)
    done = network_step.RemoveNetwork().apply(ctx, node, Action("m", True, "remove ov_net1"))  # type: ignore[arg-type]
    assert done.startswith("removed ov_net1") and node.tries == 3
    other = Releasing(busy=1, said="is in use by a plugin")
    with pytest.raises(OverlaylabError, match="is in use by a plugin"):
        network_step.RemoveNetwork().apply(ctx, other, Action("m", True, "remove ov_net1"))  # type: ignore[arg-type]
    assert other.tries == 1  # any other error at once
    monkeypatch.setattr(network_step, "RELEASE_WAIT", 0.0)
    stuck = Releasing(busy=99)
    with pytest.raises(OverlaylabError, match="has active endpoints"):
        network_step.RemoveNetwork().apply(ctx, stuck, Action("m", True, "remove ov_net1"))  # type: ignore[arg-type]
