"""Unit: the verify step's ping script, run by a real `sh` with a fake `docker` and a fake
`ping` on PATH (no container, no network): one docker exec per host, each target's result
line, its retries inside the window, and that the targets are tried at once rather than
one after another. And, with a fake host, the window verify gives a network of each scope."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from overlaylab.checks.verify import CONVERGE_SECONDS, SWARM_CONVERGE_SECONDS, ping_script, run
from overlaylab.cluster import Node
from overlaylab.inventory import Host

FAKE_DOCKER = """#!/bin/sh
# docker exec PROBE COMMAND...: the command runs here; docker inspect: the probe's PID
case "$1" in
  inspect) echo 4242; exit 0 ;;
esac
echo "exec $2" >> "$LOG"
shift 2
exec "$@"
"""

FAKE_NSENTER = """#!/bin/sh
# nsenter -t PID -n COMMAND...: the command runs here, marked as the host's
[ "$2" = 4242 ] || { echo "nsenter: wrong pid $2"; exit 1; }
shift 3
case "$1" in
  ip) echo "5: eth0@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu ${MTU:-1450} qdisc noqueue state UP"; exit 0 ;;
  ping) shift; HOSTPING=1 exec ping "$@" ;;
esac
exit 1
"""

FAKE_PING = """#!/bin/sh
# ping -c 1 -W 1 TARGET: logs start and end; "late" answers from its 3rd try. The host's
# (HOSTPING, with -M do -s SIZE): "small" targets lose packets over 1400 bytes
for target; do :; done  # the last argument
if [ -n "$HOSTPING" ]; then
  echo "host $*" >> "$LOG"
  case "$target" in
    small*) [ "$4" -gt 1372 ] && { echo "1 packets transmitted, 0 packets received, 100% packet loss"; exit 1; } ;;
  esac
fi
echo "start $target" >> "$LOG"
sleep 0.3
echo "end $target" >> "$LOG"
case "$target" in
  good*|small*) exit 0 ;;
  late*) n=$(grep -c "start $target" "$LOG"); [ "$n" -ge 3 ] && exit 0 ;;
esac
echo "1 packets transmitted, 0 packets received, 100% packet loss"; exit 1
"""


FAKE_WGET = """#!/bin/sh
# wget -q -O - http://NAME/stream: "good" serves the whole MiB, "stall" a part, "late" from its 2nd try
for url; do :; done
echo "wget $url" >> "$LOG"
case "$url" in
  *good*) head -c 1048576 /dev/zero; exit 0 ;;
  *late*) [ "$(grep -c "wget $url" "$LOG")" -ge 2 ] && { head -c 1048576 /dev/zero; exit 0; } ;;
  *stall*) head -c 65536 /dev/zero; exec sleep 30 ;;  # stalls after a part: the real timeout ends it
esac
echo "wget: bad address" >&2
exit 1
"""


def fakes(tmp_path: Path) -> dict[str, str]:
    """The environment in which the fake tools come first on PATH, logging to $LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("docker", FAKE_DOCKER), ("ping", FAKE_PING), ("nsenter", FAKE_NSENTER), ("wget", FAKE_WGET)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path / "log")}


def run_script(tmp_path: Path, targets: list[tuple[str, str, str]], window: int) -> tuple[list[str], list[str]]:
    env = fakes(tmp_path)
    log = tmp_path / "log"
    out = subprocess.run(["sh", "-c", ping_script("probe", targets, window)], capture_output=True, text=True, env=env)
    lines = log.read_text().splitlines()
    assert lines[0] == "exec probe" and lines.count("exec probe") == 1
    return sorted(out.stdout.splitlines()), lines[1:]


def test_each_target_gets_one_line_and_a_late_one_is_retried_within_the_window(tmp_path: Path) -> None:
    targets = [("h2", "ip", "good-1"), ("h2", "name", "late-1"), ("h3", "ip", "dead-1")]
    lines, log = run_script(tmp_path, targets, window=3)
    assert lines == [
        "R h2 ip ok",
        "R h2 name ok",
        "R h3 ip fail 1 packets transmitted, 0 packets received, 100% packet loss",
    ]
    assert log.count("start late-1") == 3 and log.count("start good-1") == 1


def test_the_targets_are_pinged_at_once(tmp_path: Path) -> None:
    targets = [("h2", "ip", "good-1"), ("h2", "name", "good-2"), ("h3", "ip", "good-3")]
    _, log = run_script(tmp_path, targets, window=3)
    first_end = next(i for i, line in enumerate(log) if line.startswith("end "))
    assert sorted(log[:first_end]) == ["start good-1", "start good-2", "start good-3"]


def test_the_full_size_check_pings_from_the_host_with_df_at_the_probes_mtu(tmp_path: Path) -> None:
    """The host's ping, in the probe's namespace, forbids fragmenting at exactly the probe's
    MTU (1450 - 28 bytes of payload); a path that drops packets over 1400 fails it alone."""
    targets = [("h2", "ip", "good-2"), ("h2", "mtu", "small-1"), ("h3", "mtu", "good-3")]
    lines, log = run_script(tmp_path, targets, window=2)
    assert lines == [
        "R h2 ip ok",
        "R h2 mtu fail 1450 1 packets transmitted, 0 packets received, 100% packet loss",
        "R h3 mtu ok 1450",
    ]
    host = [line for line in log if line.startswith("host ")]
    assert host.count("host -M do -s 1422 -c 1 -W 1 good-3") == 1
    assert all(line.startswith("host -M do -s 1422 -c 1 -W 1 ") for line in host)  # the mtu targets alone
    assert not any("good-2" in line for line in host)  # the small ping ran in the probe


def test_a_failed_pair_whose_gossip_works_names_udp_4789() -> None:
    """diagnose(): facts only (each dockerd's last gossip event per peer), no host."""
    from overlaylab.checks.verify import LIKELY_VXLAN, Matrix, diagnose
    from overlaylab.cluster import Node
    from overlaylab.facts import HostFacts
    from overlaylab.inventory import Host
    from tests.unit.test_facts_render import FakeConn

    def node(name: str, alive: list[str]) -> Node:
        return Node(Host(name, name, "worker", "eth1"), FakeConn(), HostFacts(hostname=name, gossip_alive=alive))

    a, b, c = node("a", ["b", "c"]), node("b", ["a", "c"]), node("c", ["b"])  # c last saw a fail
    matrix = Matrix(["a", "b", "c"], set())
    matrix.results = {
        ("a", "b", "ip"): (False, "100% packet loss"),
        ("a", "b", "name"): (False, "100% packet loss"),
        ("a", "c", "ip"): (False, "100% packet loss"),
        ("b", "c", "ip"): (True, ""),
    }
    assert diagnose(matrix, [a, b, c]) == {("a", "b"): LIKELY_VXLAN}
    assert "udp/4789" in LIKELY_VXLAN


class ScopeNode(Node):
    """A fake host: its probe starts on a network of the given scope; commands are kept."""

    def __init__(self, name: str, scope: str, index: int) -> None:
        super().__init__(Host(name, f"10.0.0.{index}", "worker", "eth1"), conn=None)
        self.scope, self.index = scope, index
        self.ran: list[str] = []

    def sh(self, command: str, check: bool = True) -> str:
        self.ran.append(command)
        return f"10.9.0.{self.index}\n{self.scope}\n" if "docker run" in command else ""


@pytest.mark.parametrize(("scope", "window"), [("swarm", SWARM_CONVERGE_SECONDS), ("global", CONVERGE_SECONDS)])
def test_a_swarm_networks_probes_wait_for_two_anti_entropy_rounds(scope: str, window: int) -> None:
    nodes = [ScopeNode(f"h{i}", scope, i) for i in (1, 2)]
    run("ov_net1", list(nodes))
    pings = [c for n in nodes for c in n.ran if "docker exec" in c]
    assert len(pings) == 2 and all(f"end=$(( $(date +%s) + {window} ))" in c for c in pings)


def test_a_pair_whose_small_pings_pass_and_full_size_does_not_names_the_path_mtu() -> None:
    """diagnose(): the path's MTU only where the small ping by IP passed and the full-size
    one lost its packet; a check that could not run says so; a name-only failure gets no hint."""
    from overlaylab.checks.verify import Matrix, diagnose
    from overlaylab.facts import HostFacts
    from tests.unit.test_facts_render import FakeConn

    def node(name: str) -> Node:
        return Node(
            Host(name, name, "worker", "eth1"), FakeConn(), HostFacts(hostname=name, gossip_alive=["a", "b", "c"])
        )

    lost = "1 packets transmitted, 0 packets received, 100% packet loss"
    matrix = Matrix(["a", "b", "c"], set())
    matrix.results = {
        ("a", "b", "ip"): (True, ""),
        ("a", "b", "mtu"): (False, f"1450 {lost}"),
        ("a", "c", "ip"): (True, ""),
        ("a", "c", "mtu"): (False, "1450 nsenter: failed to execute ping: No such file or directory"),
        ("b", "c", "ip"): (True, ""),
        ("b", "c", "name"): (False, "bad address 'probe-c'"),
        ("b", "c", "mtu"): (True, "1450"),
        ("c", "a", "ip"): (True, ""),
        ("c", "a", "name"): (True, ""),
        ("c", "a", "mtu"): (True, "1450"),
        ("c", "a", "tcp"): (False, "0 wget: download timed out"),
    }
    nodes = [node("a"), node("b"), node("c")]
    hints = diagnose(matrix, nodes)
    assert set(hints) == {("a", "b"), ("a", "c"), ("c", "a")}
    assert hints[("c", "a")].startswith("small and full-size pings pass, a TCP stream does not (0 of 1048576 bytes")
    assert hints[("a", "b")].startswith("packets of 1450 bytes (the overlay's MTU) are lost while small pings pass")
    assert "cannot carry 1500 bytes" in hints[("a", "b")]
    assert (
        hints[("a", "c")]
        == "the full-size check could not run: 1450 nsenter: failed to execute ping: No such file or directory"
    )
    legend = "(row reaches column; by IP / by name / a full-size packet / 1 MiB over TCP):"
    assert matrix.render().splitlines()[0].endswith(legend)
    assert "✓/✓/✓/✗" in matrix.render()  # c -> a
    nodes[0].facts.host_ping = "ping: unrecognized option: V"  # busybox's, as `fab verify` reads it
    assert "install iputils-ping" in diagnose(matrix, nodes)[("a", "b")]


def test_the_tcp_check_fetches_the_whole_stream_by_name_and_says_how_much_came(tmp_path: Path) -> None:
    targets = [("h2", "tcp", "good-2"), ("h3", "tcp", "late-3"), ("h4", "tcp", "stall-4")]
    lines, log = run_script(tmp_path, targets, window=2)
    assert lines == ["R h2 tcp ok", "R h3 tcp ok", "R h4 tcp fail 65536 "]  # cut at STREAM_TRY_SECONDS
    assert "wget http://good-2/stream" in log and log.count("wget http://late-3/stream") == 2


def test_the_ladder_runs_after_the_checks_and_prints_a_line_per_size_that_came_back(tmp_path: Path) -> None:
    """The path MTU's pings (pathmtu.script) go out from the host once the checks are done."""
    from overlaylab.checks import pathmtu

    ladder = pathmtu.script("10.0.0.1", [("h2", "good-2")], (1500, 1400))
    env = fakes(tmp_path)
    script = ping_script("probe", [("h2", "ip", "good-2")], 2, ladder)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env).stdout.splitlines()
    assert sorted(out) == ["M h2 1400", "M h2 1500", "R h2 ip ok"]
    assert out[0] == "R h2 ip ok"  # the checks first, then the ladder


def test_a_pair_one_end_never_learned_names_that_end_and_an_empty_read_names_none() -> None:
    """diagnose(): a pair failed by IP whose one end's table (read after the pings) lacks the
    other's probe; the other direction names the same end (a ping needs both ways). A table
    read empty is no reading: the hint falls through to gossip's (udp/4789)."""
    from overlaylab.checks.verify import LIKELY_VXLAN, Matrix, diagnose, never_learned
    from overlaylab.facts import HostFacts
    from tests.unit.test_facts_render import FakeConn

    def node(name: str) -> Node:
        return Node(
            Host(name, name, "worker", "eth1"), FakeConn(), HostFacts(hostname=name, gossip_alive=["a", "b", "c"])
        )

    lost = (False, "1 packets transmitted, 0 packets received, 100% packet loss")
    matrix = Matrix(["a", "b", "c"], set())
    matrix.addresses = {"a": "10.9.0.1", "b": "10.9.0.2", "c": "10.9.0.3"}
    matrix.results = {
        ("a", "b", "ip"): lost,
        ("b", "a", "ip"): lost,
        ("a", "c", "ip"): lost,
        ("c", "b", "ip"): (True, ""),
    }
    matrix.learned = {"a": {"10.9.0.3": "vtep-c"}, "b": {"10.9.0.1": "vtep-a", "10.9.0.3": "vtep-c"}, "c": {}}
    hints = diagnose(matrix, [node("a"), node("b"), node("c")])
    assert hints[("a", "b")] == hints[("b", "a")] == never_learned("a", "10.9.0.2", "b")
    assert hints[("a", "c")] == LIKELY_VXLAN  # a has c's probe, c's table read empty: no claim
    assert "a has no entry for b's probe (10.9.0.2)" in hints[("a", "b")]


class TableNode(Node):
    """A fake host whose pings fail toward h2 and whose overlay's table lists only the peers given."""

    def __init__(self, index: int, knows: list[int]) -> None:
        super().__init__(Host(f"h{index}", f"10.0.0.{index}", "worker", "eth1"), conn=None)
        self.index, self.knows = index, knows

    def sh(self, command: str, check: bool = True) -> str:
        if "docker run" in command:
            return f"10.9.0.{self.index}\nglobal 0123456789abcdef\n"
        if "docker exec" in command:
            return "\n".join(
                f"R h{j} ip {'fail 100% packet loss' if 2 in (j, self.index) else 'ok'}"
                for j in (1, 2, 3)
                if j != self.index
            )
        if "bridge fdb show" in command:
            sandbox = "1-0123456789"
            return (
                "".join(
                    f"{sandbox} neigh 10.9.0.{j} 02:42:0a:09:00:0{j}\n{sandbox} fdb 02:42:0a:09:00:0{j} 10.0.0.{j}\n"
                    for j in self.knows
                )
                + "1-ffffffffff neigh 10.9.0.2 02:42:0a:09:00:02\n"
            )  # another network's sandbox: not this one's
        return ""


def test_a_failed_round_reads_the_tables_of_its_pairs_ends_before_the_probes_go() -> None:
    """run(): the failed pairs' hosts' tables are read (PEERS_SCRIPT, the probe's network only),
    and diagnose names h1, which has no entry for h2's probe, for both directions."""
    from overlaylab.checks.verify import diagnose, never_learned

    nodes = [TableNode(1, [3]), TableNode(2, [1, 3]), TableNode(3, [1, 2])]
    matrix = run("ov_net1", list(nodes), mtu=1450)
    assert matrix.learned == {
        "h1": {"10.9.0.3": "10.0.0.3"},
        "h2": {"10.9.0.1": "10.0.0.1", "10.9.0.3": "10.0.0.3"},
        "h3": {"10.9.0.1": "10.0.0.1", "10.9.0.2": "10.0.0.2"},
    }
    hints = diagnose(matrix, list(nodes))
    assert hints[("h1", "h2")] == hints[("h2", "h1")] == never_learned("h1", "10.9.0.2", "h2")
    assert ("h3", "h2") not in hints and ("h2", "h3") not in hints  # both ends know: nothing said
