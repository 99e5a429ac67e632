"""Unit tests (no host, no dockerd: the facts snippet runs under sh against a fake /proc;
nodes are recorded facts): the deaf-sandbox fact, the restart policies read, and the
commands that hold the users' containers back over a restart of ours."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import cast

import pytest

from overlaylab import facts, provision, render
from overlaylab.plan import Context
from overlaylab.reasons import Seen
from overlaylab.repairs.deaf_sandbox import DeafSandbox
from overlaylab.steps import holdback
from tests.unit.test_facts_render import node, recorded

NID = "276f2f1f15cafe0000000000000000000000000000000000000000000000beef"

VIEW = cast(Context, None)  # the deaf-sandbox repair reads the host's own facts alone


def _fake(root: Path, threads: dict[str, str], between: str = "true") -> str:
    """/run/docker/netns with our overlay's sandbox and a container's; dockerd (PID 42) threads where told."""
    netns = root / "netns"
    netns.mkdir()
    for n in ("1-276f2f1f15", "c0ffee123456"):
        (netns / n).touch()
    where = {
        "host": "net:[4026531840]",
        "overlay": f"net:[{(netns / '1-276f2f1f15').stat().st_ino}]",
        "container": f"net:[{(netns / 'c0ffee123456').stat().st_ino}]",
    }
    for tid, place in threads.items():
        (root / f"proc/42/task/{tid}/ns").mkdir(parents=True)
        (root / f"proc/42/task/{tid}/ns/net").symlink_to(where[place])
    return facts.deaf_sandboxes_script(proc=str(root / "proc"), netns_dir=str(netns), pid="42", between=between)


@pytest.mark.parametrize(
    ("threads", "deaf"),
    [
        ({"42": "host", "43": "overlay"}, ""),  # its miss watcher sits, locked, in the sandbox
        ({"42": "host", "43": "host"}, "1-276f2f1f15"),  # made before gossip: no watcher
        ({"42": "overlay", "43": "host"}, ""),  # Go ran the watcher on the main thread
    ],
)
def test_an_overlay_sandbox_no_dockerd_thread_sits_in_is_named(
    tmp_path: Path, threads: dict[str, str], deaf: str
) -> None:
    out = subprocess.run(["sh", "-c", _fake(tmp_path, threads)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == deaf  # a container's namespace (no dash) is never named


def test_a_sandbox_whose_watcher_arrives_within_the_pause_is_not_named(tmp_path: Path) -> None:
    arrives = f"ln -sfn net:[$(stat -c %i {tmp_path}/netns/1-276f2f1f15)] {tmp_path}/proc/42/task/43/ns/net"
    script = _fake(tmp_path, {"42": "host", "43": "host"}, between=arrives)
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.strip() == ""


def _worker(deaf: bool, policies: dict[str, str]) -> facts.HostFacts:
    f = recorded("facts-worker-kv.txt")
    assert f.network is not None
    f.network["Id"] = NID
    f.deaf_sandboxes = ["276f2f1f15"] if deaf else []
    f.attached = {c: facts.Attachment(c + "-id", NID, True, policy=p) for c, p in policies.items()}
    f.containers = {**f.containers, **dict.fromkeys(policies, "")}
    return f


def test_the_restart_policies_are_read_as_docker_update_takes_them() -> None:
    line = "/web\tabc\ttrue\t{nid}\tabc,\t\t\t{p}\n"
    parsed = facts.parse_attached(
        "".join(
            line.format(nid=NID, p=p).replace("/web", f"/c{i}")
            for i, p in enumerate(("always:0", "no:0", "on-failure:3", "unless-stopped:0"))
        )
    )
    assert {c: a.policy for c, a in parsed.items()} == {
        "c0": "always",
        "c1": "no",
        "c2": "on-failure:3",
        "c3": "unless-stopped",
    }
    assert {c for c, a in parsed.items() if a.comes_back} == {"c0", "c2", "c3"}
    stopped = facts.parse_attached(
        line.format(nid=NID, p="always:0").replace("true", "false")
        + line.format(nid=NID, p="unless-stopped:0").replace("true", "false").replace("/web", "/other")
    )
    assert {c for c, a in stopped.items() if a.comes_back} == {"web"}  # Docker starts a stopped `always` one too


def test_a_deaf_sandbox_is_a_restart_reason_and_the_restart_holds_the_users_containers_back() -> None:
    n = node(
        "bm-docker-02", _worker(True, {"users_app2": "always", "batch": "no", "overlaylab-anchor-bm-docker-02": "no"})
    )
    reason = DeafSandbox().why(VIEW, n, Seen())
    assert reason is not None and "never looks up peers" in reason
    held = holdback.to_hold(n)
    assert held == {"users_app2": "always"}  # a container without a policy does not come back; the anchor is ours
    hold, release = holdback.hold_command(held), holdback.release_command(held)
    assert hold.endswith("docker update --restart no users_app2 >/dev/null") and facts.HELD_FILE in hold
    assert release.index("docker start users_app2") < release.index("docker update --restart always users_app2")
    assert release.endswith(f"rm -f {facts.HELD_FILE}")  # the record goes last


def test_the_users_running_containers_are_stopped_before_a_restart_of_ours_so_their_leaves_go_out() -> None:
    """Held or not; never overlaylab's own (the anchor goes by `docker rm`), never a stopped one."""
    n = node(
        "bm-docker-02", _worker(False, {"users_app2": "always", "batch": "no", "overlaylab-anchor-bm-docker-02": "no"})
    )
    n.facts.attached["old"] = facts.Attachment("old-id", NID, False, policy="no")
    assert holdback.leave_command(n) == "timeout 120 docker stop batch users_app2 >/dev/null 2>&1; true"
    assert holdback.leave_command(node("bm-docker-03", _worker(False, {}))) == "true"


def test_a_healthy_sandbox_is_no_restart_reason_and_swarm_mode_is_never_deaf() -> None:
    n = node("bm-docker-02", _worker(False, {"users_app2": "always"}))
    assert DeafSandbox().why(VIEW, n, Seen()) is None
    swarm = node("bm-docker-02", _worker(True, {}))
    swarm.facts.dropin = None  # no drop-in of ours: a swarm's sandboxes have no watcher, by design
    assert not holdback.deaf(swarm)


def test_a_stopped_runs_record_is_released_by_the_next_run() -> None:
    f = facts.parse(f"{facts.MARK}held\nusers_app2 always\nbatch on-failure:3\n{facts.MARK}end\n", "eth1")
    assert f.held == {"users_app2": "always", "batch": "on-failure:3"}
    action = holdback.Release().plan(None, node("bm-docker-02", f))  # type: ignore[arg-type]
    assert action is not None and action.change and "users_app2, batch" in action.detail


def test_containers_that_came_back_before_gossip_are_listed_without_ours_or_those_without_a_policy() -> None:
    out = "/users_app1 always:0 \n/overlaylab-anchor-bm-docker-01 no:0 anchor\n/batch no:0 \n/job on-failure:2 \n"
    assert holdback.parse_came_back(out) == {"users_app1": "always", "job": "on-failure:2"}
    command = holdback.came_back_deaf_command("ov_net1")
    assert "exit 0" in command and "--filter network=ov_net1" in command  # a healthy sandbox lists nothing


def test_a_swarm_host_under_our_tls_drop_in_has_no_deaf_sandbox_whatever_its_threads() -> None:
    """In swarm mode no overlay sandbox has a miss watcher (networkdb, not serf): a sandbox
    read without a thread in it is no fault there. Our drop-in alone (TLS) is not kv mode:
    the cluster store in it is (a swarm verify failed on this in CI, ci7)."""
    kv = node("bm-docker-02", _worker(True, {}))
    assert holdback.deaf(kv) and "bm-docker-02" in provision.unseen_problems([kv])
    f = _worker(True, {})
    assert f.dropin is not None and "--cluster-store=" in f.dropin
    f.dropin = re.sub(r" ?--cluster-[a-z-]+=\S+", "", f.dropin)  # the same drop-in, with no store: a swarm host's
    assert render.is_ours(f.dropin) and "--cluster-" not in f.dropin
    swarm = node("bm-docker-02", f)
    assert not holdback.deaf(swarm) and DeafSandbox().why(VIEW, swarm, Seen()) is None
    assert "bm-docker-02" not in provision.unseen_problems([swarm])
