"""Prints bootstrap-cluster figures on the lab, for 3, 6 and 12 hosts (OVERLAYLAB_BENCH_HOSTS): from clean;
a blocked port refused, against a dry run on the same lab; a re-run with nothing to change (in all, steps 1-7 and verify apart, remote commands
per host); `fab verify` alone (fresh probes) against the same work by hand; and, as the floor, the tutorial's own commands scripted over plain ssh in
an order that works, with no checks, as it is and tuned (the floor's commands with
the two timing settings overlaylab applies). Ratios are against both, from one run. Figures only: nothing passes or
fails here. Run as root: `make bench`. Uses a lab named "bench" and removes it. Last, HA
Consul's 3 servers against one, at 3 and 5 hosts (OVERLAYLAB_BENCH_HA; OVERLAYLAB_BENCH_ONLY=ha
prints those rows alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from overlaylab.lab import keys, lifecycle
from overlaylab.lab.spec import build_spec
from overlaylab.report import Steps

NAME, RANGE = "bench", "10.212.0.0/16"
ROOT = Path(__file__).resolve().parents[1]
FAB = str(Path(sys.executable).parent / "fab")


class Quiet(Steps):
    def line(self, text: str) -> None:
        pass


def fresh_lab(count: int, inventory: Path, engine: str = "legacy", mode: str = "kv") -> None:
    lifecycle.down(NAME, steps=Quiet())
    lifecycle.up(NAME, count=count, engine_opt=engine, inventory=inventory, addr_range=RANGE, steps=Quiet())
    if mode != "kv":
        inventory.write_text(f"mode: {mode}\n" + inventory.read_text())


def fab(*args: str) -> tuple[float, dict[str, object]]:
    start = time.monotonic()
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), *args, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL
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
    then all removed at once. No facts, no report: the floor for a fresh-probe verify."""
    spec = build_spec(NAME, "legacy", count, addr_range=RANGE)
    ssh = ssh_command()

    def on_all(commands: dict[str, str]) -> dict[str, str]:
        procs = {
            h: subprocess.Popen([*ssh, f"admin@{h}", c], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            for h, c in commands.items()
        }
        out = {h: p.communicate()[0] for h, p in procs.items()}
        assert all(p.returncode == 0 for p in procs.values())
        return out

    fmt = "'{{(index .NetworkSettings.Networks \"ov_net1\").IPAddress}}'"
    start = time.monotonic()
    ips = on_all(
        {
            h.mgmt_ip: f"sudo docker run -d --name vf-{h.name} --network ov_net1 busybox sleep 600 >/dev/null && "
            f"sudo docker inspect -f {fmt} vf-{h.name}"
            for h in spec.hosts
        }
    )
    targets = {h.name: [f"vf-{h.name}", ips[h.mgmt_ip].strip()] for h in spec.hosts}
    loop = "until ping -c 1 -W 1 {0} >/dev/null 2>&1; do sleep 0.5; done &"
    on_all(
        {
            h.mgmt_ip: f"sudo docker exec vf-{h.name} sh -c '"
            + " ".join(loop.format(t) for o in spec.hosts if o is not h for t in targets[o.name])
            + " wait'"
            for h in spec.hosts
        }
    )
    on_all({h.mgmt_ip: f"sudo docker rm -f vf-{h.name} >/dev/null" for h in spec.hosts})
    return time.monotonic() - start


def floor(count: int, tuned: bool = False) -> float:
    """The tutorial by hand, scripted: no facts, no checks, the order that works. ``tuned``:
    the same commands with the two timing settings overlaylab applies (Consul's
    raft_multiplier 1, dockerd's discovery heartbeat 3 s and TTL 20 s): the limit."""
    spec = build_spec(NAME, "legacy", count, addr_range=RANGE)
    ssh = ssh_command()
    manager, ip = spec.hosts[0], spec.hosts[0].cluster_ip

    def on(host: str, command: str) -> None:
        subprocess.run([*ssh, f"admin@{host}", command], check=True, capture_output=True, stdin=subprocess.DEVNULL)

    def parallel(command: str, hosts: list[str]) -> None:
        procs = [
            subprocess.Popen([*ssh, f"admin@{h}", command], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            for h in hosts
        ]
        assert all(p.wait() == 0 for p in procs)

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
    workers = [h.mgmt_ip for h in spec.hosts[1:]]
    start = time.monotonic()
    parallel("sudo docker swarm leave --force 2>/dev/null; true", [h.mgmt_ip for h in spec.hosts])
    on(
        manager.mgmt_ip,
        f"sudo docker run -d --name consul --network host --restart always progrium/consul -server -bootstrap -bind={ip} -advertise={ip} -client={ip}{raft} >/dev/null && {leader}",
    )
    parallel(dropin, [h.mgmt_ip for h in spec.hosts])
    on(manager.mgmt_ip, f"sudo systemctl restart docker && {leader} && {gossip}")
    for worker in workers:  # one at a time: parallel restarts can split gossip (see provision.py)
        on(worker, f"sudo systemctl restart docker && {gossip}")
    on(manager.mgmt_ip, "sudo docker network create -d overlay ov_net1 >/dev/null")
    parallel(
        "sudo docker run -d --name bbox-$(hostname) --network ov_net1 busybox sleep 600 >/dev/null",
        [h.mgmt_ip for h in spec.hosts],
    )
    converge = "end=$(( $(date +%s) + 20 )); until sudo docker exec bbox-{0} ping -c 1 -W 1 bbox-{1} >/dev/null 2>&1; do [ $(date +%s) -ge $end ] && exit 1; sleep 0.5; done"
    for src in spec.hosts:
        for dst in spec.hosts:
            if src is not dst:
                on(src.mgmt_ip, converge.format(src.name, dst.name))
    return time.monotonic() - start


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
    baseline (facts and plan, no probe). Was a test's threshold ("within 10 s"): a figure here."""
    host = build_spec(NAME, "legacy", count, {}, addr_range=RANGE).hosts[-1]
    rule = "INPUT -p udp --dport 4789 -j DROP"
    ssh = [*ssh_command(), f"admin@{host.mgmt_ip}", "sudo", "iptables"]
    subprocess.run([*ssh, "-I", *rule.split()], check=True)
    try:
        dry, _ = fab("bootstrap-cluster", "--dry-run", "--inventory", str(inventory))
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


def main() -> None:
    inventory = Path("/tmp/overlaylab-bench.yaml")
    if os.environ.get("OVERLAYLAB_BENCH_ONLY") == "ha":
        ha_rows(inventory)
        lifecycle.down(NAME, steps=Quiet())
        return
    print(
        f"{'hosts':>5}  {'floor':>7}  {'tuned':>7}  {'bootstrap':>9}  {'/floor':>6}  {'/tuned':>6}  {'no-op':>6}  "
        f"{'1-7':>6}  {'verify':>6}  {'cmds/host':>9}  {'fab verify':>10}  {'by hand':>7}  {'/hand':>5}"
    )
    results = {}
    phases = {}
    counts = [int(n) for n in os.environ.get("OVERLAYLAB_BENCH_HOSTS", "3,6,12").split(",")]
    refused = {}
    for count in counts:
        fresh_lab(count, inventory)
        bottom = floor(count)
        fresh_lab(count, inventory)
        tuned = floor(count, tuned=True)
        fresh_lab(count, inventory)
        refused[count] = refusal(count, inventory)
        first, boot = fab("bootstrap-cluster", "--inventory", str(inventory))
        phases[count] = {**boot["step_seconds"], "port probe": boot.get("seconds_port_probe", 0)}
        noop, again = fab("bootstrap-cluster", "--inventory", str(inventory))
        cmds = again["remote_commands"]
        assert isinstance(cmds, dict)
        per_host = max(cmds.values())
        results[count] = first
        alone, _ = fab("verify", "--inventory", str(inventory))
        by_hand = verify_floor(count)
        print(
            f"{count:>5}  {bottom:>6.1f}s  {tuned:>6.1f}s  {first:>8.1f}s  {first / bottom:>6.2f}  {first / tuned:>6.2f}  "
            f"{noop:>5.1f}s  {again['seconds_to_verify']:>5}s  {again['seconds_verify']:>5}s  {per_host:>9}  "
            f"{alone:>9.1f}s  {by_hand:>6.1f}s  {alone / by_hand:>5.2f}",
            flush=True,
        )
    for count in counts[1:]:
        print(f"{count} hosts / {counts[0]} hosts bootstrap: {results[count] / results[counts[0]]:.2f}x")
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
