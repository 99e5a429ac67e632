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
# docker exec PROBE COMMAND...: the command runs here
echo "exec $2" >> "$LOG"
shift 2
exec "$@"
"""

FAKE_PING = """#!/bin/sh
# ping -c 1 -W 1 TARGET: logs start and end; "late" answers from its 3rd try
for target; do :; done  # the last argument
echo "start $target" >> "$LOG"
sleep 0.3
echo "end $target" >> "$LOG"
case "$target" in
  good*) exit 0 ;;
  late*) n=$(grep -c "start $target" "$LOG"); [ "$n" -ge 3 ] && exit 0 ;;
esac
echo "1 packets transmitted, 0 packets received, 100% packet loss"; exit 1
"""


def run_script(tmp_path: Path, targets: list[tuple[str, str, str]], window: int) -> tuple[list[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("docker", FAKE_DOCKER), ("ping", FAKE_PING)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}
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
        return f"10.9.0.{self.index}\n{self.scope}\n" if command.startswith("docker run") else ""


@pytest.mark.parametrize(("scope", "window"), [("swarm", SWARM_CONVERGE_SECONDS), ("global", CONVERGE_SECONDS)])
def test_a_swarm_networks_probes_wait_for_two_anti_entropy_rounds(scope: str, window: int) -> None:
    nodes = [ScopeNode(f"h{i}", scope, i) for i in (1, 2)]
    run("ov_net1", list(nodes))
    pings = [c for n in nodes for c in n.ran if c.startswith("docker exec")]
    assert len(pings) == 2 and all(f"end=$(( $(date +%s) + {window} ))" in c for c in pings)
