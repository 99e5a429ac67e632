"""What the fault modules share (test_heal; the HA module of 0a3f0cb, out of the suite): the users' containers, the dockerd
PIDs, a ping matrix made by the test itself with plain `docker exec ... ping`, and one
re-run that must heal. Real components only: each reading is a command on a lab host."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from overlaylab import remote
from tests.e2e.clusterlab import Lab, checks, each_host, fab
from tests.e2e.labtools import sh

USER_APP = "users_app"  # + the host number: on a kv overlay, endpoint names are global
IP_FORMAT = "{{.NetworkSettings.Networks.ov_net1.IPAddress}}"
LOOP = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"


def name(i: int) -> str:
    return f"bm-docker-{i:02d}"


def on(lab: Lab, i: int, command: str) -> str:
    conn = lab.conn(i)
    try:
        return sh(conn, command)
    finally:
        conn.close()


def start_users_app(lab: Lab, hosts: list[int], network: str = "ov_net1") -> None:
    """A user's container with `--restart always` on the overlay, on every host given."""
    each_host(
        hosts,
        lambda i: on(
            lab, i, f'docker run -d --name {USER_APP}{i} --restart always --network {network} busybox sh -c "{LOOP}"'
        ),
    )


def restart_dockerd(lab: Lab, i: int) -> None:
    """The fault: `systemctl restart docker.service` on host i, as an admin runs it, and proven
    made: a new dockerd PID, active. Its start limit (3 starts in 60 s, which the heal runs
    before use up) is reset first, as overlaylab's own restarts do: the fault is the restart,
    not systemd's refusal. A restart that fails, or leaves the same PID, fails the test
    with systemd's result and dockerd's journal: a fault not made proves nothing."""
    conn = lab.conn(i)
    try:
        before = sh(conn, "systemctl show -p MainPID --value docker.service")
        result = remote.run(
            conn,
            "systemctl reset-failed docker.service 2>/dev/null; systemctl restart docker.service && "
            "systemctl is-active docker.service && systemctl show -p MainPID --value docker.service",
            sudo=True,
            check=False,
        )
        after = result.stdout.split()
        if result.exited != 0 or after[-1:] == [before] or not after[-1:]:
            journal = sh(
                conn,
                'echo "result: $(systemctl show -p Result --value docker.service)"; '
                "journalctl -u docker.service -n 40 --no-pager -o short-precise; true",
            )
            pytest.fail(
                f"the fault was not made: `systemctl restart docker.service` on {name(i)} exited {result.exited} "
                f"(dockerd PID {before} before, {after[-1:] or 'none'} after):\n{result.stderr}\n{journal}"
            )
    finally:
        conn.close()


def dockerd_pids(lab: Lab, hosts: list[int]) -> dict[str, str]:
    found = each_host(hosts, lambda i: on(lab, i, "systemctl show -p MainPID --value docker.service"))
    return {name(i): pid for i, pid in found.items()}


def users_running(lab: Lab, hosts: list[int]) -> dict[str, str]:
    found = each_host(hosts, lambda i: on(lab, i, f"docker inspect -f '{{{{.State.Running}}}}' {USER_APP}{i} 2>&1"))
    return {name(i): state for i, state in found.items()}


def ping_command(source: str, targets: list[tuple[str, str]], window: float) -> str:
    """One command for one source container: each (label, target) retried until the window
    ends, and each one that never answered printed."""
    return "; ".join(
        f"end=$(( $(date +%s) + {int(window)} )); "
        f"until docker exec {source} ping -c 1 -W 1 {target} >/dev/null 2>&1; do "
        f'[ $(date +%s) -ge $end ] && {{ echo "{label} ({target})"; break; }}; sleep 0.5; done'
        for label, target in targets
    )


def users_pings(lab: Lab, hosts: list[int], window: float = 20) -> list[str]:
    """The users' own containers, each pinging every other host's by IP and by name: what a
    user sees. Fresh containers alone can ping while these do not (steps/holdback.py)."""
    ips = each_host(hosts, lambda i: on(lab, i, f"docker inspect -f '{IP_FORMAT}' {USER_APP}{i}"))

    def from_host(a: int) -> list[str]:
        targets = [(f"{USER_APP}{a} -> {USER_APP}{b}", t) for b in hosts if b != a for t in (ips[b], f"{USER_APP}{b}")]
        return [line for line in on(lab, a, ping_command(f"{USER_APP}{a}", targets, window)).splitlines() if line]

    return [line for found in each_host(hosts, from_host).values() for line in found]


def pings(lab: Lab, hosts: list[int], window: float = 20) -> list[str]:
    """Containers of the test's own on every host; every ordered pair pings by IP and by name
    (plain `docker exec ... ping`, a short window to converge, as verify allows); the failures."""
    tag = secrets.token_hex(3)
    conns = {i: lab.conn(i) for i in hosts}
    failures: list[str] = []
    try:
        ips = each_host(  # all hosts at once: one at a time costs seconds a call, ~15 calls a module
            hosts,
            lambda i: sh(
                conns[i],
                f'docker run -d --name heal-{tag}-{i} --network ov_net1 busybox sh -c "{LOOP}" >/dev/null && '
                f"docker inspect -f '{IP_FORMAT}' heal-{tag}-{i}",
            ),
        )

        def from_host(a: int) -> list[str]:  # one command per source host
            targets = [(f"{name(a)} -> {name(b)}", t) for b in hosts if b != a for t in (ips[b], f"heal-{tag}-{b}")]
            return [
                line for line in sh(conns[a], ping_command(f"heal-{tag}-{a}", targets, window)).splitlines() if line
            ]

        for found in each_host(hosts, from_host).values():
            failures += found
        failures += diagnose(conns, failures, tag)
    finally:
        each_host(hosts, lambda i: sh(conns[i], f"docker rm -f heal-{tag}-{i} >/dev/null 2>&1; true"))
        for conn in conns.values():
            conn.close()
    return failures


WATCHES = ("datastore.(*datastore).Watch", "networkWatchLoop", "discovery/kv.(*Discovery).Watch", "monitorDiscovery")


def watch_goroutines(conn: Any) -> list[str]:
    """dockerd's goroutines that follow the store (the network's endpoint watch, discovery),
    each with its state, from a stack dump (SIGUSR1): a watch that waits on `<-watchCh` is
    dead until libnetwork's RestartWatch; one blocked in a send waits for its reader."""
    out = sh(
        conn,
        "pid=$(systemctl show -p MainPID --value docker.service); kill -USR1 $pid; sleep 1; "
        'f=$(ls -t /var/run/docker/goroutine-stacks-*.log 2>/dev/null | head -1); [ -n "$f" ] && cat $f; rm -f $f',
    )
    found = []
    for block in out.split("\n\n"):
        frames = [line for line in block.splitlines() if line and not line.startswith("\t")]
        if frames and any(w in block for w in WATCHES):
            found.append(" | ".join(frames[:4]))
    return found or ["(no stack dump, or no store goroutine in it)"]


def diagnose(conns: dict[int, Any], failures: list[str], tag: str) -> list[str]:
    """For each source host with a failed pair: what its embedded DNS answers for each other
    probe, for its own (a local record) and for the users' containers elsewhere (records
    learned before the fault); dockerd's goroutines that follow the store; its dockerd's last
    lines and its Consul container's (in HA mode, the agent its dockerd reads the store
    through): a failure's cause, read while it lasts."""
    lines: list[str] = []
    for i in sorted({int(f.split()[0].rsplit("-", 1)[1]) for f in failures}):
        probe = f"heal-{tag}-{i}"
        lines.append(f"  -- {name(i)}: DNS, the store's goroutines, then dockerd's journal --")
        lookups = [f"heal-{tag}-{j}" for j in conns] + [f"{USER_APP}{j}" for j in conns if j != i]
        lines += ["    " + line for line in sh(
            conns[i],
            f"for c in {' '.join(lookups)}; do "
            f"echo \"$c: $(docker exec {probe} nslookup -type=a $c 127.0.0.11 2>&1 | grep -E 'Address: |Address [0-9]|timed out|NXDOMAIN|SERVFAIL|find' | grep -v '127.0.0.11' | tr '\\n' ' ')\"; done; "
            f"echo \"resolv.conf: $(docker exec {probe} cat /etc/resolv.conf | grep -v '^#' | tr '\\n' ' ')\"",
        ).splitlines()]  # fmt: skip
        lines += ["    " + line for line in watch_goroutines(conns[i])]
        lines += ["    " + line for line in sh(
            conns[i],
            "journalctl -u docker.service --since '-4min' --no-pager -o short-precise | tail -40; "
            "echo '  -- its Consul container --'; docker logs --since 4m overlaylab-consul 2>&1 | tail -25",
        ).splitlines()]  # fmt: skip
    return lines


@dataclass
class Peers:
    """What the kernels of the hosts say, read by the test itself, not through overlaylab:
    per host its cluster (VTEP) address, the addresses of its containers on ov_net1, how
    many overlay sandboxes it has, and where its overlay sends each peer address (FDB)."""

    vtep: dict[int, str]
    serves: dict[int, dict[str, str]]  # host -> its containers' addresses on ov_net1 -> the container
    sandboxes: dict[int, int]
    sends: dict[int, dict[str, int]]  # host -> peer IPv4 -> the host its MAC is sent to

    def stale(self) -> list[str]:
        """Entries toward a host that runs no container at that address: a container given that
        address elsewhere would be unreachable from there (overlaylab/peers.py)."""
        return [
            f"{name(i)} sends {ip} to {name(j)}, which runs no container there"
            for i, entries in sorted(self.sends.items())
            for ip, j in sorted(entries.items())
            if ip not in self.serves[j]
        ]


PEERS_READ = (
    "echo \"vtep $(ip -4 -o addr show dev eth1 | awk '{print $4}' | cut -d/ -f1 | head -1)\"; "
    "ids=$(timeout 60 docker ps -q --filter network=ov_net1) || echo 'unread docker ps failed'; "
    f"echo \"$ids\" | xargs -r docker inspect -f 'ip {IP_FORMAT} {{{{.Name}}}}'; "
    'for f in /run/docker/netns/*-*; do [ -e "$f" ] || continue; echo sandbox; '
    "nsenter --net=$f bridge fdb show 2>/dev/null | "
    'awk \'$3 ~ /^vxlan/ && $4 == "dst" {print "fdb", $1, $5}\'; done'
)


def read_peers(lab: Lab, hosts: list[int]) -> Peers:
    """Every host read at once. A read that shows a host without its cluster address, or
    without a sandbox while containers of its run on the network, fails: an empty read
    proves nothing."""
    found = each_host(hosts, lambda i: on(lab, i, PEERS_READ))
    peers = Peers({}, {}, {}, {})
    for i, out in found.items():
        lines = [line.split() for line in out.splitlines()]
        peers.vtep[i] = next((p[1] for p in lines if p[0] == "vtep" and len(p) == 2), "")
        peers.serves[i] = {p[1]: p[2].lstrip("/") for p in lines if p[0] == "ip" and len(p) == 3}
        peers.sandboxes[i] = sum(1 for p in lines if p == ["sandbox"])
        assert peers.vtep[i], f"{name(i)}: no address read on eth1:\n{out}"
        assert not any(p[:1] == ["unread"] for p in lines), f"{name(i)}: its containers could not be read:\n{out}"
        assert not peers.serves[i] or peers.sandboxes[i], f"{name(i)}: containers on ov_net1, no sandbox read:\n{out}"
    by_vtep = {addr: i for i, addr in peers.vtep.items()}
    for i, out in found.items():
        peers.sends[i] = {}
        for p in (line.split() for line in out.splitlines()):
            if p[0] == "fdb" and len(p) == 3 and p[2] in by_vtep:
                ip = ".".join(str(int(b, 16)) for b in p[1].split(":")[2:])  # Docker's MAC: 02:42 + the IPv4
                peers.sends[i][ip] = by_vtep[p[2]]
    return peers


PEERS_REASON = "its overlay still sends "


def mended_entries(why: str) -> list[tuple[str, str]]:
    """(address, host) of each entry a peers-step restart gave as its reason (peers.describe)."""
    return re.findall(
        r"(\d+\.\d+\.\d+\.\d+) to (\S+?)(?=,|\s)", why.removeprefix(PEERS_REASON).split(", where")[0] + " "
    )


def named_stale(detail: str) -> list[tuple[str, str]]:
    """The (address, host) entries a verify failure or a refusal names as stale peers; [] if none."""
    return mended_entries(detail[detail.index(PEERS_REASON) :]) if PEERS_REASON in detail else []


# verify's hint for a pair whose probe address one host's overlay sends to a third (verify.stale_entry)
PAIR_STALE = re.compile(r"(\S+)'s overlay sends (\d+\.\d+\.\d+\.\d+) \((\S+)'s probe\) to (\S+): a stale entry")


# verify's hint for a pair one of whose ends has no entry for the other's probe (verify.never_learned)
NEVER_LEARNED = re.compile(r"(\S+) has no entry for (\S+)'s probe \((\d+\.\d+\.\d+\.\d+)\)")


def unlearned_named(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(holder, owner, address): each end verify read with no entry for the other's probe."""
    return {m for s in doc["hosts"].values() for m in NEVER_LEARNED.findall(s.get("verify", {}).get("detail", ""))}


def stale_named(doc: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """host -> the (address, host) entries verify names stale on it: as a host's own peers
    (PEERS_REASON) or as the cause of a failed pair (PAIR_STALE: the holder, not the pair's
    other end, which fails with it)."""
    named: dict[str, set[tuple[str, str]]] = {}
    for host, steps in doc["hosts"].items():
        detail = steps.get("verify", {}).get("detail", "")
        if PEERS_REASON in detail:
            named.setdefault(host, set()).update(named_stale(detail))
        for holder, ip, _, toward in PAIR_STALE.findall(detail):
            named.setdefault(holder, set()).add((ip, toward))
    return {host: sorted(entries) for host, entries in named.items()}


def assert_stale_as_read(read: Peers, host: str, entries: list[tuple[str, str]], hosts: list[int], err: str) -> None:
    """Each entry overlaylab named stale on ``host`` is stale as the test itself reads it: the
    host sends the address to that peer, and no container of the peer has it."""
    number = {name(k): k for k in hosts}
    assert entries, f"{host}: named for stale peers, none parsed\n{err}"
    for ip, toward in entries:
        sent, j = read.sends[number[host]].get(ip), number[toward]
        assert sent == j and ip not in read.serves[j], (
            f"{host}: named stale {ip} to {toward}; the test reads it sent to {sent and name(sent)}, "
            f"and {toward} serving it in {read.serves[j].get(ip)}\n{err}"
        )


def heal(
    lab: Lab,
    hosts: list[int],
    inventory: Path,
    must: set[str],
    may: set[str] | None = None,
    allow_restart: bool = True,
) -> dict[str, Any]:
    """One re-run: exit 0, user containers back, every pair pings, fresh containers and the
    users' own, and the restarts checked, always:
    - every host in ``must`` restarts, and any other is in ``may`` (a race of dockerd's that
      the caller names), or was restarted for stale peers: for entries the test itself read
      on that host before the run, each stale as the test reads it: toward a host the run
      restarted, after the run (the run judges those after that restart: no container of
      that host has the address any more); toward any other, before the run (none had it
      then), or made stale by the run (the container that had it has another address now);
    - every dockerd whose PID changed was reported restarted;
    - after it no host sends an address to a host that runs no container there, read by
      the test itself (and the read not empty: each non-restarted host's FDB lists peers).

    Without ``allow_restart`` the run either heals without a restart, or, if it needs one
    where user containers run, refuses (exit 2, naming the host and the reason) having
    changed nothing; then the run with the flag must heal."""
    may = may or set()
    before = dockerd_pids(lab, hosts)
    read_before = read_peers(lab, hosts)
    flag = ["--allow-restart"] if allow_restart else []
    code, doc, err = fab("bootstrap-cluster", *flag, "--inventory", str(inventory))
    if code == 2 and not allow_restart:
        assert doc.get("refused") and doc["changes"] == 0, err
        refusals = {h: s["plan"]["detail"] for h, s in doc["hosts"].items() if "plan" in s}
        assert refusals and all("--allow-restart" in why for why in refusals.values()), err
        for host, why in refusals.items():  # any other host: for stale peers the test read before the run
            if host not in must | may:
                assert PEERS_REASON in why, (refusals, must, may)
                assert_stale_as_read(read_before, host, named_stale(why), hosts, err)
        assert dockerd_pids(lab, hosts) == before
        print(f"refused without --allow-restart: {refusals}")
        return heal(lab, hosts, inventory, must, may)
    assert code == 0, err
    after = dockerd_pids(lab, hosts)
    restarts: dict[str, str] = doc["restarts"]
    moved = {h for h in before if before[h] != after[h]}
    assert moved <= set(restarts), (moved, restarts)
    assert must <= set(restarts), f"these hosts were to restart: {must}; restarted: {restarts}\n{err}"
    read_after = read_peers(lab, hosts)
    number = {name(i): i for i in hosts}
    for host, why in restarts.items():
        if host in must | may:
            continue
        assert why.startswith(PEERS_REASON), f"{host} restarted, not foreseen: {why} (all: {restarts})\n{err}"
        entries = mended_entries(why)
        assert entries, why
        for ip, toward in entries:
            i, j = number[host], number[toward]
            assert read_before.sends[i].get(ip) == j, (
                f"{host} restarted for an entry the test did not read before the run ({ip} to {toward}): {why}\n{err}"
            )
            if toward in restarts:
                now = read_after.serves[j].get(ip)
                assert now is None, (
                    f"{host} restarted for {ip} to {toward}, where {now} has it after the run: {why}\n{err}"
                )
                continue
            had = read_before.serves[j].get(ip)  # None: stale before the run
            assert had is None or read_after.serves[j].get(ip) != had, (
                f"{host} restarted for {ip} to {toward}, where {had} had it before the run and has it after: "
                f"{why}\n{err}"
            )
    for i in hosts:
        if name(i) not in restarts:
            assert read_after.sends[i], f"{name(i)}: no forwarding entry read, and its dockerd did not restart"
    assert users_running(lab, hosts) == dict.fromkeys(map(name, hosts), "true")
    stale = read_after.stale()
    assert not stale, f"stale overlay peers after a re-run that restarted {restarts}:\n" + "\n".join(stale)
    failed = pings(lab, hosts)
    assert not failed, f"fresh containers, after a re-run that restarted {restarts}:\n" + "\n".join(failed)
    failed = users_pings(lab, hosts)
    assert not failed, f"the users' containers, after a re-run that restarted {restarts}:\n" + "\n".join(failed)
    return doc


def verify_after_a_restart(lab: Lab, hosts: list[int], inventory: Path, i: int, whole: bool = True) -> None:
    """`fab verify` right after host i's dockerd restarted, held to the truth either way (the
    rows of docs/operations.md and docs/ha-consul.md): either verify names host i, whose users' container came back before
    dockerd's gossip (its sandbox deaf: exit 1), or it passes, and then the users' own
    containers ping every pair. Which one is dockerd's race, not ours: the container's
    restore waits for its network, that is for the store. And a third, also dockerd's race:
    the restart stopped host i's containers as its gossip stopped, and a leave that did not
    go out leaves other hosts sending that address to host i; verify names them (exit 1),
    and the test reads each such entry itself (CI ci10: bm-docker-02 and -03 still sent
    10.217.9.6 to the manager, where no container had it).

    ``whole``: verify's fresh probes also ping every pair, and host i alone is named: so with
    one Consul server (test_heal), whose store a worker's restart leaves alone and a
    manager's takes away whole (discovery then starts every watch again). Not in HA mode: a
    server's restart can end another host's store watch at its error while that host's
    discovery runs on (steps/watches.py), and then verify rightly names that host too."""
    code, doc, err = fab("verify", "--inventory", str(inventory))
    if code == 0:
        assert users_pings(lab, hosts) == [], err
        print(f"the users' container on {name(i)} came back after gossip: verify passed, and so do their pings")
        return
    assert code == 1, err
    failed = {
        h: s["verify"]["detail"] for h, s in doc["hosts"].items() if s.get("verify", {}).get("status") == "failed"
    }
    deaf = {h for h, why in failed.items() if "made before dockerd's gossip" in why}
    stale = stale_named(doc)
    # every failed pair is one end's stale entry for the other end's probe address (the pair's
    # other end fails with it), or a deaf end that never learned the other's probe (its join's
    # gossip event lost, and a deaf sandbox does not look up; CI ci20: bm-docker-02 and -03
    # failed both ways after 02's restart); any other failed pair is not dockerd's race
    probes = doc["ping_matrix"]["addresses"]
    broken = {(p["from"], p["to"]) for p in doc["ping_matrix"]["pairs"] if not p["ok"]}
    unlearned = unlearned_named(doc)

    def explained(holder: str, owner: str) -> bool:
        if (holder, owner, probes.get(owner)) in unlearned and holder in deaf:
            return True
        return any(ip == probes.get(owner) and toward != owner for ip, toward in stale.get(holder, []))

    unexplained = sorted((a, b) for a, b in broken if not (explained(a, b) or explained(b, a)))
    assert not unexplained, f"failed pairs no stale or unlearned entry explains: {unexplained}; {failed}\n{err}"
    ends = {h for pair in broken for h in pair}
    assert deaf <= {name(i)} and failed and set(failed) == deaf | set(stale) | ends, (
        f"{failed}; deaf {deaf}, stale {stale}\n{err}"
    )
    if stale:  # the restart stopped host i's containers, and their leaves did not all go out with its gossip
        read = read_peers(lab, hosts)
        for host, entries in stale.items():
            assert_stale_as_read(read, host, entries, hosts, err)
        print(f"verify named stale peers, as the test reads them: {stale}")
    if whole:
        pairs = {(p["from"], p["to"], p["by"]): p["ok"] for p in doc["ping_matrix"]["pairs"]}
        assert len(pairs) == len(hosts) * (len(hosts) - 1) * len(checks(doc)) and all(pairs.values()), err
