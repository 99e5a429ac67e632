"""End to end, real components (sshd, systemd, dockerd 20.10, Consul, busybox): what
`--dry-run` says is what the run does. For each scenario the test runs `--dry-run --json`,
checks on every host that nothing changed (file hashes, dockerd PIDs, containers,
networks, volumes, Consul's KV, swarm state), runs the real command, and checks that
the exit codes are equal, that the run made every certain change of the plan and none
that was neither certain nor conditional ("may change", tests/dry_run_rule.py), the
same for restarts, and that what it saw change on the hosts is what the run said.

One lab serves the module; the scenarios run in order, each on the cluster the one
before left. bm-docker-04 starts with a docker-machine drop-in (mutual TLS on tcp/2376,
certificates made on the host); bm-docker-05 joins with join-node."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import dry_run_rule
from tests.e2e.clusterlab import DROPIN, Lab, each_host, every_pair, fab, module_lab, ping_pairs, run_smoke
from tests.e2e.labtools import sh

NAME, RANGE = "e2eplan", "10.216.0.0/16"
ENGINES = "legacy,legacy,legacy,legacy,legacy"
HOSTS = [1, 2, 3, 4, 5]
LOOP = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"
# one ping a second for up to 20 s, as verify allows a new endpoint to converge
WITHIN_20S = "for i in $(seq 20); do ping -c 1 -W 1 {} >/dev/null && {{ echo ok after $i s; exit 0; }}; done; echo no answer in 20 s"
MACHINE_EXEC = (
    "/usr/sbin/dockerd -H tcp://0.0.0.0:2376 -H unix:///var/run/docker.sock --tlsverify "
    "--tlscacert /etc/docker/ca.pem --tlscert /etc/docker/server.pem --tlskey /etc/docker/server-key.pem "
    "--label provider=generic"
)
MACHINE_DROPIN = f"[Service]\nExecStart=\nExecStart={MACHINE_EXEC}\nEnvironment=\n"


def _docker_machine_host(lab: Lab) -> None:
    """bm-docker-04 as docker-machine left it: its CA and server certificate, its drop-in."""
    conn = lab.conn(4)
    sh(conn, "cd /etc/docker && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem "
       "-days 30 -subj /CN=machine-ca 2>/dev/null && openssl req -newkey rsa:2048 -nodes -keyout server-key.pem "
       "-out server.csr -subj /CN=bm-docker-04 2>/dev/null && openssl x509 -req -in server.csr -CA ca.pem "
       "-CAkey ca-key.pem -CAcreateserial -out server.pem -days 30 2>/dev/null && rm server.csr")  # fmt: skip
    sh(conn, f"mkdir -p /etc/systemd/system/docker.service.d && printf '%s' '{MACHINE_DROPIN}' > {DROPIN}")
    sh(conn, "systemctl daemon-reload && systemctl restart docker")
    assert "--tlsverify" in sh(conn, "ps -o args= -C dockerd")
    conn.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from module_lab(tmp_path_factory, NAME, ENGINES, RANGE, _docker_machine_host)


# ---- what the test itself sees on the hosts ------------------------------------------

SNAPSHOT = r"""
echo "pid $(systemctl show -p MainPID --value docker.service)"
find /etc/systemd/system/docker.service.d /etc/docker /var/lib/overlaylab -type f 2>/dev/null | sort |
  while read -r f; do echo "file $f $(sha256sum < "$f" | cut -c1-16)"; done
timeout 20 docker ps -a --format 'container {{.ID}} {{.Names}}' 2>/dev/null | grep -v ' olab-probe-' | sort
timeout 20 docker network ls --format 'network {{.ID}} {{.Name}}' 2>/dev/null | sort
timeout 20 docker volume ls -q 2>/dev/null | sed 's/^/volume /' | sort
echo "swarm $(timeout 20 docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.NodeID}}' 2>/dev/null)"
"""


def consul_kv(lab: Lab, stopped: tuple[str, ...] = ()) -> tuple[str, frozenset[str]]:
    """Consul's whole KV (keys and values), read inside the Consul container on the manager:
    its digest, or "no Consul" / "Consul stopped". A running Consul whose KV cannot be read
    fails the test: two unread stores would compare equal and prove nothing. ``stopped``:
    the cluster addresses of hosts whose dockerd is not running, whose discovery registration
    (docker/nodes/ADDRESS:PORT) the store drops by itself when its TTL runs out, whatever a
    run does (seen in ci16: it expired between a refused run's two reads): (the digest of
    the rest, those registrations as read), compared by settled()."""
    conn = lab.conn(1)
    ip = lab.spec.hosts[0].cluster_ip
    out = sh(conn, "s=$(docker inspect -f '{{.State.Running}}' overlaylab-consul 2>/dev/null) || "
                   "{ echo 'no Consul'; exit 0; }; [ \"$s\" = true ] || { echo 'Consul stopped'; exit 0; }; "
                   "for p in 8500 8501; do docker exec overlaylab-consul consul kv export "
                   f"-http-addr={ip}:$p 2>/dev/null && exit 0; done; echo unreadable")  # fmt: skip
    conn.close()
    if out in ("no Consul", "Consul stopped"):
        return out, frozenset()
    assert out.startswith("["), f"Consul runs on bm-docker-01, and its KV could not be read: {out!r}"
    prefixes = tuple(f"docker/nodes/{ip}:" for ip in stopped) or ("\0",)
    entries = json.loads(out)
    expiring = frozenset(json.dumps(e, sort_keys=True) for e in entries if str(e.get("key", "")).startswith(prefixes))
    kept = [e for e in entries if json.dumps(e, sort_keys=True) not in expiring]
    return hashlib.sha256(json.dumps(sorted(kept, key=str)).encode()).hexdigest(), expiring


def snapshot(lab: Lab) -> dict[str, dict[str, Any]]:
    def read(i: int) -> list[str]:
        conn = lab.conn(i)
        try:
            return sh(conn, SNAPSHOT).splitlines()
        finally:
            conn.close()

    state = {}
    for i, lines in each_host(HOSTS, read).items():
        kinds: dict[str, Any] = {"pid": "", "files": set(), "containers": set(), "networks": set(), "volumes": set()}
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind in ("pid", "swarm"):
                kinds[kind] = rest
            elif kind:
                kinds[kind + "s"].add(rest)
        state[lab.spec.hosts[i - 1].name] = kinds
    stopped = tuple(h.cluster_ip for h in lab.spec.hosts if state.get(h.name, {}).get("pid") in ("0", ""))
    state["bm-docker-01"]["kv"], state["bm-docker-01"]["expiring"] = consul_kv(lab, stopped)
    return state


def settled(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``after``, where the stopped hosts' registrations may only have gone (expired), never
    come or changed: those that went count as still there."""
    was, now = before["bm-docker-01"]["expiring"], after["bm-docker-01"]["expiring"]
    if now <= was:
        return {**after, "bm-docker-01": {**after["bm-docker-01"], "expiring": was}}
    return after


def differences(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {h: [k for k in before[h] if before[h].get(k) != after[h].get(k)] for h in before if before[h] != after[h]}


def changed_on(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], kind: str) -> set[str]:
    return {h for h in before if before[h].get(kind) != after[h].get(kind)}


# ---- what the run says -------------------------------------------------------------------


def changed_steps(doc: dict[str, Any], *steps: str) -> set[str]:
    return {h for h, s in doc["hosts"].items() if any(s.get(x, {}).get("status") == "changed" for x in steps)}


def truth(lab: Lab, *args: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Dry run, then the run: (exit code, dry-run document, run document), every check made."""
    before = snapshot(lab)
    code_dry, dry, err = fab(*args, "--dry-run")
    assert dry["dry_run"] is True, err
    after_dry = settled(before, snapshot(lab))
    assert after_dry == before, f"the dry run changed a host: {differences(before, after_dry)}"
    code, real, err = fab(*args)
    after = settled(before, snapshot(lab))
    assert code == code_dry, err
    dry_run_rule.check(dry, real)  # the certain changes made, nothing neither certain nor conditional
    if code == 2:  # refused: its plan (restarts included) is said, and nothing is done
        assert after == before, f"a refused run changed a host: {differences(before, after)}"
        return code, dry, real
    # what the test saw change is what the plan said would change
    assert changed_on(before, after, "pid") == set(real["restarts"])
    assert changed_on(before, after, "files") == set(real["diffs"]) == changed_steps(real, "dockerd")
    assert changed_on(before, after, "containers") == changed_steps(real, "consul", "anchor", "probes")
    assert changed_on(before, after, "volumes") <= changed_steps(real, "consul")
    assert changed_on(before, after, "swarm") == changed_steps(real, "swarm")
    network_changes = changed_steps(real, "network")
    assert network_changes <= changed_on(before, after, "networks")
    if "bm-docker-01" in changed_on(before, after, "networks"):
        assert "bm-docker-01" in changed_steps(real, "network", "swarm", "dockerd", "consul")
    return code, dry, real


def inventory(lab: Lab, hosts: list[int], **changes: Any) -> str:
    """The cluster's inventory as the scenarios have left it: these flags and this Consul port."""
    base: dict[str, Any] = {"dockerd": {"extra_flags": ["--log-level=info"]}, "consul": {"port": 8501}}
    return str(lab.inventory("plan" + "".join(map(str, hosts)), hosts, **{**base, **changes}))


def all_ping(doc: dict[str, Any], hosts: list[int]) -> None:
    names = [f"bm-docker-{i:02d}" for i in hosts]
    assert ping_pairs(doc) == every_pair(doc, names)


# ---- the scenarios, in order --------------------------------------------------------------


def test_a_fresh_lab(lab: Lab) -> None:
    code, dry, real = truth(lab, "bootstrap-cluster", "--inventory", str(lab.inventory("abc", [1, 2, 3])))
    assert code == 0
    assert set(dry["restarts"]) == {"bm-docker-01", "bm-docker-02", "bm-docker-03"}
    assert changed_steps(dry, "consul", "network") == {"bm-docker-01"}
    all_ping(real, [1, 2, 3])


def test_a_no_op_re_run(lab: Lab) -> None:
    code, dry, real = truth(lab, "bootstrap-cluster", "--inventory", str(lab.inventory("abc", [1, 2, 3])))
    assert code == 0 and real["changes"] == 0 and dry["changes"] == 0 and real["restarts"] == {}


def test_extra_dockerd_flags(lab: Lab) -> None:
    path = str(lab.inventory("flags", [1, 2, 3], dockerd={"extra_flags": ["--log-level=info"]}))
    code, dry, real = truth(lab, "bootstrap-cluster", "--inventory", path)
    assert code == 0 and set(real["restarts"]) == {"bm-docker-01", "bm-docker-02", "bm-docker-03"}
    assert all("+ExecStart=" in d and "--log-level=info" in d for d in dry["diffs"].values())
    conn = lab.conn(2)
    assert "--log-level=info" in sh(conn, "ps -o args= -C dockerd")
    conn.close()


def test_another_consul_port(lab: Lab) -> None:
    code, dry, real = truth(lab, "bootstrap-cluster", "--inventory", inventory(lab, [1, 2, 3]))
    assert code == 0 and changed_steps(dry, "consul") == {"bm-docker-01"}
    assert set(real["restarts"]) == {"bm-docker-01", "bm-docker-02", "bm-docker-03"}
    all_ping(real, [1, 2, 3])


def test_another_subnet_for_the_existing_network_is_refused(lab: Lab) -> None:
    subnet = ".".join(lab.spec.hosts[0].cluster_ip.split(".")[:2]) + ".40.0/24"
    path = inventory(lab, [1, 2, 3], network={"subnet": subnet})
    code, _, real = truth(lab, "bootstrap-cluster", "--inventory", path)
    assert code == 2 and real["restarts"] == {}
    assert "exists with other settings" in real["hosts"]["bm-docker-01"]["plan"]["detail"]


def test_another_mtu_for_the_existing_network_is_refused_and_its_own_written_out_changes_nothing(lab: Lab) -> None:
    """network.mtu 1400 on the network made without one (the driver's 1450): refused as another
    subnet is, naming both values; 1450 written out is the same network (effective MTUs compared)."""
    code, _, real = truth(lab, "bootstrap-cluster", "--inventory", inventory(lab, [1, 2, 3], network={"mtu": 1400}))
    assert code == 2 and real["restarts"] == {}
    detail = real["hosts"]["bm-docker-01"]["plan"]["detail"]
    assert "MTU 1450, wanted 1400: set network.mtu: 1450 to keep it" in detail, detail
    code, _, real = truth(lab, "bootstrap-cluster", "--inventory", inventory(lab, [1, 2, 3], network={"mtu": 1450}))
    assert code == 0 and real["changes"] == 0 and real["restarts"] == {}


def test_a_host_with_a_docker_machine_drop_in(lab: Lab) -> None:
    code, dry, real = truth(lab, "bootstrap-cluster", "--inventory", inventory(lab, [1, 2, 3, 4]))
    assert code == 0 and set(real["restarts"]) == {"bm-docker-04"}
    assert f"-ExecStart={MACHINE_EXEC}" in dry["diffs"]["bm-docker-04"]
    conn = lab.conn(4)
    args = sh(conn, "ps -o args= -C dockerd")
    assert "--tlsverify" in args and "-H tcp://0.0.0.0:2376" in args and "--cluster-store=consul://" in args
    conn.close()
    all_ping(real, [1, 2, 3, 4])


def test_join_node(lab: Lab) -> None:
    path = inventory(lab, HOSTS)
    code, dry, real = truth(lab, "join-node", "--node", "bm-docker-05", "--inventory", path)
    assert code == 0 and set(real["restarts"]) == {"bm-docker-05"}
    assert set(dry["diffs"]) == {"bm-docker-05"}


def test_a_host_whose_dockerd_is_stopped(lab: Lab) -> None:
    conn = lab.conn(3)
    sh(conn, "systemctl stop docker.service docker.socket")
    try:
        code, _, real = truth(lab, "bootstrap-cluster", "--inventory", inventory(lab, HOSTS))
        assert code == 2
        assert "docker.service is inactive" in real["hosts"]["bm-docker-03"]["preflight"]["detail"]
    finally:
        sh(conn, "systemctl start docker.service")
        conn.close()
    # as a user would: one re-run brings the host back (its anchor stopped with the daemon)
    code, doc, err = fab("bootstrap-cluster", "--inventory", inventory(lab, HOSTS))
    assert code == 0, err
    assert doc["hosts"]["bm-docker-03"]["anchor"]["status"] == "changed"


def test_the_kv_to_swarm_switch(lab: Lab) -> None:
    code, dry, real = truth(lab, "bootstrap-cluster", "--inventory", inventory(lab, HOSTS, mode="swarm"))
    assert code == 0 and set(real["restarts"]) == {f"bm-docker-{i:02d}" for i in HOSTS}
    assert changed_steps(dry, "consul") == {"bm-docker-01"}
    all_ping(real, HOSTS)


def test_and_back_from_swarm_to_kv(lab: Lab) -> None:
    code, dry, real = truth(lab, "bootstrap-cluster", "--inventory", inventory(lab, HOSTS))
    assert code == 0 and changed_steps(dry, "swarm") == {f"bm-docker-{i:02d}" for i in HOSTS}
    all_ping(real, HOSTS)


def network_id(lab: Lab) -> str:
    conn = lab.conn(1)
    found = sh(conn, "docker network inspect -f '{{.Id}}' ov_net1")
    conn.close()
    return found


def test_one_to_three_consul_servers_by_a_re_run(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    """HA Consul: servers on hosts 1-3, agents on 4 and 5, each dockerd on its own agent.
    Every dockerd restarts, so a user's container (restart policy always, on the overlay) on
    bm-docker-02 makes the run refuse that host without --allow-restart, changing nothing;
    with it, the container runs again, is pinged by name, and is never removed."""
    before = network_id(lab)
    conn = lab.conn(2)
    users = sh(conn, f'docker run -d --name users_app --restart always --network ov_net1 busybox sh -c "{LOOP}"')
    conn.close()
    path = inventory(lab, HOSTS, consul={"port": 8501, "servers": 3})
    code, _, refused = truth(lab, "bootstrap-cluster", "--inventory", path)
    why = {h: s["plan"]["detail"] for h, s in refused["hosts"].items() if s.get("plan", {}).get("status") == "failed"}
    assert code == 2 and list(why) == ["bm-docker-02"] and "--allow-restart" in why["bm-docker-02"], why
    assert "users_app" in why["bm-docker-02"]
    code, dry, real = truth(lab, "bootstrap-cluster", "--allow-restart", "--inventory", path)
    every = {f"bm-docker-{i:02d}" for i in HOSTS}
    assert code == 0 and changed_steps(dry, "consul") == every and set(real["restarts"]) == every
    assert network_id(lab) == before  # the overlay network keeps its ID: the store kept its data
    all_ping(real, HOSTS)
    conn = lab.conn(2)
    assert sh(conn, "docker inspect -f '{{.Id}} {{.State.Running}}' users_app") == f"{users} true"
    conn.close()
    # it pings a new container on another host by name (reached first from the other side it
    # could stay unreachable for more than 20 s: see the note on issue 11)
    conn = lab.conn(5)
    sh(conn, f'docker run -d --name users_peer --network ov_net1 busybox sh -c "{LOOP}" >/dev/null')
    try:
        conn2 = lab.conn(2)
        outward = sh(conn2, f"docker exec users_app sh -c {shlex.quote(WITHIN_20S.format('users_peer'))}")
        conn2.close()
    finally:
        sh(conn, "docker rm -f users_peer >/dev/null")
        conn.close()
    assert outward.startswith("ok"), outward
    conn = lab.conn(4)
    key = json.loads(sh(conn, "cat /etc/overlaylab/consul/gossip.json"))["encrypt"]
    assert sh(conn, "stat -c '%a %U' /etc/overlaylab/consul/gossip.json") == "600 root"
    seen = sh(conn, "ps -eo args; docker inspect overlaylab-consul")
    conn.close()
    assert len(key) == 44 and key not in seen and key not in json.dumps(dry) + json.dumps(real)
    # the HA checks of the smoke suite (the rest of it runs on the other labs, one server each)
    passed, failures, took = run_smoke(Path(path), lab.dir / "smoke-ha.xml", "-m", "ha")
    with capsys.disabled():  # a figure for the log, not a threshold
        print(f"\n    smoke suite's HA checks on 5 hosts: {passed} passed in {took:.1f}s")
    assert failures == {} and passed == 1 + 2 * len(HOSTS), failures
    code, again, _ = fab("bootstrap-cluster", "--inventory", path)
    assert code == 0 and again["changes"] == 0
    conn = lab.conn(2)
    sh(conn, "docker rm -f users_app >/dev/null")  # the user's, removed by the user: teardown follows
    conn.close()


def test_teardown(lab: Lab) -> None:
    code, dry, real = truth(lab, "teardown", "--inventory", inventory(lab, HOSTS, consul={"port": 8501, "servers": 3}))
    assert code == 0 and set(real["restarts"]) == {f"bm-docker-{i:02d}" for i in HOSTS}
    assert changed_steps(real, "consul") == {f"bm-docker-{i:02d}" for i in HOSTS}  # the servers and the agents
    for i in HOSTS:
        conn = lab.conn(i)
        left = sh(conn, "docker ps -a --format '{{.Names}}'; docker volume ls -q; ls /etc/overlaylab/consul 2>&1; true")
        conn.close()
        assert "overlaylab-consul" not in left and "No such file" in left, left
    assert "-ExecStart=" in dry["diffs"]["bm-docker-02"]  # our drop-in goes
    conn = lab.conn(4)  # docker-machine's drop-in is back, byte for byte
    assert sh(conn, f"cat {DROPIN}") == MACHINE_DROPIN.strip()
    conn.close()
    code, again = fab("teardown", "--inventory", inventory(lab, HOSTS, consul={"port": 8501, "servers": 3}))[:2]
    assert code == 0 and again["changes"] == 0
