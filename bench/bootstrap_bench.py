"""Prints bootstrap-cluster figures on the lab, for 3, 12 and 24 hosts (OVERLAYLAB_BENCH_HOSTS): from clean;
a blocked port refused, against a dry run on the same lab; a re-run with nothing to change (in all, steps 1-7 and verify apart, remote commands
per host); `fab verify` alone (fresh probes) against the same work by hand; and, as the floor, the tutorial's own commands scripted over plain ssh,
every host's at once where the tutorial permits (the workers restart together; a run that split the overlay is made again, and counted), with no
checks, as it is and tuned (the floor's commands with the two timing settings overlaylab applies). Ratios are against both, from one run; then
lab-up, bootstrap, no-op re-run, `fab verify` and the lab's memory per host count, each as a multiple of the smallest's. Figures only: nothing
passes or fails here. Run as root: `make bench`. Uses a lab named "bench" and removes it. Last, HA Consul's 3 servers against one, at 3 and 5
hosts (OVERLAYLAB_BENCH_HA; OVERLAYLAB_BENCH_ONLY=ha prints those rows alone, =bootstrap all but them and the modes'). OVERLAYLAB_BENCH_BEFORE=REV[,REV] instead sets other commits'
preflight, no-op re-run and `fab verify` against this clone's, alternated on one lab.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from overlaylab.lab import engine as lab_engine
from overlaylab.lab import hosts, keys, lifecycle
from overlaylab.lab.spec import build_spec
from overlaylab.report import Steps

NAME, RANGE = "bench", "10.212.0.0/16"
ROOT = Path(__file__).resolve().parents[1]
FAB = str(Path(sys.executable).parent / "fab")


class Quiet(Steps):
    def line(self, text: str) -> None:
        pass


def fresh_lab(count: int, inventory: Path, engine: str = "legacy", mode: str = "kv") -> float:
    """A new lab of ``count`` hosts (the old one removed first): the seconds lab-up took."""
    lifecycle.down(NAME, steps=Quiet())
    start = time.monotonic()
    lifecycle.up(NAME, count=count, engine_opt=engine, inventory=inventory, addr_range=RANGE, steps=Quiet())
    took = time.monotonic() - start
    if mode != "kv":
        inventory.write_text(f"mode: {mode}\n" + inventory.read_text())
    return took


def lab_memory_mib() -> float:
    """What the lab's hosts take in all (`docker stats` of the host containers, page cache included)."""
    eng = lab_engine.find(start=False)
    assert eng is not None
    total = 0.0
    for obs in hosts.observe(eng.docker, NAME).values():
        usage = eng.docker.out("stats", "--no-stream", "--format", "{{.MemUsage}}", obs.container).split("/")[0].strip()
        total += float(usage[:-3]) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}.get(usage[-3:], 1)
    return total


def fab(*args: str, root: Path = ROOT) -> tuple[float, dict[str, object]]:
    """One task of the clone at ``root`` (another commit's: its own package, by PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")} if root != ROOT else None
    start = time.monotonic()
    proc = subprocess.run(
        [FAB, "-r", str(root), *args, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env
    )
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-2000:]}")
    return took, json.loads(proc.stdout)


def ssh_command() -> list[str]:
    state = keys.state_dir(NAME)
    return [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={state / 'known_hosts'}",
        "-i",
        str(state / "id_ed25519"),
    ]


def verify_floor(count: int) -> float:
    """`fab verify`'s work by hand, on the bootstrapped cluster: a busybox per host started at
    once, every host pinging every other by IP and by name at once (each until it answers),
    a don't-fragment ping at the overlay's MTU from the probe's namespace (the host's ping,
    as verify's), and 1 MiB fetched over TCP from every other probe's httpd, then all removed
    at once. No facts, no report, no diagnosis: the floor for a fresh-probe verify."""
    spec = build_spec(NAME, "legacy", count, addr_range=RANGE)
    ssh = ssh_command()

    def on_all(commands: dict[str, str]) -> dict[str, str]:
        procs = {
            h: subprocess.Popen([*ssh, f"admin@{h}", c], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            for h, c in commands.items()
        }
        out = {h: p.communicate()[0] for h, p in procs.items()}
        assert all(p.returncode == 0 for p in procs.values()), out
        return out

    fmt = "'{{(index .NetworkSettings.Networks \"ov_net1\").IPAddress}} {{.State.Pid}}'"
    serve = "mkdir -p /www && head -c 1048576 /dev/zero > /www/blob && httpd -f -p 80 -h /www"
    start = time.monotonic()
    started = on_all(
        {
            h.mgmt_ip: f"sudo docker run -d --name vf-{h.name} --network ov_net1 busybox sh -c '{serve}' >/dev/null && "
            f"sudo docker inspect -f {fmt} vf-{h.name} && sudo docker exec vf-{h.name} cat /sys/class/net/eth0/mtu"
            for h in spec.hosts
        }
    )
    ips, pids, mtus = ({h.name: started[h.mgmt_ip].split()[k] for h in spec.hosts} for k in range(3))
    loop = "until ping -c 1 -W 1 {0} >/dev/null 2>&1; do sleep 0.5; done &"
    on_all(
        {
            h.mgmt_ip: f"sudo docker exec vf-{h.name} sh -c '"
            + " ".join(loop.format(t) for o in spec.hosts if o is not h for t in (f"vf-{o.name}", ips[o.name]))
            + " wait'"
            for h in spec.hosts
        }
    )
    full = 'sudo nsenter -t {0} -n ping -c 1 -W 1 -M do -s $(( {1} - 28 )) {2} >/dev/null & bg="$bg $!";'
    fetch = 'sudo docker exec vf-{0} wget -q -O - http://vf-{1}/blob | wc -c | grep -qx 1048576 & bg="$bg $!";'
    on_all(
        {
            h.mgmt_ip: " ".join(
                full.format(pids[h.name], mtus[h.name], ips[o.name]) + " " + fetch.format(h.name, o.name)
                for o in spec.hosts
                if o is not h
            )
            + " for job in $bg; do wait $job || exit 1; done"
            for h in spec.hosts
        }
    )
    on_all({h.mgmt_ip: f"sudo docker rm -f vf-{h.name} >/dev/null" for h in spec.hosts})
    return time.monotonic() - start


def floor(count: int, inventory: Path, tuned: bool = False) -> tuple[float, int]:
    """The tutorial by hand, scripted: no facts, no checks, every host's commands at once where
    the tutorial permits (the drop-ins, the workers' restarts, the containers, the pings),
    the manager's restart first. ``tuned``: the same commands with the two timing settings
    overlaylab applies (Consul's raft_multiplier 1, dockerd's discovery heartbeat 3 s and TTL
    20 s): the limit. Parallel restarts can split the overlay (two daemons each picking the
    other as their one gossip neighbour): a run whose pings do not all pass within 20 s is
    thrown away and made again on a fresh lab. Returns its seconds and how many were made again."""
    repeated = 0
    while True:
        fresh_lab(count, inventory)
        took = _floor_once(count, tuned)
        if took is not None:
            return took, repeated
        repeated += 1
        if repeated > 5:
            raise SystemExit(f"the floor split the overlay {repeated} times in a row at {count} hosts")


def _floor_once(count: int, tuned: bool) -> float | None:
    spec = build_spec(NAME, "legacy", count, addr_range=RANGE)
    ssh = ssh_command()
    manager, ip = spec.hosts[0], spec.hosts[0].cluster_ip

    def on(host: str, command: str) -> None:
        subprocess.run([*ssh, f"admin@{host}", command], check=True, capture_output=True, stdin=subprocess.DEVNULL)

    def parallel(command: str, hosts: list[str]) -> None:
        """On every host at once; a failure here is the floor's own (not a split): the bench stops."""
        procs = [
            subprocess.Popen([*ssh, f"admin@{h}", command], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            for h in hosts
        ]
        if not all([p.wait() == 0 for p in procs]):
            raise SystemExit(f"the floor's command failed on a host: {command}")

    leader = f"until sudo docker exec consul wget -qO- http://{ip}:8500/v1/status/leader 2>/dev/null | grep -q 8300; do sleep 0.5; done"
    gossip = "until ss -Hltn 'sport = :7946' | grep -q .; do sleep 0.5; done"
    opts = " --cluster-store-opt discovery.heartbeat=3 --cluster-store-opt discovery.ttl=20" if tuned else ""
    raft = " -hcl 'performance { raft_multiplier = 1 }'" if tuned else ""
    dropin = (
        "sudo mkdir -p /etc/systemd/system/docker.service.d && printf '[Service]\\nExecStart=\\nExecStart=/usr/sbin/dockerd "
        "-H fd:// --containerd=/run/containerd/containerd.sock --cluster-store=consul://%s:8500 --cluster-advertise=eth1:2376"
        f"{opts}\\n' {ip} | sudo tee /etc/systemd/system/docker.service.d/10-machine.conf >/dev/null && "
        "sudo systemctl daemon-reload"
    )
    everyone = [h.mgmt_ip for h in spec.hosts]
    start = time.monotonic()
    parallel("sudo docker swarm leave --force 2>/dev/null; true", everyone)
    on(
        manager.mgmt_ip,
        f"sudo docker run -d --name consul --network host --restart always progrium/consul -server -bootstrap -bind={ip} -advertise={ip} -client={ip}{raft} >/dev/null && {leader}",
    )
    parallel(dropin, everyone)
    on(manager.mgmt_ip, f"sudo systemctl restart docker && {leader} && {gossip}")
    parallel(f"sudo systemctl restart docker && {gossip}", everyone[1:])
    on(manager.mgmt_ip, "sudo docker network create -d overlay ov_net1 >/dev/null")
    parallel("sudo docker run -d --name bbox-$(hostname) --network ov_net1 busybox sleep 600 >/dev/null", everyone)
    converge = (
        "end=$(( $(date +%s) + 20 )); for peer in {0}; do until sudo docker exec bbox-$(hostname) ping -c 1 -W 1 "
        "bbox-$peer >/dev/null 2>&1; do [ $(date +%s) -ge $end ] && exit 1; sleep 0.5; done; done"
    )
    procs = {
        h.name: subprocess.Popen(
            [*ssh, f"admin@{h.mgmt_ip}", converge.format(" ".join(o.name for o in spec.hosts if o is not h))],
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        for h in spec.hosts
    }
    joined = all([p.wait() == 0 for p in procs.values()])
    took = time.monotonic() - start
    return took if joined else None


def with_servers(inventory: Path, servers: int) -> None:
    doc = yaml.safe_load(inventory.read_text())
    doc["consul"] = {**doc.get("consul", {}), "servers": servers}
    inventory.write_text(yaml.safe_dump(doc))


def ha_rows(inventory: Path) -> None:
    """HA Consul (3 servers, an agent on every other host) against one server, same hosts,
    same run: a bootstrap from clean and a no-op re-run each (OVERLAYLAB_BENCH_HA)."""
    print(f"{'hosts':>5}  {'1 server':>8}  {'3 servers':>9}  {'ratio':>5}  {'no-op 1':>7}  {'no-op 3':>7}")
    for count in [int(n) for n in os.environ.get("OVERLAYLAB_BENCH_HA", "3,5").split(",")]:
        took = {}
        for servers in (1, 3):
            fresh_lab(count, inventory)
            with_servers(inventory, servers)
            first, _ = fab("bootstrap-cluster", "--inventory", str(inventory))
            noop, _ = fab("bootstrap-cluster", "--inventory", str(inventory))
            took[servers] = (first, noop)
        print(
            f"{count:>5}  {took[1][0]:>7.1f}s  {took[3][0]:>8.1f}s  {took[3][0] / took[1][0]:>5.2f}  "
            f"{took[1][1]:>6.1f}s  {took[3][1]:>6.1f}s",
            flush=True,
        )


def refusal(count: int, inventory: Path) -> tuple[float, float]:
    """A fresh lab whose last host drops VXLAN (udp/4789): the seconds a bootstrap takes to
    refuse it (exit 2, the port probe naming the path), and a dry run's on the same lab, the
    baseline (facts, plan and the port probe, all paths open). Was a test's threshold ("within 10 s"): a figure here."""
    host = build_spec(NAME, "legacy", count, {}, addr_range=RANGE).hosts[-1]
    rule = "INPUT -p udp --dport 4789 -j DROP"
    ssh = [*ssh_command(), f"admin@{host.mgmt_ip}", "sudo", "iptables"]
    dry, _ = fab("bootstrap-cluster", "--dry-run", "--inventory", str(inventory))  # before the block: it probes too
    subprocess.run([*ssh, "-I", *rule.split()], check=True)
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [FAB, "-r", str(ROOT), "bootstrap-cluster", "--inventory", str(inventory), "--json"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        took = time.monotonic() - start
        if proc.returncode != 2 or "udp/4789 (VXLAN data) blocked" not in proc.stdout:
            raise SystemExit(f"the blocked port was not refused (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    finally:
        subprocess.run([*ssh, "-D", *rule.split()], check=True)
    return took, dry


def before_after(inventory: Path, revs: list[str]) -> None:
    """Other commits against this clone (OVERLAYLAB_BENCH_BEFORE=REV[,REV...]), on one lab per
    host count, each task run three times by each, alternately (the same minute's noise for
    all): a dry run on the fresh lab (the healthy preflight: facts, checks, the port probe
    and, since issue 30, the path-MTU ladder), then on the bootstrapped cluster the no-op
    re-run and `fab verify` (fresh probes). Medians, each as a multiple of the first's."""
    with tempfile.TemporaryDirectory(prefix="overlaylab-before-") as tmp:
        roots = []
        for rev in revs:
            old = Path(tmp) / rev
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            roots.append(old)
        roots.append(ROOT)
        names = [*revs, "this clone"]
        print(f"{', '.join(names)}: medians of 3, alternated on one lab (each / {names[0]}; port probe's own seconds)")
        for count in [int(n) for n in os.environ.get("OVERLAYLAB_BENCH_HOSTS", "3,12").split(",")]:
            fresh_lab(count, inventory)
            tasks = {"preflight (dry run)": ("bootstrap-cluster", "--dry-run", "--inventory", str(inventory))}
            rows = {task: compare(args, roots) for task, args in tasks.items()}
            fab("bootstrap-cluster", "--inventory", str(inventory))
            tasks = {
                "no-op re-run": ("bootstrap-cluster", "--inventory", str(inventory)),
                "fab verify": ("verify", "--inventory", str(inventory)),
            }
            rows.update({task: compare(args, roots) for task, args in tasks.items()})
            for task, (took, probes) in rows.items():
                cells = "  ".join(
                    f"{name} {t:.2f}s ({t / took[0]:.2f})"
                    + (f" probe {p:.2f}s" if task.startswith("preflight") else "")
                    for name, t, p in zip(names, took, probes, strict=True)
                )
                print(f"{count:>5}  {task:<20}  {cells}", flush=True)


def compare(args: tuple[str, ...], roots: list[Path]) -> tuple[list[float], list[float]]:
    """Medians of three alternated runs of one task by each clone, and the medians of the port
    probe's seconds each reported (0 where it did not run)."""
    took: dict[Path, list[float]] = {root: [] for root in roots}
    probe: dict[Path, list[float]] = {root: [] for root in roots}
    for _ in range(3):
        for root in roots:
            seconds, doc = fab(*args, root=root)
            took[root].append(seconds)
            probe[root].append(float(doc.get("seconds_port_probe", 0) or 0))  # type: ignore[arg-type]
    median = statistics.median
    return [median(took[r]) for r in roots], [median(probe[r]) for r in roots]


def main() -> None:
    inventory = Path("/tmp/overlaylab-bench.yaml")
    if os.environ.get("OVERLAYLAB_BENCH_ONLY") == "ha":
        ha_rows(inventory)
        lifecycle.down(NAME, steps=Quiet())
        return
    if os.environ.get("OVERLAYLAB_BENCH_BEFORE"):
        before_after(inventory, os.environ["OVERLAYLAB_BENCH_BEFORE"].split(","))
        lifecycle.down(NAME, steps=Quiet())
        return
    print(
        f"{'hosts':>5}  {'floor':>7}  {'tuned':>7}  {'bootstrap':>9}  {'/floor':>6}  {'/tuned':>6}  {'no-op':>6}  "
        f"{'1-7':>6}  {'verify':>6}  {'cmds/host':>9}  {'fab verify':>10}  {'by hand':>7}  {'/hand':>5}"
    )
    phases = {}
    counts = [int(n) for n in os.environ.get("OVERLAYLAB_BENCH_HOSTS", "3,12,24").split(",")]
    refused = {}
    repeats: dict[int, tuple[int, int]] = {}
    scale: dict[int, tuple[float, float, float, float, float]] = {}  # lab-up, bootstrap, no-op, verify, MiB
    for count in counts:
        bottom, again_plain = floor(count, inventory)
        tuned, again_tuned = floor(count, inventory, tuned=True)
        repeats[count] = (again_plain, again_tuned)
        up = fresh_lab(count, inventory)
        refused[count] = refusal(count, inventory)
        first, boot = fab("bootstrap-cluster", "--inventory", str(inventory))
        phases[count] = {**boot["step_seconds"], "port probe": boot.get("seconds_port_probe", 0)}
        noop, again = fab("bootstrap-cluster", "--inventory", str(inventory))
        cmds = again["remote_commands"]
        assert isinstance(cmds, dict)
        per_host = max(cmds.values())
        alone, _ = fab("verify", "--inventory", str(inventory))
        by_hand = verify_floor(count)
        scale[count] = (up, first, noop, alone, lab_memory_mib())
        print(
            f"{count:>5}  {bottom:>6.1f}s  {tuned:>6.1f}s  {first:>8.1f}s  {first / bottom:>6.2f}  {first / tuned:>6.2f}  "
            f"{noop:>5.1f}s  {again['seconds_to_verify']:>5}s  {again['seconds_verify']:>5}s  {per_host:>9}  "
            f"{alone:>9.1f}s  {by_hand:>6.1f}s  {alone / by_hand:>5.2f}",
            flush=True,
        )
    print("the floor's runs thrown away for a split overlay (its workers restart at once), plain / tuned:")
    for count, (plain, tuned_again) in repeats.items():
        print(f"{count:>5}  {plain} / {tuned_again}", flush=True)
    print(
        f"{'hosts':>5}  {'lab-up':>7}  {'bootstrap':>9}  {'no-op':>6}  {'verify':>6}  {'lab MiB':>8}  (each / {counts[0]} hosts)"
    )
    base = scale[counts[0]]
    for count, row in scale.items():
        growth = "  ".join(f"{v / b:.2f}x" for v, b in zip(row, base, strict=True))
        print(
            f"{count:>5}  {row[0]:>6.1f}s  {row[1]:>8.1f}s  {row[2]:>5.1f}s  {row[3]:>5.1f}s  {row[4]:>8.0f}  ({growth})",
            flush=True,
        )
    print("a healthy preflight (SSH, facts and the checks from them; then the port probe between the hosts):")
    for count, steps in phases.items():
        print(f"{count:>5}  {steps['preflight']:.1f}s + port probe {steps['port probe']:.1f}s", flush=True)
    print("a blocked udp/4789 refused by the port probe, against a dry run on the same lab:")
    for count, (took, dry) in refused.items():
        print(f"{count:>5}  refused in {took:.1f}s, dry run {dry:.1f}s: {took / dry:.2f}x", flush=True)
    print("bootstrap phases (seconds each step took, from the run's start to its last line):")
    for count, steps in phases.items():
        marks = sorted(((k, v) for k, v in steps.items() if k != "port probe"), key=lambda kv: kv[1])
        parts, last = [], 0.0
        for step, at in marks:
            parts.append(f"{'facts+' if not parts else ''}{step} {at - last:.1f}")
            last = at
        print(f"{count:>5}  " + ", ".join(parts), flush=True)
    if os.environ.get("OVERLAYLAB_BENCH_ONLY") == "bootstrap":  # the rows above alone
        lifecycle.down(NAME, steps=Quiet())
        return
    print(f"{'mode':>5}  {'engine':>6}  {'bootstrap':>9}  {'re-run 1-7':>10}  {'verify':>6}")
    for mode, engine in (("kv", "legacy"), ("swarm", "modern"), ("swarm", "legacy")):
        fresh_lab(3, inventory, engine, mode)
        first, _ = fab("bootstrap-cluster", "--inventory", str(inventory))
        _, again = fab("bootstrap-cluster", "--inventory", str(inventory))
        print(
            f"{mode:>5}  {engine:>6}  {first:>8.1f}s  {again['seconds_to_verify']:>9}s  {again['seconds_verify']:>5}s",
            flush=True,
        )
    ha_rows(inventory)
    lifecycle.down(NAME, steps=Quiet())


if __name__ == "__main__":
    main()
