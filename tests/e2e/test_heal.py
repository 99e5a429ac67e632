"""End to end, real components (sshd, systemd, dockerd 20.10, Consul, busybox): one
`fab bootstrap-cluster` re-run heals a kv cluster after a single real fault, injected for
real on the lab: a worker's dockerd restarted; a worker rebooted, soft (`systemctl
reboot`) and hard (a power cut); the Consul container removed; Consul's data lost (its
container and volume removed); the manager's dockerd
restarted three times in a row; the manager rebooted, soft and hard; a restart of the
run's own that moves a user's container to another address; a gossip partition made
between the hosts (`fab lab-impair --partition`); the manager's
cluster address moved (refused) and back; a worker's power cut in the middle of a
bootstrap. A worker's moved address is not healed without restarting its peers, and is
not asserted here: see the note on issue 9. Last, the smoke suite on the cluster broken on
purpose (it names the broken hosts).

A user container with `--restart always` runs on the overlay on every host; the re-run
is given `--allow-restart` (the manager's restarts: without it, see heal()). After it
the test proves, with containers of its own and plain `docker exec ... ping`, that every
ordered pair of hosts pings by IP and by name; that the restarts are exactly those the
fault calls for, a race of dockerd's the test names, or a stale peer the test itself read
(healing.heal()); that every dockerd whose PID changed was reported restarted; and that
the user containers run again. After a dockerd restart `fab verify` is held to the truth
(healing.verify_after_a_restart()). One lab serves the module; the faults run in order."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlaylab.facts import DROPIN
from overlaylab.lab import lifecycle
from tests import dry_run_rule
from tests.e2e import healing
from tests.e2e.clusterlab import FAB, ROOT, Lab, fab, module_lab, run_smoke
from tests.e2e.healing import USER_APP, name, on
from tests.e2e.labtools import sh

NAME, RANGE = "e2eheal", "10.217.0.0/16"
ENGINES = "legacy,legacy,legacy"
HOSTS = [1, 2, 3]


def _bootstrapped(lab: Lab) -> None:
    code, _, err = fab("bootstrap-cluster", "--inventory", str(lab.inventory("abc", HOSTS)))
    assert code == 0, err
    healing.start_users_app(lab, HOSTS)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from module_lab(tmp_path_factory, NAME, ENGINES, RANGE, _bootstrapped)


def dockerd_pids(lab: Lab) -> dict[str, str]:
    return healing.dockerd_pids(lab, HOSTS)


def users_running(lab: Lab) -> dict[str, str]:
    return healing.users_running(lab, HOSTS)


def pings(lab: Lab, hosts: list[int] = HOSTS) -> list[str]:
    return healing.pings(lab, hosts)


def heal(
    lab: Lab, must: set[str], may: set[str] | None = None, inventory: Path | None = None, allow_restart: bool = True
) -> dict[str, Any]:
    """healing.heal() on this module's three hosts and inventory: ``must`` restart, ``may`` too."""
    return healing.heal(lab, HOSTS, inventory or lab.inventory("abc", HOSTS), must, may, allow_restart)


def test_the_cluster_with_user_containers_pings_before_any_fault(lab: Lab) -> None:
    assert users_running(lab) == dict.fromkeys(map(name, HOSTS), "true")
    assert pings(lab) == [] and healing.users_pings(lab, HOSTS) == []


def test_a_workers_dockerd_restarted_then_a_restart_that_moves_a_users_address(lab: Lab) -> None:
    """The fault: bm-docker-02's dockerd restarted, healed by one re-run. It also sets the
    scene for the second half: a user's container (restart policy always) on bm-docker-03,
    which bm-docker-02 knows only by a lookup: 02's dockerd restarted after it joined, then
    02 pinged it. Such an entry carries the endpoint ID "dummy" and no leave removes it
    (overlaylab/peers.py). Then 03's drop-in is edited by hand: the re-run writes it back and
    restarts that dockerd, and the container comes back at another address: the first free
    one, and a lower one was freed on bm-docker-01 meanwhile. 02 would go on sending the old
    address to 03; the run's peers step finds it and restarts 02 (before that step the run
    left it so: its first read found it on a scratch lab)."""
    q = f"docker inspect -f '{healing.IP_FORMAT}' mover3"
    on(lab, 1, f'docker run -d --name hole1 --network ov_net1 busybox sh -c "{healing.LOOP}" >/dev/null')
    on(
        lab,
        3,
        f'docker run -d --name mover3 --restart always --network ov_net1 busybox sh -c "{healing.LOOP}" >/dev/null',
    )
    try:
        before = on(lab, 3, q)
        healing.restart_dockerd(lab, 2)
        healing.verify_after_a_restart(lab, HOSTS, lab.inventory("abc", HOSTS), 2)
        heal(lab, set(), may={name(2)})  # if the users' container came back before gossip (docs/operations.md)
        assert on(lab, 2, healing.ping_command(f"{USER_APP}2", [(f"{USER_APP}2 -> mover3", before)], 20)) == ""
        on(lab, 1, "docker rm -f hole1 >/dev/null")  # a free address below mover3's
        on(lab, 3, f"echo '# edited by hand' >> {DROPIN}")
        doc = heal(lab, {name(3)})
        assert on(lab, 3, q) != before, "the test's premise: the container came back at another address"
        assert doc["hosts"][name(2)]["peers"]["status"] == "changed", doc["hosts"][name(2)]
        assert set(doc["restarts"]) == {name(2), name(3)}, doc["restarts"]
        assert (before, name(3)) in healing.mended_entries(doc["restarts"][name(2)]), doc["restarts"]
    finally:
        on(lab, 1, "docker rm -f hole1 >/dev/null 2>&1; true")
        on(lab, 3, "docker rm -f mover3 >/dev/null")


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_a_worker_host_rebooted(lab: Lab, hard: bool) -> None:
    """`systemctl reboot`, or a power cut (after which dockerd's overlay restore fails).

    A container of the user's without a restart policy runs on the worker and does not
    come back. Its address (given with `--ip`, high in the subnet, so that no container
    the run starts again takes it: they get the first free one), once free, is given
    (`--ip`) to a new container on the manager, which the other worker must reach: its dockerd got no leave for the old one
    (the host died, or stopped it in its own shutdown) and would send that address to
    bm-docker-03 until restarted (overlaylab/peers.py); the re-run restarts the hosts that
    hold such an entry."""
    # high in the subnet: the re-run's restarts give the first free addresses, which it is not
    ip = on(lab, 3, f"docker inspect -f '{healing.IP_FORMAT}' {USER_APP}3").rpartition(".")[0] + ".200"
    on(lab, 3, f'docker run -d --name gone3 --ip {ip} --network ov_net1 busybox sh -c "{healing.LOOP}" >/dev/null')
    try:
        lifecycle.reboot(NAME, name(3), hard=hard)
        # soft: as a dockerd restart (may); hard: its overlay restore fails, it must restart
        heal(lab, {name(3)} if hard else set(), may={name(3)})
    finally:
        on(lab, 3, "docker rm -f gone3 >/dev/null")
    try:
        on(lab, 1, f'docker run -d --name got1 --ip {ip} --network ov_net1 busybox sh -c "{healing.LOOP}" >/dev/null')
        targets = [(f"{USER_APP}2 -> got1", ip), (f"{USER_APP}2 -> got1", "got1")]
        assert on(lab, 2, healing.ping_command(f"{USER_APP}2", targets, 20)) == ""
    finally:
        on(lab, 1, "docker rm -f got1 >/dev/null 2>&1; true")


def certain(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(h, step) for h, steps in doc["hosts"].items() for step, o in steps.items() if o["status"] == "changed"}


def dry_run(lab: Lab) -> dict[str, Any]:
    code, doc, err = fab(
        "bootstrap-cluster", "--dry-run", "--allow-restart", "--inventory", str(lab.inventory("abc", HOSTS))
    )
    assert code == 0, err
    return doc


def test_the_consul_container_removed(lab: Lab) -> None:
    """Its data is kept: the facts, read while it is away, cannot tell the network; the dry
    run says so, and plans what the run does: Consul alone."""
    conn = lab.conn(1)
    sh(conn, "docker rm -f overlaylab-consul >/dev/null")
    conn.close()
    planned = dry_run(lab)
    doc = heal(lab, set())
    dry_run_rule.check(planned, doc)
    assert certain(planned) == {(name(1), "consul")}


def test_consuls_data_lost(lab: Lab) -> None:
    """g: Consul's container and its volume removed, so the store no longer holds the network.
    Each dockerd still holds it (its address pool, its VXLAN ID in the sandboxes): every one
    restarts, the network is made again with the inventory's subnet and a new ID, said so;
    the user's containers, left on the lost one, are named and connected to the new one, and
    none is removed. The dry run plans exactly what the run does."""
    ids = {}
    for i in HOSTS:
        conn = lab.conn(i)
        ids[i] = sh(conn, f"docker inspect -f '{{{{.Id}}}}' {USER_APP}{i}")
        conn.close()
    conn = lab.conn(1)
    old = sh(conn, "docker network inspect -f '{{.Id}}' ov_net1")
    sh(conn, "docker rm -f overlaylab-consul >/dev/null && docker volume rm overlaylab-consul-data >/dev/null")
    conn.close()
    planned = dry_run(lab)
    doc = heal(lab, set(map(name, HOSTS)))
    dry_run_rule.check(planned, doc)
    assert set(doc["restarts"]) == set(map(name, HOSTS))
    conn = lab.conn(1)
    new, subnet = sh(conn, "docker network inspect -f '{{.Id}} {{(index .IPAM.Config 0).Subnet}}' ov_net1").split()
    conn.close()
    assert new != old and subnet == lab.base["network"]["subnet"]
    said = doc["hosts"][name(1)]["network"]["detail"]
    assert said == f"recreated ov_net1 with a new ID {new[:12]} (the lost one was {old[:12]})"
    assert doc["left_on_lost_network"] == {name(i): [f"{USER_APP}{i}"] for i in HOSTS}
    for i in HOSTS:  # the same containers, not new ones, now on the new network
        conn = lab.conn(i)
        on = sh(
            conn, f"docker inspect -f '{{{{.Id}}}} {{{{.NetworkSettings.Networks.ov_net1.NetworkID}}}}' {USER_APP}{i}"
        )
        conn.close()
        assert on == f"{ids[i]} {new}"


def test_the_managers_dockerd_restarted_three_times_in_a_row(lab: Lab) -> None:
    """As a user would: the fault, `fab verify` (held to the truth: it names the manager
    whose users' container came back before gossip, or passes and the users' containers
    ping), then the re-run, without --allow-restart (it refuses, naming the manager, or
    heals without a restart; then with it the manager alone restarts)."""
    for _ in range(3):
        healing.restart_dockerd(lab, 1)
        healing.verify_after_a_restart(lab, HOSTS, lab.inventory("abc", HOSTS), 1)
        heal(lab, set(), may={name(1)}, allow_restart=False)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_the_manager_host_rebooted(lab: Lab, hard: bool) -> None:
    """docs/operations.md's row: its anchor is made again; the manager's dockerd restarts only where
    the users' container came back before its gossip (the race of its restart, as when its
    dockerd alone restarts: seen both ways after a power cut), and no other host's restarts
    but for stale peers the test itself read (heal()). After a power cut the manager's
    dockerd drops its stale records itself: its store, Consul, is a container it has not
    started yet, so its overlay restore does not fail as a worker's does."""
    lifecycle.reboot(NAME, name(1), hard=hard)
    doc = heal(lab, set(), may={name(1)})
    assert doc["hosts"][name(1)]["anchor"]["status"] == "changed", doc["hosts"][name(1)]


def lab_impair(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), "lab-impair", "--name", NAME, *args, "--json"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def gossip_saw_fail(lab: Lab, i: int, peer: str, since: str) -> bool:
    """Host i's dockerd saw ``peer`` fail since ``since`` (serf's member events, in its journal)."""
    last = on(lab, i, f"journalctl -u docker.service -o cat --no-pager --since '{since}' | "
                      f"grep -o 'serf: EventMember[A-Za-z]*: {peer} ' | tail -1; true")  # fmt: skip
    return "EventMemberFailed" in last


def test_a_gossip_partition_made_between_the_hosts_heals_with_one_re_run(lab: Lab) -> None:
    """bm-docker-03 cut off from the others (`fab lab-impair --partition`, outside the hosts,
    as a switch would) until each side's gossip saw the other fail, then joined again (the
    reset): dockerd does not rejoin by itself (it joins one neighbour, once), so until serf's
    occasional reconnect the overlay is split. One re-run heals: at most bm-docker-03 restarts
    (it last saw most of its peers fail: the partition repair), unless serf reconnected first."""
    since = on(lab, 1, "date '+%Y-%m-%d %H:%M:%S'")  # the hosts share this machine's clock
    lab_impair("--node", name(3), "--partition")
    try:
        cut = on(
            lab, 1, f"ping -c 2 -W 1 -q {lab.spec.hosts[2].cluster_ip} >/dev/null 2>&1 && echo crossed || echo cut"
        )
        assert cut == "cut", "the partition did not stop a ping between the hosts"
        deadline = time.monotonic() + 90
        while not (gossip_saw_fail(lab, 1, name(3), since) and gossip_saw_fail(lab, 3, name(1), since)):
            assert time.monotonic() < deadline, "the partition was not seen by gossip within 90 s"
            time.sleep(2)
    finally:
        lab_impair("--reset")
    assert lab_impair("--show")["impairments"] == []
    heal(lab, set(), may={name(3)})


def move_address(lab: Lab, i: int, new: str) -> str:
    """The host's eth1 address moves, as a DHCP lease can: the old one goes, the new one comes."""
    conn = lab.conn(i)
    old = sh(conn, "ip -4 -o addr show dev eth1 | awk '{print $4}'")
    sh(conn, f"ip addr del {old} dev eth1 && ip addr add {new}/{old.split('/')[1]} dev eth1")
    conn.close()
    return old.split("/")[0]


def sent_to(lab: Lab, address: str) -> dict[str, int]:
    """host -> how many FDB entries of its overlay sandboxes send a MAC to ``address``, read by
    the test itself; every host answers (an unread host fails the test)."""
    read = (
        'n=0; for f in /run/docker/netns/*-*; do [ -e "$f" ] || continue; '
        f"n=$((n + $(nsenter --net=$f bridge fdb show 2>/dev/null | grep -c ' dst {address} '))); done; echo $n"
    )
    return {name(i): int(on(lab, i, read)) for i in HOSTS}


def registered(lab: Lab) -> list[str]:
    """The dockerd registrations in the store (docker/nodes), as the manager's Consul lists them."""
    store = lab.spec.hosts[0].cluster_ip  # Consul listens on the manager's cluster address alone
    keys = json.loads(on(lab, 1, f"curl -sf http://{store}:8500/v1/kv/docker/nodes/?keys"))
    assert keys, "no registration read in the store"
    return sorted(key.rsplit("/", 1)[-1] for key in keys)


def reached(lab: Lab, ip: str, container: str, hosts: list[int]) -> list[str]:
    """The users' container on each of ``hosts`` pings ``container`` by IP and by name; the misses."""
    return [
        line
        for j in hosts
        for line in on(
            lab,
            j,
            healing.ping_command(f"{USER_APP}{j}", [(f"{USER_APP}{j} -> {container}", t) for t in (ip, container)], 20),
        ).splitlines()
        if line
    ]


def moved_and_healed(lab: Lab, i: int, new: str, taker: int | None = None) -> str:
    """Host i's address moves to ``new`` and one `bootstrap-cluster --allow-restart` heals:
    host i restarts for its move, and exactly the other hosts whose overlay sent to its old
    address, each for those entries; it is registered under the new address alone; no host
    sends to the old address any more, and fresh containers and the users' own ping every
    pair. With ``taker``: a container of the test's own ran on host i at a fixed address
    (no restart policy: the restart stops it, and its leave goes out from an address host i
    no longer has); that address, free after the run, is given to a new container on host
    ``taker``, which every other host must reach. Returns the old address."""
    now = on(lab, i, "ip -4 -o addr show dev eth1 | awk '{print $4}' | cut -d/ -f1")
    fixed = ""
    if taker is not None:  # high in the subnet: the run's restarts give the first free addresses
        fixed = on(lab, i, f"docker inspect -f '{healing.IP_FORMAT}' {USER_APP}{i}").rpartition(".")[0] + ".201"
        on(
            lab,
            i,
            f'docker run -d --name moving{i} --ip {fixed} --network ov_net1 busybox sh -c "{healing.LOOP}" >/dev/null',
        )
        assert reached(lab, fixed, f"moving{i}", [j for j in HOSTS if j != i]) == []  # each other host learned it
    before = sent_to(lab, now)
    holders = {h for h, n in before.items() if n > 0 and h != name(i)}
    assert holders == {name(j) for j in HOSTS if j != i}, before  # the others send its containers there
    old = move_address(lab, i, new)
    assert old == now
    listening = on(lab, i, "ss -Hltn 'sport = :7946' | awk '{print $4}'")
    assert listening == f"{old}:7946", listening  # the fault as made: its gossip on the old address alone
    code, doc, err = fab("bootstrap-cluster", "--allow-restart", "--inventory", str(lab.inventory("abc", HOSTS)))
    assert code == 0, err
    assert " blocked" not in err and " rejected" not in err, err  # the probe listened at the new address
    restarts: dict[str, str] = doc["restarts"]
    assert f"dockerd advertises {old}, but eth1 now has {new}" in restarts[name(i)], restarts
    assert set(restarts) == holders | {name(i)}, restarts
    for host, why in restarts.items():
        if host != name(i):
            assert why.startswith(healing.PEERS_REASON) and f"{name(i)}'s old address {old}" in why, restarts
    assert sent_to(lab, old) == dict.fromkeys(map(name, HOSTS), 0)
    nodes = registered(lab)
    assert f"{new}:2376" in nodes and f"{old}:2376" not in nodes, nodes
    assert healing.users_running(lab, HOSTS) == dict.fromkeys(map(name, HOSTS), "true")
    failed = healing.pings(lab, HOSTS) + healing.users_pings(lab, HOSTS)
    assert not failed, f"after {name(i)} moved from {old} to {new} and a re-run restarted {restarts}:\n" + "\n".join(
        failed
    )
    # the "none to the old address" read above was not empty: after the pings, every other
    # host's table sends host i's containers to its new address
    toward_new = sent_to(lab, new)
    assert all(n > 0 for h, n in toward_new.items() if h != name(i)), toward_new
    if taker is not None:
        on(lab, i, f"docker rm -f moving{i} >/dev/null")
        on(
            lab,
            taker,
            f'docker run -d --name took{taker} --ip {fixed} --network ov_net1 busybox sh -c "{healing.LOOP}" >/dev/null',
        )
        try:
            missed = reached(lab, fixed, f"took{taker}", [j for j in HOSTS if j != taker])
        finally:
            on(lab, taker, f"docker rm -f took{taker} >/dev/null 2>&1; true")
        assert not missed, f"{fixed}, moving{i}'s address on {name(i)} before its move, now on {name(taker)}: {missed}"
    print(f"{name(i)} moved from {old} to {new}: the re-run restarted {sorted(restarts)}")
    return old


def test_a_moved_workers_address_is_healed_by_one_re_run_and_so_is_its_move_back(lab: Lab) -> None:
    """bm-docker-02's address moves, as a DHCP lease can. Its dockerd still gossips, and
    registers, under the old one, its store connections from there hang (its first facts
    read stalls, and is read again), and the other hosts' overlays send its containers'
    addresses there. One re-run heals it: the port probe listens on the new address itself
    (a connection there was refused, by nobody, and the preflight said "tcp/7946 (gossip)
    blocked"), 02 restarts for its move, and each other host for its entries toward the old
    address (moved_and_healed()), and an address a container of 02 had before the move,
    given after the run to a new container on 03, is reached from every host. The address
    moves back, which is a move too: one re-run heals that."""
    moved_and_healed(lab, 2, "10.217.1.112", taker=3)
    moved_and_healed(lab, 2, lab.spec.hosts[1].cluster_ip)


def test_a_moved_manager_address_is_refused(lab: Lab) -> None:
    """The manager's address moves: refused (exit 2), both addresses named, nothing changed.
    Moved back, one re-run mends what its absence did to gossip (the workers saw it fail,
    and dockerd does not rejoin by itself): at most the manager's dockerd restarts.
    A worker's move is not asserted here (see the note on issue 9)."""
    before = dockerd_pids(lab)
    old = move_address(lab, 1, "10.217.1.111")
    try:
        code, doc, err = fab("bootstrap-cluster", "--allow-restart", "--inventory", str(lab.inventory("abc", HOSTS)))
    finally:
        move_address(lab, 1, old)
    assert code == 2 and doc["changes"] == 0, err
    # preflight names it first: the workers' `docker info` may stall on the store it took away
    refusal = doc["hosts"][name(1)]["preflight"]["detail"]
    assert f"the manager's cluster address changed from {old} to 10.217.1.111 (eth1)" in refusal
    assert dockerd_pids(lab) == before
    doc = heal(lab, set(), may={name(1)})  # "at most the manager's dockerd restarts"
    print(f"after the manager's address came back: restarts {doc['restarts']}")


def test_a_worker_dies_during_a_bootstrap(lab: Lab) -> None:
    """Last in the module: its run changes dockerd's settings (a 25 s discovery TTL), so that
    every daemon restarts, the manager first, then one worker at a time. When the run reports
    the manager's dockerd step, the last worker's power is cut. The run must end (exit 1)
    within 3 minutes, naming that host unreachable; the other two keep a running dockerd, get
    the network and anchors and ping each other. Once the host is powered on again
    (`lab-up`), one re-run heals, restarting that host's dockerd alone."""
    inventory = lab.inventory("ttl25", HOSTS, dockerd={"discovery_ttl": 25})
    out = lab.dir / "dies.json"
    progress: list[str] = []
    manager_step = re.compile(rf"^ \S {name(1)}\s+dockerd\s+(changed|failed)")
    with out.open("w") as stdout:
        proc = subprocess.Popen(
            [FAB, "-r", str(ROOT), "bootstrap-cluster", "--allow-restart", "--inventory", str(inventory), "--json"],
            stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        cut = None
        for line in proc.stderr:
            progress.append(line)
            if cut is None and manager_step.match(line):
                lifecycle.power_off(NAME, name(3))
                cut = time.monotonic()
        code = proc.wait(timeout=600)
    took = time.monotonic() - (cut or 0)
    log = "".join(progress)
    assert cut is not None, log
    assert took < 180, f"the run went on {took:.0f}s after the power cut\n{log}"
    assert code == 1, log
    doc = json.loads(out.read_text())
    dead = [o["detail"] for o in doc["hosts"][name(3)].values() if o["status"] == "failed"]
    assert dead and "unreachable" in dead[0], doc["hosts"][name(3)]
    for i in (1, 2):
        conn = lab.conn(i)
        assert sh(conn, "systemctl is-active docker.service") == "active"
        conn.close()
        for step in ("network", "anchor", "verify") if i == 1 else ("anchor", "verify"):
            assert doc["hosts"][name(i)][step]["status"] in ("ok", "changed"), (step, doc["hosts"][name(i)])
    assert pings(lab, hosts=[1, 2]) == []

    lifecycle.up(NAME, engine_opt=ENGINES, addr_range=RANGE)
    heal(lab, {name(3)}, inventory=inventory)


def test_the_smoke_suite_fails_where_the_cluster_is_broken_and_names_the_host(lab: Lab) -> None:
    """Last in the module (a broken node of the legacy overlay may not heal by itself, so no
    test may come after it on this lab): on the cluster the faults above left healed, the
    packaged smoke suite must fail where it is broken, for real, and name the host:
    bm-docker-02 with our drop-in removed and docker restarted, bm-docker-03 with docker
    stopped; bm-docker-01's own checks pass."""
    inventory = lab.inventory("ttl25", HOSTS, dockerd={"discovery_ttl": 25})  # what the last test's run set
    code, _, err = fab("bootstrap-cluster", "--allow-restart", "--inventory", str(inventory))
    assert code == 0, err  # the cluster as that inventory wants it, whatever the tests before left
    on(lab, 2, f"rm -f {DROPIN} && systemctl daemon-reload && systemctl restart docker")
    on(lab, 3, "systemctl stop docker.socket docker.service")
    passed, failures, _ = run_smoke(inventory, lab.dir / "smoke-broken.xml")
    assert passed > 0
    expected = {
        "test_dockerd_runs[bm-docker-03]": "bm-docker-03: docker.service is inactive",
        "test_dockerd_runs_with_our_cluster_flags[bm-docker-02]": "bm-docker-02: dockerd runs",
        "test_drop_in_on_disk_is_what_the_templates_render[bm-docker-02]": f"bm-docker-02: {DROPIN} is missing",
        "test_containers_ping_by_ip[bm-docker-01->bm-docker-03]": "bm-docker-03: no probe container",
        "test_engine_version_has_the_cluster_store[bm-docker-03]": "bm-docker-03: dockerd does not answer",
    }
    for test, message in expected.items():
        assert test in failures, f"{test} did not fail; failures: {sorted(failures)}"
        assert message in failures[test], f"{test}: {failures[test]!r}"
    # every failure is about one of the two broken hosts, and the healthy host's own checks pass
    for test, message in failures.items():
        assert "bm-docker-02" in test + message or "bm-docker-03" in test + message, (test, message)
    assert not any(t.endswith("[bm-docker-01]") for t in failures)
