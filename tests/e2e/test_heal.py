"""End to end, real components (sshd, systemd, dockerd 20.10, Consul, busybox): one
`fab bootstrap-cluster` re-run heals a kv cluster after a single real fault. Each fault
is injected for real on the lab (a worker's daemon restarted, a worker rebooted with
`systemctl reboot`, the Consul container removed). The faults that one re-run does not heal yet (the manager's
dockerd restarted more than once, a power cut) are measured in the note on issue 9,
not asserted here. A user container with `--restart always` runs on the
overlay on every host; the re-run is given `--allow-restart`. After it the test
proves, with containers of its own and plain `docker exec ... ping`, that every
ordered pair of hosts pings by IP and by name; that every dockerd whose PID changed
was reported restarted (only the faulted host's, for a worker's fault); and that the
user containers run again. One lab serves the module; the faults run in order."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from overlaylab.lab import lifecycle
from tests.e2e.clusterlab import Lab, fab, module_lab
from tests.e2e.labtools import sh

NAME, RANGE = "e2eheal", "10.217.0.0/16"
ENGINES = "legacy,legacy,legacy"
HOSTS = [1, 2, 3]
USER_APP = "users_app"  # + the host number: on a kv overlay, endpoint names are global
LOOP = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"


def _bootstrapped(lab: Lab) -> None:
    code, _, err = fab("bootstrap-cluster", "--inventory", str(lab.inventory("abc", HOSTS)))
    assert code == 0, err
    for i in HOSTS:
        conn = lab.conn(i)
        sh(
            conn,
            f'docker run -d --name {USER_APP}{i} --restart always --network ov_net1 busybox sh -c "{LOOP}" >/dev/null',
        )
        conn.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from module_lab(tmp_path_factory, NAME, ENGINES, RANGE, _bootstrapped)


def name(i: int) -> str:
    return f"bm-docker-{i:02d}"


def dockerd_pids(lab: Lab) -> dict[str, str]:
    pids = {}
    for i in HOSTS:
        conn = lab.conn(i)
        pids[name(i)] = sh(conn, "systemctl show -p MainPID --value docker.service")
        conn.close()
    return pids


def users_running(lab: Lab) -> dict[str, str]:
    state = {}
    for i in HOSTS:
        conn = lab.conn(i)
        state[name(i)] = sh(conn, f"docker inspect -f '{{{{.State.Running}}}}' {USER_APP}{i} 2>&1")
        conn.close()
    return state


def pings(lab: Lab, window: float = 20) -> list[str]:
    """Containers of the test's own on every host; every ordered pair pings by IP and by name
    (plain `docker exec ... ping`, a short window to converge, as verify allows); the failures."""
    tag = secrets.token_hex(3)
    conns = {i: lab.conn(i) for i in HOSTS}
    ips, failures = {}, []
    try:
        for i, conn in conns.items():
            sh(conn, f'docker run -d --name heal-{tag}-{i} --network ov_net1 busybox sh -c "{LOOP}" >/dev/null')
            ips[i] = sh(conn, f"docker inspect -f '{{{{.NetworkSettings.Networks.ov_net1.IPAddress}}}}' heal-{tag}-{i}")
        for a in HOSTS:
            for b in HOSTS:
                for target in (ips[b], f"heal-{tag}-{b}") if a != b else ():
                    deadline = time.monotonic() + window
                    while True:
                        ok = sh(
                            conns[a], f"docker exec heal-{tag}-{a} ping -c 1 -W 1 {target} >/dev/null 2>&1; echo $?"
                        )
                        if ok == "0":
                            break
                        if time.monotonic() > deadline:
                            failures.append(f"{name(a)} -> {name(b)} ({target})")
                            break
                        time.sleep(0.5)
    finally:
        for i, conn in conns.items():
            sh(conn, f"docker rm -f heal-{tag}-{i} >/dev/null 2>&1; true")
            conn.close()
    return failures


def heal(lab: Lab, faulted: set[str] | None) -> dict[str, Any]:
    """One re-run: exit 0, only reported restarts, user containers back, every pair pings."""
    before = dockerd_pids(lab)
    code, doc, err = fab("bootstrap-cluster", "--allow-restart", "--inventory", str(lab.inventory("abc", HOSTS)))
    assert code == 0, err
    after = dockerd_pids(lab)
    moved = {h for h in before if before[h] != after[h]}
    assert moved <= set(doc["restarts"]), (moved, doc["restarts"])
    if faulted is not None:
        assert set(doc["restarts"]) <= faulted, doc["restarts"]
    assert users_running(lab) == dict.fromkeys(map(name, HOSTS), "true")
    assert pings(lab) == []
    return doc


def test_the_cluster_with_user_containers_pings_before_any_fault(lab: Lab) -> None:
    assert users_running(lab) == dict.fromkeys(map(name, HOSTS), "true")
    assert pings(lab) == []


def test_a_workers_dockerd_restarted(lab: Lab) -> None:
    conn = lab.conn(2)
    sh(conn, "systemctl restart docker.service")
    conn.close()
    heal(lab, {name(2)})


def test_a_worker_host_rebooted(lab: Lab) -> None:
    """`systemctl reboot`; a power cut is not healed yet (see the note on issue 9)."""
    lifecycle.reboot(NAME, name(3), hard=False)
    heal(lab, {name(3)})


def test_the_consul_container_removed(lab: Lab) -> None:
    conn = lab.conn(1)
    sh(conn, "docker rm -f overlaylab-consul >/dev/null")
    conn.close()
    doc = heal(lab, set())
    assert doc["hosts"][name(1)]["consul"]["status"] == "changed"
    assert doc["hosts"][name(1)]["network"]["status"] == "ok"
