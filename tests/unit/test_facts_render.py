"""Unit tests (no hosts): facts parsed from recorded output of real lab hosts, the
drop-in rendered against golden files, and the preflight judgements."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from overlaylab import facts, render
from overlaylab.checks import preflight
from overlaylab.cluster import Node
from overlaylab.inventory import Host, Inventory
from overlaylab.steps import swarm

DATA = Path(__file__).parent / "data"
GOLDEN = Path(__file__).parent / "golden"
DEBIAN_EXEC = "/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS"


def recorded(name: str) -> facts.HostFacts:
    return facts.parse((DATA / name).read_text(), "eth1")


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_facts_of_a_bootstrapped_worker() -> None:
    f = recorded("facts-worker-kv.txt")
    assert f.hostname == "bm-docker-02" and f.docker_active == "active" and f.docker_pid > 0
    assert f.version == "20.10.5+dfsg1" and f.version_tuple == (20, 10, 5)
    assert f.cluster_store == "consul://10.210.1.11:8500" and f.cluster_advertise == "10.210.1.12:2376"
    assert f.advertise_ips == ["10.210.1.12"]
    assert f.consul_backend and f.gossip and f.swarm_state == "inactive"
    assert render.is_ours(f.dropin) and f.dropin is not None and f.dropin.endswith("\n")
    assert f.backup == ["10-machine.conf.absent"]
    assert f.daemon_json is not None and "bip" in f.daemon_json
    assert f.network is not None and f.network["Scope"] == "global"
    assert f.consul is None  # only read on the manager


def test_facts_of_the_manager_include_consul() -> None:
    f = recorded("facts-manager-kv.txt")
    assert f.consul is not None and f.consul["Config"]["Labels"]["overlaylab.role"] == "consul"
    assert f.containers.get("overlaylab-consul") == "consul" and f.foreign_containers == []
    assert f.overlays == ["ov_net1"]


def test_missing_sections_parse_to_empty_facts() -> None:
    f = facts.parse("@@overlaylab:hostname\nh\n@@overlaylab:end\n", "eth1")
    assert f.hostname == "h" and f.version == "" and f.dropin is None and f.exec_start is None


def test_verify_reads_only_the_sections_it_needs_and_every_one_of_them_exists() -> None:
    full = facts.script("eth1", None, "ov_net1")
    named = set(re.findall(r"echo '@@overlaylab:(\w+)'", full))
    assert set(facts.VERIFY_SECTIONS) <= named  # a renamed section would leave verify blind
    only = facts.script("eth1", None, "ov_net1", only=facts.VERIFY_SECTIONS)
    assert set(re.findall(r"echo '@@overlaylab:(\w+)'", only)) == {*facts.VERIFY_SECTIONS, "end"}
    assert "docker info" not in only and "docker network inspect" in only


def test_effective_exec_start_follows_systemd_override_rules() -> None:
    unit = (
        "# /lib/systemd/system/docker.service\n[Service]\nExecStart=/usr/bin/dockerd -H fd://\n"
        "# /etc/systemd/system/docker.service.d/10-machine.conf\n[Service]\nExecStart=\n"
        "ExecStart=/usr/bin/dockerd \\\n  -H fd:// --label a=b\n"
        "# /etc/systemd/system/docker.service.d/20-env.conf\n[Service]\nEnvironment=X=1\n"
    )
    assert facts.exec_start(unit) == "/usr/bin/dockerd    -H fd:// --label a=b"
    assert facts.exec_start(unit.replace("ExecStart=/usr/bin/dockerd \\\n  -H fd:// --label a=b\n", "")) is None


def test_base_command_drops_earlier_cluster_flags_in_both_spellings() -> None:
    current = DEBIAN_EXEC + " --cluster-store consul://1.2.3.4:8500 --cluster-advertise=eth0:2376 --label x=1"
    assert render.base_command(current, None) == [*render.split(DEBIAN_EXEC), "--label", "x=1"]


def test_base_command_comes_from_our_drop_in_once_it_is_there() -> None:
    first = render.render("lab", render.split(DEBIAN_EXEC), ["/usr/sbin/dockerd", "--cluster-store=x"], "/b")
    # what systemd runs now is our line; the base recorded in the file wins
    assert render.base_command("/usr/sbin/dockerd --cluster-store=x --label old=1", first) == render.split(DEBIAN_EXEC)


def test_rendered_drop_in_for_debian_engine_matches_golden() -> None:
    base = render.base_command(DEBIAN_EXEC, None)
    argv = render.cluster_argv(base, "10.210.1.11", 8500, "eth1", ())
    golden("10-machine.conf.debian", render.render("lab", base, argv, "/var/lib/overlaylab/backup"))


def test_rendered_drop_in_keeps_docker_machine_tls_flags_and_adds_extra_flags() -> None:
    machine = (
        "/usr/bin/dockerd -H tcp://0.0.0.0:2376 -H unix:///var/run/docker.sock --storage-driver overlay2 "
        "--tlsverify --tlscacert /etc/docker/ca.pem --tlscert /etc/docker/server.pem "
        '--tlskey /etc/docker/server-key.pem --label provider=generic --label "team=net ops" '
        "--cluster-store=consul://old:8500 --cluster-advertise=eth0:2376"
    )
    base = render.base_command(machine, "[Service]\nExecStart=\nExecStart=" + machine + "\n")
    assert render.insecure_tcp(base) is None  # TLS verified: allowed
    argv = render.cluster_argv(base, "192.168.2.55", 8501, "eth1", ("--log-level=warn",))
    text = render.render("prod", base, argv, "/var/lib/overlaylab/backup")
    golden("10-machine.conf.docker-machine", text)
    assert "consul://old" not in text.split("# overlaylab-base:")[1]
    assert '"team=net ops"' in text


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        (["dockerd", "-H", "tcp://0.0.0.0:2375"], "tcp://0.0.0.0:2375"),
        (["dockerd", "--host=tcp://0.0.0.0:2375"], "tcp://0.0.0.0:2375"),
        (["dockerd", "-Htcp://1.2.3.4:2375"], "tcp://1.2.3.4:2375"),
        (["dockerd", "-H", "fd://"], None),
        (["dockerd", "-H", "tcp://0.0.0.0:2376", "--tlsverify"], None),
    ],
)
def test_an_unauthenticated_tcp_socket_is_found(argv: list[str], found: str | None) -> None:
    assert render.insecure_tcp(argv) == found


def test_systemd_quoting_round_trips() -> None:
    args = ["/usr/bin/dockerd", "--label", "a b", 'q"uote', "$DOCKER_OPTS", "back\\slash"]
    line = " ".join(render.systemd_quote(a) for a in args)
    assert render.split(line) == args


class FakeConn:
    """Stands in for a fabric Connection where a step only reads facts."""

    host = "fake"


def node(name: str, f: facts.HostFacts, role: str = "worker") -> Node:
    return Node(Host(name, f"{name}.example", role, "eth1"), FakeConn(), f)


def inv(*hosts: Host) -> Inventory:
    return Inventory(path=Path("inv.yaml"), cluster="t", hosts=hosts)


def test_preflight_accepts_the_recorded_bullseye_hosts() -> None:
    nodes = [node("a", recorded("facts-manager-kv.txt"), "manager"), node("b", recorded("facts-worker-kv.txt"))]
    assert preflight.check(inv(*(n.host for n in nodes)), nodes) == {}


def with_info(f: facts.HostFacts, **info: Any) -> facts.HostFacts:
    f.info = {**f.info, **info}
    return f


def patched(f: facts.HostFacts, **attrs: Any) -> facts.HostFacts:
    for key, value in attrs.items():
        setattr(f, key, value)
    return f


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: with_info(f, ServerVersion="26.1.5+dfsg1"), "Docker 26.1.5\\+dfsg1 has no --cluster-store"),
        (lambda f: patched(f, consul_backend=False), "built without the Consul cluster store"),
        (lambda f: patched(f, docker_active="inactive"), "docker.service is inactive"),
        (lambda f: patched(f, advertise_ips=[]), "advertise 'eth1': no such interface"),
        (lambda f: patched(f, daemon_json={"cluster-store": "x"}), "daemon.json sets cluster-store"),
        (
            lambda f: patched(f, dropin=None, exec_start="/usr/bin/dockerd -H tcp://0.0.0.0:2375"),
            "without --tlsverify",
        ),
    ],
)
def test_preflight_refusals_name_the_host_and_the_reason(change: Any, message: str) -> None:
    good = node("a", recorded("facts-manager-kv.txt"), "manager")
    bad = node("b", change(recorded("facts-worker-kv.txt")))
    problems = preflight.check(inv(good.host, bad.host), [good, bad])
    assert list(problems) == ["b"]
    assert any(re.search(message, p) for p in problems["b"]), problems


def test_preflight_refuses_duplicate_hostnames_and_advertise_addresses() -> None:
    a = node("a", recorded("facts-manager-kv.txt"), "manager")
    b = node("b", recorded("facts-worker-kv.txt"))
    b.facts.hostname = a.facts.hostname
    b.facts.advertise_ips = list(a.facts.advertise_ips)
    problems = preflight.check(inv(a.host, b.host), [a, b])
    assert set(problems) == {"a", "b"}
    assert any("is also the hostname of b" in p for p in problems["a"])
    assert any("advertise address 10.210.1.11 is shared with a" in p for p in problems["b"])


def test_a_swarm_manager_with_services_is_not_left_silently() -> None:
    f = with_info(recorded("facts-worker-kv.txt"), Swarm={"LocalNodeState": "active", "ControlAvailable": True})
    f.services = 2
    n = node("a", f)
    assert swarm.needed(n)
    assert "2 service(s)" in (swarm.refusal(n, force=False) or "")
    assert swarm.refusal(n, force=True) is None


def _fake_daemon(root: Path, threads: dict[str, str], between: str = "true") -> str:
    """A fake /proc and /run/docker/netns: PID 1 in the host namespace, one live sandbox."""
    sandboxes = root / "netns"
    sandboxes.mkdir()
    live = sandboxes / "1-abcdef"
    live.touch()
    names = {"host": "net:[4026531840]", "sandbox": f"net:[{live.stat().st_ino}]", "dead": "net:[4026539999]"}
    (root / "proc/1/ns").mkdir(parents=True)
    (root / "proc/1/ns/net").symlink_to(names["host"])
    for tid, where in threads.items():
        (root / f"proc/42/task/{tid}/ns").mkdir(parents=True)
        (root / f"proc/42/task/{tid}/ns/net").symlink_to(names[where])
    return facts.stray_threads_script(proc=str(root / "proc"), netns_dir=str(sandboxes), pid="42", between=between)


@pytest.mark.parametrize(
    ("threads", "stray"),
    [
        # The CI false alarm: Go ran watchMiss on the main thread, so the main thread sits in the sandbox.
        ({"42": "sandbox", "43": "host", "44": "host", "45": "host"}, 0),
        ({"42": "host", "43": "sandbox", "44": "host"}, 0),
        ({"42": "host", "43": "sandbox", "44": "dead", "45": "dead"}, 2),
        ({"42": "sandbox", "43": "dead", "44": "host"}, 1),
        # No thread in the host's namespace: a daemon this check does not model.
        ({"42": "sandbox", "43": "dead"}, 0),
    ],
)
def test_stray_threads_are_counted_against_the_hosts_namespace(
    tmp_path: Path, threads: dict[str, str], stray: int
) -> None:
    """Runs the real facts snippet under sh, as sudo does, against a fake /proc (a unit test: no dockerd)."""
    out = subprocess.run(["sh", "-c", _fake_daemon(tmp_path, threads)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(stray)


def test_the_packaged_templates_are_the_checkouts_templates() -> None:
    """The package's templates/ is a link here and a copy in a wheel (pyproject package-data)."""
    top = Path(__file__).resolve().parents[2] / "templates" / "10-machine.conf.j2"
    assert (render.TEMPLATES / "10-machine.conf.j2").resolve() == top


def test_a_thread_stray_only_for_a_moment_is_not_counted(tmp_path: Path) -> None:
    """Thread 44 is tearing down a container's namespace at the first look and back home at the second."""
    host = "net:[4026531840]"
    back_home = f"ln -sfn '{host}' {tmp_path}/proc/42/task/44/ns/net"
    threads = {"42": "host", "43": "dead", "44": "dead"}
    script = _fake_daemon(tmp_path, threads, between=back_home)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"  # 43 is still stray, 44 is not


def test_attached_containers_are_parsed_with_their_endpoint_records_and_the_short_id_alias_dropped() -> None:
    """Recorded on a lab host after Consul's data was lost and its dockerd restarted."""
    old = "e14372a7efda037923c488104b73cb6741ff469eea3a983f792e7c8b85090d26"
    text = (
        f"/users_app2\td1d6e8405e0cc5683e18d418814c9aed1d38076aff5d6b84d75bfe4f9fbb8dd4\tfalse\t{old}\t"
        f"d1d6e8405e0c,web,\t10.217.9.40\tnetwork {old} not found\n"
        f"/overlaylab-anchor-bm-docker-02\ta45efcd75197f90d0b3d6d79054e1d5bc5fa21c3d7077298e76d045d0a59baae\ttrue\t{old}\t"
        "a45efcd75197,\t\t\n"
        "/elsewhere\t0000\ttrue\t\t\t\t\n"  # inspected, but not on the network by that name
    )
    parsed = facts.parse_attached(text)
    assert set(parsed) == {"users_app2", "overlaylab-anchor-bm-docker-02"}
    user = parsed["users_app2"]
    assert (user.network_id, user.running, user.aliases, user.ip) == (old, False, ("web",), "10.217.9.40")
    assert user.failed_on(old) and not parsed["overlaylab-anchor-bm-docker-02"].failed_on(old)
    assert parsed["overlaylab-anchor-bm-docker-02"].running


STACKS = """goroutine 1 [chan receive, 3 minutes]:
main.main()
\t/go/src/github.com/docker/docker/cmd/dockerd/docker.go:97 +0x185

goroutine 93 [select, 2 minutes]:
github.com/docker/docker/pkg/discovery/kv.(*Discovery).watchOnce(0xc0002265a0, 0xc00090c300)
\t/go/src/github.com/docker/docker/pkg/discovery/kv/kv.go:120 +0x11a

goroutine 411 [{state}]:
github.com/docker/libnetwork/datastore.(*datastore).Watch.func1(0xc000a2a580, 0xc001002a80)
\t/go/src/github.com/docker/libnetwork/datastore/datastore.go:340 +0x2b1
created by github.com/docker/libnetwork/datastore.(*datastore).Watch
"""


@pytest.mark.parametrize(
    ("state", "count"),
    [("select", 0), ("select, 1 minutes", 0), ("chan receive", 1), ("chan receive, 4 minutes", 1), ("chan send", 0)],
)
def test_a_store_watch_waiting_to_be_started_again_counts_as_stopped(tmp_path: Path, state: str, count: int) -> None:
    """Recorded goroutine stacks of dockerd 20.10 (the lab's, shortened), read by the facts'
    awk: a watch in a channel receive waits for RestartWatch; in its select it runs."""
    dump = tmp_path / "goroutine-stacks.log"
    dump.write_text(STACKS.replace("{state}", state))
    out = subprocess.run(["awk", facts.DEAD_WATCH_AWK, str(dump)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(count)
    parsed = facts.parse(f"{facts.MARK}dead_watches\n{out.stdout}{facts.MARK}end\n", "eth1")
    assert parsed.dead_watches == count


@pytest.mark.parametrize(
    ("section", "count"),
    [("0\n", 0), ("2\n", 2), ("unknown\n", None), ("\n", None), ("goroutine 1\n", None), (None, 0)],
    ids=["none stopped", "two stopped", "no dump in time", "empty", "garbled", "not asked"],
)
def test_a_stack_dump_that_did_not_come_is_unknown_not_none_stopped(section: str | None, count: int | None) -> None:
    """The facts' dead_watches section: a count, or unknown (None) when dockerd gave no stack
    dump in time or the answer is empty or not a number; 0 only when the section was not
    asked (a task that reads a few sections)."""
    text = "" if section is None else f"{facts.MARK}dead_watches\n{section}"
    parsed = facts.parse(f"{facts.MARK}hostname\nh\n{text}{facts.MARK}end\n", "eth1")
    assert parsed.dead_watches == count


def dead_watches_of(tmp_path: Path, body: str, *args: str) -> str:
    """dead_watches_script run for real (bash) against a process of the test's own in the
    role of dockerd: ``body`` is its bash, ``args`` its command line."""
    proc = subprocess.Popen(["bash", "-c", body, *args], cwd=tmp_path)
    try:
        time.sleep(0.2)  # its trap is set
        script = facts.dead_watches_script(pid=str(proc.pid), stacks=str(tmp_path), wait=0.5)
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10).stdout.strip()
    finally:
        proc.kill()
        proc.wait()


def test_the_stack_dump_script_counts_a_dump_says_unknown_without_one_and_0_without_a_store(tmp_path: Path) -> None:
    """Real processes and signals: one that writes a stack dump on SIGUSR1 (recorded stacks,
    one watch stopped), one that ignores SIGUSR1 (no dump: "unknown", not 0), and one
    without --cluster-store= on its command line (0, nothing to read); the dump is removed."""
    (tmp_path / "stacks.txt").write_text(STACKS.replace("{state}", "chan receive"))
    dumps = "trap 'cp stacks.txt goroutine-stacks-2026.log' USR1; while :; do sleep 0.1; done"
    assert dead_watches_of(tmp_path, dumps, "dockerd", "--cluster-store=consul://x") == "1"
    assert not list(tmp_path.glob("goroutine-stacks-*"))
    assert (
        dead_watches_of(tmp_path, "trap '' USR1; while :; do sleep 0.1; done", "dockerd", "--cluster-store=consul://x")
        == "unknown"
    )
    assert dead_watches_of(tmp_path, dumps, "dockerd") == "0"


def test_a_host_whose_ping_is_not_iputils_is_refused_naming_the_package() -> None:
    """verify's full-size check needs `ping -M do`: busybox's ping (or none) is named in the preflight."""
    from overlaylab.checks.preflight import ping_problem

    assert ping_problem(facts.HostFacts(host_ping="ping from iputils s20210202")) is None
    assert ping_problem(facts.HostFacts()) is None  # not read (facts recorded before the section)
    for said in ("ping: unrecognized option: V", "sh: 1: ping: not found"):
        problem = ping_problem(facts.HostFacts(host_ping=said))
        assert problem is not None and said in problem and "install iputils-ping" in problem
