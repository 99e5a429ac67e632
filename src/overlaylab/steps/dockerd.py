"""Steps 4 and 5: the 10-machine.conf drop-in, and a restart only where it changed.

The previous drop-in is kept in memory for this run's rollback, and the original
one (before overlaylab first touched the host, or the fact that there was none) is
kept on the host and never overwritten, for teardown.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from overlaylab import render
from overlaylab.cluster import Node, journal, write_file_command
from overlaylab.errors import OverlaylabError
from overlaylab.facts import BACKUP, BACKUP_ABSENT, BACKUP_DIR, DROPIN
from overlaylab.inventory import Inventory

READY_TIMEOUT = 60  # dockerd answering, cluster store in docker info, gossip listening


@dataclass(frozen=True)
class Plan:
    node: Node
    wanted: str
    current: str | None

    @property
    def changed(self) -> bool:
        return self.wanted != self.current

    def diff(self) -> str:
        before = (self.current or "").splitlines(keepends=True)
        after = self.wanted.splitlines(keepends=True)
        label = f"{self.node.name}:{DROPIN}"
        return "".join(difflib.unified_diff(before, after, f"{label} (now)", f"{label} (wanted)"))


def plan(inv: Inventory, node: Node, manager_ip: str) -> Plan:
    base = render.base_command(node.facts.exec_start, node.facts.dropin)
    argv = render.cluster_argv(base, manager_ip, inv.consul_port, node.host.advertise, inv.extra_flags)
    wanted = render.render(inv.cluster, base, argv, BACKUP_DIR)
    return Plan(node, wanted, node.facts.dropin)


def _backup_command() -> str:
    """Keep the original file once; never overwrite an existing backup."""
    return (
        f"mkdir -p {BACKUP_DIR} && if [ ! -e {BACKUP} ] && [ ! -e {BACKUP_ABSENT} ]; then "
        f"if [ -e {DROPIN} ]; then cp -p {DROPIN} {BACKUP}; else : > {BACKUP_ABSENT}; fi; fi"
    )


JOIN_FAILED = "Failed to join the cluster"


def _ready_command(timeout: int, expect_peers: bool = False) -> str:
    """Waits until dockerd answers with a cluster store and its gossip port listens.

    With ``expect_peers`` (peers are known to be up), a gossip join that failed since
    the restart (dockerd joins through one neighbor and never retries: the node stays
    in a cluster of its own while its port listens) is reported as `join-failed`.
    """
    check_join = (
        f'if journalctl -u docker.service --since "@$start" -o cat 2>/dev/null | grep -q "{JOIN_FAILED}"; '
        "then echo join-failed; exit 3; fi; "
        if expect_peers
        else ""
    )
    return (
        f"end=$(( $(date +%s) + {timeout} )); "
        "while [ $(date +%s) -lt $end ]; do "
        "store=$(timeout 5 docker info --format '{{.ClusterStore}}' 2>/dev/null); "
        "if [ -n \"$store\" ] && ss -Hltn 'sport = :7946' | grep -q .; then "
        f"{check_join}echo ready; exit 0; fi; "
        "sleep 0.5; done; echo not-ready; exit 1"
    )


def _restart_command(expect_peers: bool) -> str:
    return f"start=$(date +%s); systemctl restart docker.service && {_ready_command(READY_TIMEOUT, expect_peers)}"


def _restore_command(previous: str | None) -> str:
    put_back = write_file_command(DROPIN, previous) if previous is not None else f"rm -f {DROPIN}"
    return (
        f"{put_back} && systemctl daemon-reload && systemctl reset-failed docker.service; "
        "systemctl restart docker.service; systemctl is-active docker.service"
    )


def apply(p: Plan, before_restart: str = "true", expect_peers: bool = False) -> str:
    """Write, reload, restart, wait; on failure roll back and raise with the journal."""
    node = p.node
    node.sh(
        f"{_backup_command()} && {write_file_command(DROPIN, p.wanted)} && systemctl daemon-reload && {before_restart}"
    )
    code, out, err = node.result(_restart_command(expect_peers))
    if code == 0:
        return "drop-in written, dockerd restarted"
    if "join-failed" in out:  # a transient gossip join failure: one more restart
        code, out, err = node.result(_restart_command(expect_peers))
        if code == 0:
            return "drop-in written, dockerd restarted (twice: its first gossip join failed)"
    lines = journal(node)
    restore = _restore_command(p.current)
    if render.is_ours(p.current):  # the previous state was in the cluster: wait until it is again
        restore += f" && {_ready_command(READY_TIMEOUT)}"
    restored = node.result(restore)
    active = "active" in restored[1].split()
    raise OverlaylabError(
        f"dockerd did not come up with the new drop-in ({(err or out).strip()[-200:] or 'not ready'}); "
        + ("rolled back to the previous drop-in, dockerd runs again" if active else "ROLLBACK FAILED: dockerd is down")
        + "\n    journal:\n    "
        + "\n    ".join(lines.splitlines())
    )


def has_backup(node: Node) -> bool:
    """overlaylab wrote its drop-in here once: the original (or the fact there was none) is kept."""
    return Path(BACKUP).name in node.facts.backup or Path(BACKUP_ABSENT).name in node.facts.backup


def restart_refusal(node: Node, cause: str, allow_restart: bool) -> str | None:
    """A restart stops the host's running containers: a user's only with --allow-restart."""
    running = node.facts.foreign_containers
    if not running or allow_restart:
        return None
    return f"{cause}: restarting dockerd stops {', '.join(running)}; pass --allow-restart to go ahead"


def wait_ready(node: Node) -> None:
    code, out, _ = node.result(_ready_command(READY_TIMEOUT))
    if code != 0:
        raise OverlaylabError(f"dockerd has no cluster store or gossip after {READY_TIMEOUT}s: {out.strip()}")


def restore_original(node: Node) -> str | None:
    """Teardown: the original drop-in (or none) back, restart; None when nothing to do."""
    if not has_backup(node):
        if render.is_ours(node.facts.dropin):
            raise OverlaylabError(f"{DROPIN} is overlaylab's but no backup of the original exists in {BACKUP_DIR}")
        return None
    original = Path(BACKUP).name in node.facts.backup
    put_back = f"cp -p {BACKUP} {DROPIN}" if original else f"rm -f {DROPIN}"
    code, out, err = node.result(
        f"{put_back} && systemctl daemon-reload && systemctl reset-failed docker.service; "
        f"systemctl restart docker.service && rm -f {BACKUP} {BACKUP_ABSENT} && systemctl is-active docker.service"
    )
    if code != 0:
        raise OverlaylabError(f"restoring the original drop-in failed: {(err or out).strip()[-300:]}\n{journal(node)}")
    return "original drop-in restored" if original else "drop-in removed (there was none before)"
