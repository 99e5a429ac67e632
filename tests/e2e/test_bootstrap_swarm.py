"""End to end, real components (sshd, systemd, dockerd 26.x in swarm mode, busybox):
the swarm backend on a modern lab of its own, with the Docker API over mutual TLS
(tls.docker_api) from the first run. Hosts 1-3 form the cluster, host 4 joins later.
Tests run in order on one lab."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlaylab import certs
from overlaylab.steps import tls
from tests.e2e.clusterlab import (
    DROPIN,
    ROOT,
    Lab,
    checks,
    every_pair,
    fab,
    host_state,
    module_lab,
    ping_pairs,
    run_smoke,
    statuses,
)
from tests.e2e.labtools import sh
from tests.e2e.tlscheck import docker_env, docker_info, refusals, tls_inventory

NAME, RANGE = "e2esw", "10.215.0.0/16"
ENGINES = "modern,modern,modern,modern"
NAMES = ["bm-docker-01", "bm-docker-02", "bm-docker-03"]


MTU = 1400  # network.mtu in every inventory of this module: the swarm network made with it, the smoke suite reads it


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    def with_mtu(made: Lab) -> None:
        made.base.setdefault("network", {})["mtu"] = MTU

    yield from module_lab(tmp_path_factory, NAME, ENGINES, RANGE, prepare=with_mtu)


def test_kv_mode_on_a_modern_lab_is_refused_and_changes_nothing(lab: Lab) -> None:
    before = host_state(lab, [1, 2, 3])
    code, doc, _ = fab("bootstrap-cluster", "--inventory", str(lab.inventory("kv", [1, 2, 3], mode="kv")))
    assert code == 2
    assert set(statuses(doc, "preflight").values()) == {"failed"}
    assert all("mode: swarm" in s["preflight"]["detail"] for s in doc["hosts"].values())
    after = host_state(lab, [1, 2, 3])
    assert after == before and all(s[1] == "-" for s in after.values())  # no drop-in, same dockerd PIDs


def test_auto_mode_picks_swarm_and_every_pair_pings_by_ip_and_name(lab: Lab) -> None:
    inventory = tls_inventory(lab, "auto", [1, 2, 3], mode="auto")
    code, doc, err = fab("bootstrap-cluster", "--inventory", str(inventory))
    assert code == 0, err
    assert doc["mode"] == "swarm" and "auto picked swarm" in err
    assert statuses(doc, "swarm") == dict.fromkeys(NAMES, "changed")
    assert statuses(doc, "dockerd") == dict.fromkeys(NAMES, "changed")  # the API's drop-in
    assert docker_info(docker_env(inventory, "bm-docker-03")) == (0, "bm-docker-03")
    assert ping_pairs(doc) == every_pair(doc, NAMES)
    conn = lab.conn(1)
    assert sh(conn, "docker network inspect ov_net1 -f '{{.Scope}} {{.Attachable}}'") == "swarm true"
    # network.mtu, as the network's containers get it (a fresh one's interface on it)
    assert sh(conn, "docker run --rm --network ov_net1 busybox cat /sys/class/net/eth0/mtu") == str(MTU)
    pool = lab.base["swarm"]["default_addr_pool"]
    assert pool.startswith("10.215.") and pool in sh(
        conn, "docker info --format '{{json .Swarm.Cluster.DefaultAddrPool}}'"
    )
    conn.close()


def test_a_second_run_changes_nothing(lab: Lab) -> None:
    before = host_state(lab, [1, 2, 3])
    code, doc, err = fab("bootstrap-cluster", "--inventory", str(tls_inventory(lab, "swarm", [1, 2, 3], "swarm")))
    assert code == 0 and doc["changes"] == 0, err
    assert set(statuses(doc, "swarm").values()) == {"ok"}
    assert host_state(lab, [1, 2, 3]) == before


def test_the_smoke_suite_passes_in_swarm_mode(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    junit = lab.dir / "smoke-swarm.xml"
    passed, failures, took = run_smoke(tls_inventory(lab, "swarm", [1, 2, 3], "swarm"), junit)
    with capsys.disabled():  # a figure for the log, not a threshold
        print(f"\n    smoke suite (swarm) on 3 hosts: {passed} passed in {took:.1f}s")
    assert failures == {}, failures
    text = junit.read_text()
    assert "test_host_is_an_active_node_of_the_managers_swarm" in text
    assert "test_the_docker_api_answers_the_admins_certificate_and_refuses_a_client_without_one" in text
    assert "test_dockerd_runs_with_our_cluster_flags" not in text  # kv-only checks are deselected, not skipped


def test_the_installed_command_runs_the_tasks_from_outside_the_clone(lab: Lab, tmp_path: Path) -> None:
    """The wheel built from a copy of this clone, installed into a fresh virtualenv outside it
    (pip takes the dependencies from its index, or its cache), run from a directory that is
    not the clone: `overlaylab --list` names every task, `--help bootstrap-cluster` its
    options, and `overlaylab verify` proves every pair of this lab (swarm mode, the Docker
    API over TLS, the CA read from the inventory's tls.ca_dir), as `fab verify` does."""
    source, wheels, venv, elsewhere = (tmp_path / d for d in ("source", "wheels", "venv", "elsewhere"))
    shutil.copytree(
        ROOT, source, symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "*cache*", "build", "*.egg-info", "__pycache__", "lab.yaml"),
    )  # fmt: skip
    elsewhere.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, cwd=elsewhere, stdin=subprocess.DEVNULL)

    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source))
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("overlaylab-*.whl")
    made = run(sys.executable, "-m", "venv", str(venv))
    assert made.returncode == 0, made.stderr
    installed = run(str(venv / "bin" / "pip"), "install", "-q", str(wheel))
    assert installed.returncode == 0, installed.stderr[-2000:]
    command = str(venv / "bin" / "overlaylab")
    listed = run(command, "--list")
    assert listed.returncode == 0, listed.stderr
    assert {"bootstrap-cluster", "join-node", "verify", "status", "teardown", "lab-up", "lab-down"} <= set(
        listed.stdout.split()
    ), listed.stdout
    helped = run(command, "--help", "bootstrap-cluster")
    assert helped.returncode == 0 and "--dry-run" in helped.stdout and "--inventory" in helped.stdout, helped.stdout
    checked = run(command, "verify", "--inventory", str(tls_inventory(lab, "swarm", [1, 2, 3], "swarm")), "--json")
    assert checked.returncode == 0, checked.stderr
    verified = json.loads(checked.stdout)
    pairs = verified["ping_matrix"]["pairs"]
    assert len(pairs) == 3 * 2 * len(checks(verified)) == 3 * 2 * 4 and all(p["ok"] for p in pairs), pairs
    imported = run(str(venv / "bin" / "python"), "-c", "import overlaylab; print(overlaylab.__file__)")
    assert imported.stdout.startswith(str(venv)), imported.stdout  # the installed package, not the clone's


def test_join_node_of_a_fresh_worker_and_a_rerun_changes_nothing(lab: Lab) -> None:
    inventory = str(tls_inventory(lab, "swarm4-tls", [1, 2, 3, 4], "swarm"))
    code, doc, err = fab("join-node", "--node", "bm-docker-04", "--inventory", inventory)
    assert code == 0, err
    assert statuses(doc, "swarm")["bm-docker-04"] == "changed"
    pairs = ping_pairs(doc)
    assert (
        len(pairs) == 3 * 2 * len(checks(doc))
        and all(pairs.values())
        and all("bm-docker-04" in (a, b) for a, b, _ in pairs)
    )
    code, doc, err = fab("join-node", "--node", "bm-docker-04", "--inventory", inventory)
    assert code == 0 and doc["changes"] == 0, err


def test_the_api_over_tls_in_swarm_mode_and_a_lost_ca_replaced_with_reissue_certs(lab: Lab, tmp_path: Path) -> None:
    inventory = tls_inventory(lab, "swarm4-tls", [1, 2, 3, 4], mode="swarm")
    assert docker_info(docker_env(inventory, "bm-docker-04")) == (0, "bm-docker-04")  # it joined with TLS
    address = lab.spec.hosts[2].mgmt_ip
    found = refusals(address, lab.dir / "ca", tmp_path)
    assert found["admin"].startswith("answered") and found["no certificate"].startswith("refused"), found
    assert found["another CA's"].startswith("refused"), found
    # the admin lost the CA: every host's certificate is then another CA's
    (lab.dir / "ca").rename(lab.dir / "ca-lost")
    before = host_state(lab, [1, 2, 3, 4])
    code, doc, _ = fab("bootstrap-cluster", "--inventory", str(inventory))
    assert code == 2
    plan = {h: s["plan"]["detail"] for h, s in doc["hosts"].items() if "plan" in s}
    assert len(plan) == 4 and all("signed by another CA" in p and "--reissue-certs" in p for p in plan.values()), plan
    assert host_state(lab, [1, 2, 3, 4]) == before
    code, doc, err = fab("bootstrap-cluster", "--inventory", str(inventory), "--reissue-certs")
    assert code == 0, err
    assert set(statuses(doc, "certs").values()) == {"changed"} and set(statuses(doc, "dockerd").values()) == {"changed"}
    assert all(ping_pairs(doc).values()) and len(ping_pairs(doc)) == 4 * 3 * len(checks(doc))
    assert docker_info(docker_env(inventory, "bm-docker-03")) == (0, "bm-docker-03")
    answered, detail = tls.probe(address, lab.dir / "ca-lost" / certs.CA_CERT, lab.dir / "ca-lost")
    assert not answered, detail  # the lost CA's certificates no longer open anything


def test_teardown_leaves_no_swarm_and_no_network_and_is_safe_twice(lab: Lab) -> None:
    inventory = str(tls_inventory(lab, "swarm4-tls", [1, 2, 3, 4], mode="swarm"))
    code, doc, err = fab("teardown", "--inventory", inventory, "--remove-ca")
    assert code == 0, err
    assert not (lab.dir / "ca").exists()
    for i in (1, 2, 3, 4):
        conn = lab.conn(i)
        assert sh(conn, "docker info --format '{{.Swarm.LocalNodeState}}'") == "inactive"
        assert "ov_net1" not in sh(conn, "docker network ls --format '{{.Name}}'")
        assert sh(conn, "docker ps -aq") == "" and sh(conn, f"cat {DROPIN} 2>/dev/null || echo -") == "-"
        assert sh(conn, "ls /etc/overlaylab/tls 2>/dev/null | wc -l; ss -Hltn 'sport = :2376' | wc -l") == "0\n0"
        conn.close()
    code, doc, err = fab("teardown", "--inventory", inventory)
    assert code == 0 and doc["changes"] == 0, err
