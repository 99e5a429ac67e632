"""Helpers for end-to-end tests on a real lab (real systemd, sshd, dockerd)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from fabric import Connection

from overlaylab import remote
from overlaylab.lab import engine, hosts, keys
from overlaylab.lab.docker import Docker
from overlaylab.lab.spec import HostSpec, LabSpec

# A lab name and range of the tests' own, so a developer's demo lab is left alone.
E2E_RANGE = "10.211.0.0/16"


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    for tool in ("docker", "debootstrap", "ssh-keygen", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup installs it)"
    if shutil.which("dockerd") is None and not os.path.exists(engine.SYSTEM_SOCKET):
        return "no Docker engine and no dockerd to start one"
    return None


def require_lab() -> None:
    why = lab_unavailable()
    if why:
        pytest.skip(why)


def ssh(spec: LabSpec, host: HostSpec) -> Connection:
    state = keys.state_dir(spec.name)
    target = remote.SshTarget(
        name=host.name, address=host.mgmt_ip, user="admin", port=22,
        key=state / "id_ed25519", known_hosts=state / "known_hosts",
    )  # fmt: skip
    return remote.connect(target)


def sh(conn: Connection, command: str, sudo: bool = True) -> str:
    return str(remote.run(conn, command, sudo=sudo).stdout.strip())


def outer() -> Docker:
    eng = engine.find(start=False)
    assert eng is not None, "no outer engine runs"
    return eng.docker


def container_ids(lab: str) -> list[str]:
    eng = engine.find(start=False)
    if eng is None:
        return []
    return [o.container_id for o in hosts.observe(eng.docker, lab).values()]


def processes_in(ids: list[str]) -> list[int]:
    """PIDs whose cgroup path names one of these containers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cgroup = (entry / "cgroup").read_text()
            except OSError:
                continue
            if any(cid in cgroup for cid in ids):
                found.append(int(entry.name))
    return found


def kill_private_engine(ids: list[str]) -> None:
    """What the end of a session does: every process of the private engine dies at once."""
    victims = processes_in(ids) + engine._private_processes()
    pid = engine.private_pid()
    if pid:
        victims.append(pid)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (processes_in(ids) or engine.private_pid()):
        time.sleep(0.2)
