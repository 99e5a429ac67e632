"""End to end, real components: modern-engine hosts (trixie, Docker 26.x), the lab's network
misbehaving on demand between them (`fab lab-impair`: each impairment proven by its effect,
measured from the hosts, and never seen inside them), the lab's ssh_config, and a mixed lab."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from overlaylab.lab import hosts, keys, lifecycle
from overlaylab.lab import impair as impair_module
from overlaylab.lab.spec import build_spec
from tests.e2e.clusterlab import FAB, ROOT
from tests.e2e.labtools import E2E_RANGE, outer, require_lab, sh, ssh

NAME = "e2emod"


@pytest.fixture(scope="module")
def modern_lab() -> Iterator[lifecycle.UpResult]:
    require_lab()
    lifecycle.down(NAME)
    yield lifecycle.up(NAME, count=2, engine_opt="modern", addr_range=E2E_RANGE)
    lifecycle.down(NAME)


def test_modern_hosts_run_docker_26(modern_lab: lifecycle.UpResult) -> None:
    spec = build_spec(NAME, "modern", 2, addr_range=E2E_RANGE)
    for host in spec.hosts:
        conn = ssh(spec, host)
        assert sh(conn, "systemctl is-system-running", sudo=False) == "running"
        assert sh(conn, "docker version --format '{{.Server.Version}}'").startswith("26.")
        assert sh(conn, "docker run --rm busybox echo ok") == "ok"
        conn.close()


def lab_task(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def impair(*args: str) -> dict[str, Any]:
    code, out, err = lab_task("lab-impair", "--name", NAME, *args, "--json")
    assert code == 0, err
    return dict(json.loads(out))


SPEC = build_spec(NAME, "modern", 2, addr_range=E2E_RANGE)
A, B = SPEC.hosts
INSIDE = (  # what a host sees of its network: its rules (less their packet counters), links and queues
    "iptables-save 2>/dev/null | grep -v '^#' | sed 's/ \\[[0-9]*:[0-9]*\\]$//'; "
    "nft list ruleset 2>/dev/null | sed 's/packets [0-9]* bytes [0-9]*//'; "
    "ip -br link; tc qdisc show"
)


def on(host: Any, command: str) -> str:
    conn = ssh(SPEC, host)
    try:
        return sh(conn, command)
    finally:
        conn.close()


def test_the_lab_ssh_config_takes_the_systems_ssh_to_a_host_by_its_name(modern_lab: lifecycle.UpResult) -> None:
    config = keys.state_dir(NAME) / "ssh_config"
    found = subprocess.run(["ssh", "-F", str(config), "bm-docker-02", "hostname"], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "bm-docker-02", found.stderr
    # host keys checked strictly: the same config with another host's key for bm-docker-02 is refused
    wrong = keys.state_dir(NAME) / "known_hosts.wrong"
    lines = (keys.state_dir(NAME) / "known_hosts").read_text().splitlines()
    mine = next(line for line in lines if line.startswith(f"{SPEC.hosts[1].mgmt_ip} "))
    other = next(line for line in lines if line.startswith(f"{SPEC.hosts[0].mgmt_ip} "))
    wrong.write_text(mine.split()[0] + " " + " ".join(other.split()[1:]) + "\n")
    strict = config.with_name("ssh_config.wrong")
    strict.write_text(config.read_text().replace(str(keys.state_dir(NAME) / "known_hosts"), str(wrong)))
    try:
        refused = subprocess.run(["ssh", "-F", str(strict), "bm-docker-02", "hostname"], capture_output=True, text=True)
    finally:
        wrong.unlink()
        strict.unlink()
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr, refused.stderr
    assert lab_task("lab-ssh", "--name", NAME, "--node", "bm-docker-01", "--command", "exit 3")[0] == 3
    code, _, err = lab_task("lab-ssh", "--name", NAME, "--node", "bm-docker-09", "--command", "true")
    assert code == 2 and "no host 'bm-docker-09'" in err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--node", "bm-docker-09", "--loss", "10"], "no host 'bm-docker-09'"),
        (["--node", "bm-docker-01", "--peer", "bm-docker-01", "--loss", "10"], "is the node itself"),
        (["--node", "bm-docker-01", "--loss", "150"], "loss: '150'"),
        (["--node", "bm-docker-01", "--mtu", "40"], "mtu: '40' must be 68 to 9000"),
        (["--node", "bm-docker-01", "--rate", "fast"], "rate: 'fast' is not a rate"),
        (["--node", "bm-docker-01", "--block", "sctp/9"], "block: 'sctp/9' is not PROTO/PORT"),
        (["--node", "bm-docker-01", "--delay", "100"], "CONFIG_NET_SCH_NETEM is not set"),
        (["--name", "nolab", "--node", "bm-docker-01", "--loss", "10"], "no lab 'nolab'"),
        (["--show", "--loss", "10"], "--loss cannot go with --show, --reset or --from"),
        (["--show", "--node", "bm-docker-01"], "--node with --show or --from says nothing"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(reset_after: None, args: list[str], said: str) -> None:
    if "--delay" in args and impair_module.netem_missing() is None:
        pytest.fail("this kernel has netem: the delay's refusal is not what to test here")
    impair("--node", "bm-docker-02", "--rate", "10mbit")  # in force before: a table and a queue to keep
    before = table_text(), queue("bm-docker-02")
    assert "rate|10mbit" in before[0] and "htb" in before[1], before
    argv = ["lab-impair", *(["--name", NAME] if "--name" not in args else []), *args]
    code, _, err = lab_task(*argv)
    assert code == 2 and said in err, err
    assert (table_text(), queue("bm-docker-02")) == before


def table_text() -> str:
    """The lab's nft table as the kernel lists it, rule handles included, less its counters."""
    shown = subprocess.run(["nft", "-a", "list", "table", "bridge", f"olab_{NAME}"], capture_output=True, text=True)
    return re.sub(r"packets \d+ bytes \d+", "", shown.stdout)


def ports() -> dict[str, str]:
    """Each host's port on the lab's cluster bridge, read from the running lab."""
    return hosts.cluster_ports(outer(), SPEC)


def queue(host: str) -> str:
    """The queues on a host's bridge port, less their packet counter: a queue made again has new handles."""
    port = ports()[host]
    shown = subprocess.run(["tc", "qdisc", "show", "dev", port], capture_output=True, text=True, check=True).stdout
    return re.sub(r"direct_packets_stat \d+", "", shown)


def test_a_file_of_impairments_is_applied_whole_or_refused_naming_its_line_and_field(
    reset_after: None, tmp_path: Any
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"- {{node: {A.name}, loss: 10}}\n- node: {B.name}\n  mtu: 99999\n")
    code, _, err = lab_task("lab-impair", "--name", NAME, "--from", str(bad))
    assert code == 2 and f"{bad}:3: [1]: mtu: '99999' must be 68 to 9000" in err, err
    assert impair_module.in_force(NAME) == []  # the first entry, valid, was not made either
    good = tmp_path / "good.yaml"
    good.write_text(
        f"- {{node: {A.name}, peer: {B.name}, block: tcp/2375, direction: in}}\n- {{node: {B.name}, partition: true}}\n"
    )
    made = impair("--from", str(good))
    assert made["impairments"] == [
        f"{A.name} <-> {B.name}: tcp/2375 blocked (into {A.name})",
        f"{B.name} <-> every other host: partitioned",
    ]
    assert pings(A, B, 84) == 0  # the partition, by its effect
    assert impair("--from", str(good))["impairments"] == made["impairments"]  # again: nothing new


def pings(src: Any, dst: Any, size: int, count: int = 3, dont_fragment: bool = False) -> int:
    """How many of ``count`` pings of IP total length ``size`` came back, host to host."""
    flag = "-M do " if dont_fragment else ""
    out = on(src, f"ping {flag}-c {count} -i 0.01 -W 1 -q -s {size - 28} {dst.cluster_ip} 2>&1; true")
    match = re.search(r"(\d+) received", out)
    assert match, out
    return int(match[1])


SINK = (  # perl-base is on every Debian host; systemd-socket-activate --inetd of trixie's systemd 257 hands its
    # command a socket that is not connected ("Transport endpoint is not connected")
    "use IO::Socket::INET; $s = IO::Socket::INET->new(LocalAddr => shift, Listen => 1, ReuseAddr => 1) or die $!; "
    '$c = $s->accept; system("date +%s%N > /tmp/olab-sink.start"); $n = 0; '
    "$n += $r while ($r = sysread($c, $b, 65536)) > 0; "
    'system("echo $n \\$(date +%s%N) > /tmp/olab-sink.end")\n'
)


def transfer_seconds(src: Any, dst: Any, megabytes: int = 5) -> float:
    """A TCP stream of ``megabytes`` from src to dst's cluster address, timed by the receiver
    from its connection to the last byte (the sender's own clock would stop while megabytes
    still wait in queues). The receiver is a one-connection perl sink, a transient unit."""
    port = 5599
    on(dst, f"rm -f /tmp/olab-sink.*; printf %s {shlex.quote(SINK)} > /tmp/olab-sink.pl; "
            f"systemd-run -q --unit olab-sink --collect perl /tmp/olab-sink.pl {dst.cluster_ip}:{port}; "
            f"for i in $(seq 100); do ss -Hltn 'sport = :{port}' | grep -q . && break; sleep 0.1; done")  # fmt: skip
    try:
        on(
            src,
            f"head -c {megabytes * 1000000} /dev/zero | timeout 120 bash -c 'cat > /dev/tcp/{dst.cluster_ip}/{port}'",
        )
        got = on(dst, "for i in $(seq 300); do [ -s /tmp/olab-sink.end ] && break; sleep 0.1; done; "
                      "echo $(cat /tmp/olab-sink.start) $(cat /tmp/olab-sink.end)")  # fmt: skip
        start, count, end = got.split()
        assert count == str(megabytes * 1000000), got
        return (int(end) - int(start)) / 1e9
    finally:
        on(dst, "systemctl stop olab-sink 2>/dev/null; rm -f /tmp/olab-sink.*; true")


@pytest.fixture
def reset_after(modern_lab: lifecycle.UpResult) -> Iterator[None]:
    """Each impairment test leaves the lab as it found it, failed or not: the next one measures
    a clean network."""
    yield
    lab_task("lab-impair", "--name", NAME, "--reset")


def test_loss_mtu_and_rate_made_between_the_hosts_show_in_what_they_measure_and_not_inside(
    reset_after: None,
) -> None:
    inside = {h.name: on(h, INSIDE) for h in (A, B)}
    impair("--node", A.name, "--peer", B.name, "--loss", "30")
    lost = 300 - pings(A, B, 84, count=300)
    impair("--reset")
    # each way 30 %: a round trip is lost 1 - 0.7^2 = 51 % of the time; 4 standard deviations either side
    assert 0.51 * 300 - 35 <= lost <= 0.51 * 300 + 35, f"{lost} of 300 lost"
    impair("--node", A.name, "--peer", B.name, "--rate", "10mbit")
    limited = transfer_seconds(A, B)  # before the MTU's black hole, which stalls full-size TCP segments
    impair("--node", A.name, "--peer", B.name, "--mtu", "1400")
    fits, over = pings(A, B, 1400, dont_fragment=True), pings(A, B, 1401, dont_fragment=True)
    assert (fits, over) == (3, 0), (fits, over)
    assert {h.name: on(h, INSIDE) for h in (A, B)} == inside, "an impairment shows inside a host"
    impair("--reset")
    free = transfer_seconds(A, B)
    print(f"5 MB: {limited:.2f}s at 10mbit, {free:.2f}s once reset")
    # 5 MB at 10 Mbit/s take 4 s at the least: the rate's effect; once reset, the same stream
    # in the same run is free of it (a ratio, so a loaded machine slows both alike)
    assert limited >= 3.5, f"5 MB in {limited:.1f}s at 10mbit"
    assert free < limited / 2, f"5 MB in {free:.1f}s after --reset, {limited:.1f}s at 10mbit: the queue stayed"


def test_an_impairment_outlives_its_hosts_reboot_and_reset_removes_it(reset_after: None) -> None:
    # the rate on A's stream to B (a queue on B's port, which B's reboot makes anew); the MTU's
    # black hole toward A alone, so that a DF ping's reply drops and A's stream still flows
    impair("--node", A.name, "--peer", B.name, "--rate", "10mbit", "--direction", "out")
    made = impair("--node", A.name, "--peer", B.name, "--mtu", "1400", "--direction", "in")
    assert made["impairments"] == [
        f"{A.name} <-> {B.name}: rate 10mbit (out of {A.name})",
        f"{A.name} <-> {B.name}: packets over 1400 bytes dropped (into {A.name})",
    ]
    lifecycle.reboot(NAME, B.name)
    assert pings(A, B, 1401, dont_fragment=True) == 0 and pings(A, B, 1400, dont_fragment=True) == 3
    limited = transfer_seconds(A, B)
    assert limited >= 3.5, f"5 MB in {limited:.1f}s"  # the rate, on the veth B's reboot made
    code, out, _ = lab_task("lab-status", "--name", NAME, "--json")
    assert code == 0 and json.loads(out)["impairments"] == made["impairments"]
    impair("--node", B.name, "--loss", "5")
    assert len(impair("--show")["impairments"]) == 3
    assert impair("--reset", "--node", B.name)["impairments"] == []  # B's are all three (as node and as peer)
    assert pings(A, B, 1401, dont_fragment=True) == 3
    free = transfer_seconds(A, B)
    assert free < limited / 2, f"{free:.1f}s once reset, {limited:.1f}s at 10mbit"  # B's queue went too


def test_a_mixed_lab_has_each_engine_where_asked(modern_lab: lifecycle.UpResult) -> None:
    before = hosts.observe(outer(), NAME)
    mixed = lifecycle.up(NAME, engine_opt="legacy,modern", addr_range=E2E_RANGE)
    assert list(mixed.replaced) == ["bm-docker-01"] and mixed.unchanged == ["bm-docker-02"]
    after = hosts.observe(outer(), NAME)
    assert after["bm-docker-02"].container_id == before["bm-docker-02"].container_id
    spec = build_spec(NAME, "legacy,modern", addr_range=E2E_RANGE)
    versions = {}
    for host in spec.hosts:
        conn = ssh(spec, host)
        versions[host.name] = sh(conn, "docker version --format '{{.Server.Version}}'")
        conn.close()
    assert versions["bm-docker-01"].startswith("20.10.5") and versions["bm-docker-02"].startswith("26.")


def test_lab_down_removes_every_impairment(modern_lab: lifecycle.UpResult, tmp_path: Any) -> None:
    """Last: a lab taken down leaves no rule of its own (the fixture's lab-down is then a no-op)."""
    listed = tmp_path / "impairments.yaml"
    listed.write_text("- {node: bm-docker-01, partition: true}\n")
    lifecycle.up(NAME, engine_opt="legacy,modern", addr_range=E2E_RANGE, impairments=listed)  # lab-up --impairments
    assert [i.describe() for i in impair_module.in_force(NAME)] == ["bm-docker-01 <-> every other host: partitioned"]
    assert impair("--reset", "--node", "bm-docker-01")["impairments"] == []  # the table stays, empty
    lifecycle.down(NAME)
    assert subprocess.run(["nft", "list", "table", "bridge", f"olab_{NAME}"], capture_output=True).returncode != 0
