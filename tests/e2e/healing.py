"""What the fault modules share (test_heal; the HA module of 0a3f0cb, out of the suite): the users' containers, the dockerd
PIDs, a ping matrix made by the test itself with plain `docker exec ... ping`, and one
re-run that must heal. Real components only: each reading is a command on a lab host."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from tests.e2e.clusterlab import Lab, each_host, fab
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
    """The fault: `systemctl restart docker.service` on host i. A start of dockerd 20.10
    sometimes fails here (seen in CI: "Job for docker.service failed", then not active
    within 60 s): its journal and systemd's result are printed, and, as an admin would,
    the unit is reset and started, so that the fault under test is the restart itself."""
    out = on(
        lab,
        i,
        'systemctl restart docker.service && exit 0; echo "result: $(systemctl show -p Result --value docker.service)"; '
        "journalctl -u docker.service -n 25 --no-pager -o cat; "
        "timeout 30 sh -c 'until systemctl is-active -q docker.service; do sleep 1; done' && exit 0; "
        "echo 'not active after 30 s: reset-failed, start'; systemctl reset-failed docker.service; "
        "systemctl start docker.service",
    )
    if out:
        print(f"the fault's restart of {name(i)}'s dockerd failed:\n{out}")


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


def stale_peers(lab: Lab, hosts: list[int]) -> list[str]:
    """Read from the kernels, not through overlaylab: each host's overlay FDB (where it sends
    each peer's MAC) against the addresses the containers on ov_net1 have on each host. An
    entry toward a host that runs no container at that address is a stale peer: a container
    given that address elsewhere would be unreachable from there (overlaylab/peers.py)."""
    mine = each_host(
        hosts,
        lambda i: on(
            lab, i,
            f"ip -4 -o addr show dev eth1 | awk '{{print $4}}' | cut -d/ -f1 | head -1; echo --; "
            f"docker ps -q --filter network=ov_net1 | xargs -r docker inspect -f '{IP_FORMAT}'; echo --; "
            "for f in /run/docker/netns/*-*; do nsenter --net=$f bridge fdb show 2>/dev/null; done | "
            "awk '$3 ~ /^vxlan/ && $4 == \"dst\" {print $1, $5}'",
        ),
    )  # fmt: skip
    vtep: dict[str, int] = {}
    serves: dict[int, set[str]] = {}
    fdb: dict[int, list[list[str]]] = {}
    for i, out in mine.items():
        addr, ips, listed = [*out.split("--"), "", ""][:3]
        vtep[addr.strip()] = i
        serves[i] = set(ips.split())
        fdb[i] = [line.split() for line in listed.strip().splitlines()]
    found = []
    for i, entries in fdb.items():
        for mac, dst in entries:
            ip = ".".join(str(int(b, 16)) for b in mac.split(":")[2:])  # Docker's MAC: 02:42 + the IPv4
            if dst in vtep and ip not in serves[vtep[dst]]:
                found.append(f"{name(i)} sends {ip} to {name(vtep[dst])}, which runs no container there")
    return found


def heal(
    lab: Lab, hosts: list[int], inventory: Path, faulted: set[str] | None, allow_restart: bool = True
) -> dict[str, Any]:
    """One re-run: exit 0, only reported restarts, user containers back, every pair pings,
    fresh containers and the users' own.

    Without ``allow_restart`` the run either heals without a restart, or, if it needs one
    where user containers run, refuses (exit 2, naming the host and the reason) having
    changed nothing; then the run with the flag must heal."""
    before = dockerd_pids(lab, hosts)
    flag = ["--allow-restart"] if allow_restart else []
    code, doc, err = fab("bootstrap-cluster", *flag, "--inventory", str(inventory))
    if code == 2 and not allow_restart:
        assert doc.get("refused") and doc["changes"] == 0, err
        refusals = {h: s["plan"]["detail"] for h, s in doc["hosts"].items() if "plan" in s}
        assert refusals and all("--allow-restart" in why for why in refusals.values()), err
        assert dockerd_pids(lab, hosts) == before
        print(f"refused without --allow-restart: {refusals}")
        return heal(lab, hosts, inventory, faulted)
    assert code == 0, err
    after = dockerd_pids(lab, hosts)
    moved = {h for h in before if before[h] != after[h]}
    assert moved <= set(doc["restarts"]), (moved, doc["restarts"])
    if faulted is not None:  # and hosts the fault left sending its old addresses (overlaylab/peers.py)
        mending = {h for h, why in doc["restarts"].items() if why.startswith("its overlay still sends")}
        assert set(doc["restarts"]) <= faulted | mending, doc["restarts"]
    assert users_running(lab, hosts) == dict.fromkeys(map(name, hosts), "true")
    stale = stale_peers(lab, hosts)
    assert not stale, f"stale overlay peers after a re-run that restarted {doc['restarts']}:\n" + "\n".join(stale)
    failed = pings(lab, hosts)
    assert not failed, f"fresh containers, after a re-run that restarted {doc['restarts']}:\n" + "\n".join(failed)
    failed = users_pings(lab, hosts)
    assert not failed, f"the users' containers, after a re-run that restarted {doc['restarts']}:\n" + "\n".join(failed)
    return doc
