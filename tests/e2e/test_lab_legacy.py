"""End to end, real components: a 3-host legacy lab (bullseye, Docker 20.10) brought up,
used over SSH with strict host keys, re-run, grown, healed after its engine died, and
taken down without a trace. One lab serves the whole module, in this order.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlaylab import remote
from overlaylab.lab import engine, firewall, keys, lifecycle
from overlaylab.lab.spec import LabSpec, build_spec
from tests.e2e.clusterlab import FAB, ROOT
from tests.e2e.labtools import (
    E2E_RANGE,
    container_ids,
    kill_private_engine,
    outer,
    processes_in,
    require_lab,
    sh,
    ssh,
)

NAME = "e2e"


@dataclass
class Lab:
    spec: LabSpec
    inventory: Path
    first: lifecycle.UpResult


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_lab()
    inventory = tmp_path_factory.mktemp("inv") / "lab.yaml"
    lifecycle.down(NAME)  # from nothing, whatever an earlier run left
    first = lifecycle.up(NAME, count=3, engine_opt="legacy", inventory=inventory, addr_range=E2E_RANGE)
    yield Lab(build_spec(NAME, "legacy", 3, addr_range=E2E_RANGE), inventory, first)
    lifecycle.down(NAME, inventory)


def test_lab_up_creates_three_hosts_and_writes_the_inventory(lab: Lab) -> None:
    assert sorted(lab.first.created) == ["bm-docker-01", "bm-docker-02", "bm-docker-03"]
    text = lab.inventory.read_text()
    for host in lab.spec.hosts:
        assert f"{host.name}: {{address: {host.mgmt_ip}, role: {host.role}, advertise: eth1}}" in text
    # and the ssh_config beside it (inventory/lab.ssh_config for the default lab): the system's ssh, by name
    config = lab.inventory.with_suffix(".ssh_config")
    found = subprocess.run(["ssh", "-F", str(config), "bm-docker-03", "hostname"], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "bm-docker-03", found.stderr


def test_each_host_boots_systemd_and_has_its_own_identity(lab: Lab) -> None:
    seen_ids, seen_keys = set(), set()
    for host in lab.spec.hosts:
        conn = ssh(lab.spec, host)  # strict: known_hosts written by lab-up
        assert sh(conn, "hostname", sudo=False) == host.name
        assert sh(conn, "systemctl is-system-running", sudo=False) == "running"
        assert sh(conn, "whoami") == "root"  # admin uses sudo
        seen_ids.add(sh(conn, "cat /etc/machine-id", sudo=False))
        seen_keys.add(sh(conn, "cat /etc/ssh/ssh_host_ed25519_key.pub", sudo=False).split()[1])
        conn.close()
    assert len(seen_ids) == 3 and len(seen_keys) == 3


def test_hostname_can_be_changed_as_on_a_vm(lab: Lab) -> None:
    conn = ssh(lab.spec, lab.spec.hosts[2])
    sh(conn, "hostnamectl set-hostname renamed-03 && hostname")
    assert sh(conn, "hostname", sudo=False) == "renamed-03"
    sh(conn, "hostnamectl set-hostname bm-docker-03")
    assert sh(conn, "hostname", sudo=False) == "bm-docker-03"


def test_two_interfaces_and_no_way_out(lab: Lab) -> None:
    for host in lab.spec.hosts:
        conn = ssh(lab.spec, host)
        assert f"inet {host.mgmt_ip}/24" in sh(conn, "ip -4 addr show eth0", sudo=False)
        assert f"inet {host.cluster_ip}/24" in sh(conn, "ip -4 addr show eth1", sudo=False)
        routes = sh(conn, "ip -4 route", sudo=False)
        assert "default" not in routes
        resolv = sh(conn, "cat /etc/resolv.conf", sudo=False)
        assert "nameserver" not in resolv
        conn.close()


def test_docker_service_runs_the_bullseye_engine(lab: Lab) -> None:
    for host in lab.spec.hosts:
        conn = ssh(lab.spec, host)
        assert sh(conn, "systemctl is-active docker", sudo=False) == "active"
        assert sh(conn, "docker version --format '{{.Server.Version}}'").startswith("20.10.5")
        conn.close()


def test_a_drop_in_changes_dockerds_command_line(lab: Lab) -> None:
    conn = ssh(lab.spec, lab.spec.hosts[1])
    dropin = "/etc/systemd/system/docker.service.d/50-e2e.conf"
    try:
        sh(
            conn,
            "mkdir -p /etc/systemd/system/docker.service.d && printf '%s\\n' '[Service]' 'ExecStart=' "
            "'ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock --label e2e=yes'"
            f" > {dropin}",
        )
        sh(conn, "systemctl daemon-reload && systemctl restart docker")
        assert "--label e2e=yes" in sh(conn, "ps -o args= -C dockerd")
        assert "e2e=yes" in sh(conn, "docker info --format '{{.Labels}}'")
    finally:
        sh(conn, f"rm -f {dropin} && systemctl daemon-reload && systemctl restart docker")
    assert "--label" not in sh(conn, "ps -o args= -C dockerd")
    conn.close()


def test_busybox_runs_on_every_host(lab: Lab) -> None:
    for host in lab.spec.hosts:
        conn = ssh(lab.spec, host)
        assert sh(conn, f"docker run --rm busybox echo hello from {host.name}") == f"hello from {host.name}"
        conn.close()


def test_the_consul_image_elects_a_leader_with_progriums_arguments(lab: Lab) -> None:
    conn = ssh(lab.spec, lab.spec.hosts[0])
    try:
        sh(conn, "docker run -d --name e2e-consul -h consul progrium/consul -server -bootstrap")
        leader = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and leader in ("", '""'):
            time.sleep(1)
            leader = remote.run(
                conn,
                "docker run --rm --network container:e2e-consul busybox wget -qO- http://127.0.0.1:8500/v1/status/leader",
                sudo=True, check=False,
            ).stdout.strip()  # fmt: skip
        assert leader.endswith(':8300"'), f"no leader: {leader!r}"
    finally:
        sh(conn, "docker rm -f e2e-consul")
    conn.close()


def test_an_unknown_host_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    host = lab.spec.hosts[0]
    state = keys.state_dir(NAME)
    target = remote.SshTarget(
        host.name, host.mgmt_ip, "admin", 22, state / "id_ed25519", tmp_path / "empty_known_hosts"
    )
    with pytest.raises(remote.HostKeyError, match="unknown host key ssh-ed25519 SHA256:"):
        remote.connect(target)


def _host_identity(lab: Lab, index: int) -> dict[str, str]:
    """What a reboot must keep, read over SSH with the pinned host key."""
    host = lab.spec.hosts[index]
    conn = ssh(lab.spec, host)
    seen = {
        "hostname": sh(conn, "hostname", sudo=False),
        "eth0": sh(conn, "ip -4 -o addr show dev eth0 | awk '{print $4}'", sudo=False),
        "eth1": sh(conn, "ip -4 -o addr show dev eth1 | awk '{print $4}'", sudo=False),
        "machine_id": sh(conn, "cat /etc/machine-id", sudo=False),
        "etc_marker": sh(conn, "cat /etc/e2e-marker 2>/dev/null || echo none"),
        "docker_marker": sh(conn, "cat /var/lib/docker/e2e-marker 2>/dev/null || echo none"),
        "volume": sh(conn, "docker volume ls -q --filter name=e2e-data"),
        "default_route": sh(conn, "ip -4 route show default", sudo=False),
        "system": sh(conn, "systemctl is-system-running --wait", sudo=False),
        "docker": sh(conn, "systemctl is-active docker", sudo=False),
    }
    conn.close()
    return seen


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_a_rebooted_host_keeps_its_disk_name_identity_and_interfaces(lab: Lab, hard: bool) -> None:
    """`fab lab-reboot`: systemd shuts down (soft) or the power is cut (hard); either way the host
    comes back with eth0 on the management and eth1 on the cluster network, as lab-up made it."""
    host = lab.spec.hosts[1]
    conn = ssh(lab.spec, host)
    sh(conn, "echo kept > /etc/e2e-marker && echo kept > /var/lib/docker/e2e-marker && "
       "docker volume create e2e-data >/dev/null && echo gone > /run/e2e-marker")  # fmt: skip
    boot_before = sh(conn, "cat /proc/1/stat | cut -d' ' -f22", sudo=False)
    conn.close()
    before = _host_identity(lab, 1)
    assert before["eth0"] == f"{host.mgmt_ip}/24" and before["eth1"] == f"{host.cluster_ip}/24"
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), "lab-reboot", "--node", host.name, "--name", NAME, *(["--hard"] if hard else [])],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up again in" in proc.stdout
    after = _host_identity(lab, 1)
    assert after == before
    conn = ssh(lab.spec, host)  # a new boot: PID 1 started later, /run is empty again
    assert sh(conn, "cat /proc/1/stat | cut -d' ' -f22", sudo=False) != boot_before
    assert sh(conn, "cat /run/e2e-marker 2>/dev/null || echo none") == "none"
    sh(conn, "rm -f /etc/e2e-marker /var/lib/docker/e2e-marker && docker volume rm e2e-data >/dev/null")
    conn.close()


def test_an_unknown_node_to_reboot_is_refused(lab: Lab) -> None:
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), "lab-reboot", "--node", "bm-docker-09", "--name", NAME],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--node: lab 'e2e' has no host 'bm-docker-09' (its hosts: bm-docker-01, bm-docker-02, bm-docker-03)" in (
        proc.stderr
    )


def test_a_second_lab_up_changes_nothing(lab: Lab) -> None:
    before = container_ids(NAME)
    again = lifecycle.up(NAME, inventory=lab.inventory, addr_range=E2E_RANGE)
    assert not again.changed, again
    assert sorted(again.unchanged) == ["bm-docker-01", "bm-docker-02", "bm-docker-03"]
    assert container_ids(NAME) == before


def test_a_larger_count_adds_only_the_missing_host_and_a_smaller_one_removes_it(lab: Lab) -> None:
    before = set(container_ids(NAME))
    grown = lifecycle.up(NAME, count=4, inventory=lab.inventory, addr_range=E2E_RANGE)
    assert grown.created == ["bm-docker-04"] and not grown.replaced
    assert before < set(container_ids(NAME))
    spec4 = build_spec(NAME, "legacy", 4, addr_range=E2E_RANGE)
    conn = ssh(spec4, spec4.hosts[3])
    assert sh(conn, "systemctl is-system-running", sudo=False) == "running"
    conn.close()
    assert "bm-docker-04" in lab.inventory.read_text()
    shrunk = lifecycle.up(NAME, count=3, inventory=lab.inventory, addr_range=E2E_RANGE)
    assert shrunk.removed == ["bm-docker-04"] and not shrunk.created
    assert set(container_ids(NAME)) == before
    assert "bm-docker-04" not in lab.inventory.read_text()


def test_lab_up_heals_the_lab_after_its_engine_died(lab: Lab) -> None:
    """Every host stopped with the engine, as machines in a power cut: lab-up powers them on
    again, disks kept (a file written before is still there), nothing replaced."""
    if not (engine.find(start=False) or engine.Engine(outer(), False)).private:
        pytest.skip("this machine runs its own Docker engine; the lab did not start a private one to kill")
    for host in lab.spec.hosts:
        conn = ssh(lab.spec, host)
        sh(conn, "echo kept > /var/tmp/overlaylab-disk && sync")
        conn.close()
    ids = container_ids(NAME)
    kill_private_engine(ids)
    assert engine.private_pid() is None and not processes_in(ids)
    healed = lifecycle.up(NAME, inventory=lab.inventory, addr_range=E2E_RANGE)
    assert healed.replaced == {} and healed.created == []
    assert sorted(healed.other_changes) == [f"{h.name} powered on" for h in lab.spec.hosts]
    for host in lab.spec.hosts:  # same identity: the old known_hosts still verifies them
        conn = ssh(lab.spec, host)
        assert sh(conn, "cat /var/tmp/overlaylab-disk") == "kept"
        conn = ssh(lab.spec, host)
        assert sh(conn, "systemctl is-system-running", sudo=False) == "running"
        assert sh(conn, "docker run --rm busybox true; echo $?") == "0"
        conn.close()


def test_lab_down_leaves_nothing_behind_and_is_safe_twice(lab: Lab) -> None:
    ids = container_ids(NAME)
    docker = outer()
    private = engine.find(start=False)
    assert private is not None
    removed = lifecycle.down(NAME, lab.inventory)
    assert removed
    left_engine = engine.find(start=False)
    if left_engine is not None:
        label = "overlaylab.lab=" + NAME
        for kind in ("container", "volume", "network"):
            assert left_engine.docker.ids(kind, label) == [], kind
    else:
        assert docker.socket == str(engine.PRIVATE_SOCKET)
        assert not list((engine.PRIVATE_DATA / "volumes").glob(f"olab-{NAME}-*"))
    for bridge in (f"olab-{NAME}-m", f"olab-{NAME}-c"):
        assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0, bridge
    assert firewall.rules(NAME) == []
    mounts = Path("/proc/mounts").read_text()
    assert not any(cid in mounts for cid in ids)
    assert not processes_in(ids)
    if left_engine is None:
        assert "/run/overlaylab" not in mounts and str(engine.PRIVATE_DATA) not in mounts
        assert engine._private_processes() == [] and engine.private_pid() is None
    assert not keys.state_dir(NAME).exists() and not lab.inventory.exists()
    assert not lab.inventory.with_suffix(".ssh_config").exists()
    assert lifecycle.down(NAME, lab.inventory) == []
