"""Find the outer engine: the machine's own if one runs, else a private dockerd.

The private daemon has its own data root, exec root, socket and containerd
namespace, and no iptables or bridge of its own, so it cannot disturb anything
else on the machine; lab-down stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from overlaylab.errors import InputError, OverlaylabError
from overlaylab.lab.docker import Docker

SYSTEM_SOCKET = "/var/run/docker.sock"
PRIVATE_RUN = Path("/run/overlaylab")
PRIVATE_DATA = Path("/var/lib/overlaylab/docker")
PRIVATE_SOCKET = PRIVATE_RUN / "docker.sock"
PRIVATE_PIDFILE = PRIVATE_RUN / "dockerd.pid"
PRIVATE_LOG = PRIVATE_RUN / "dockerd.log"
PRIVATE_EXEC = PRIVATE_RUN / "exec"
CONTAINERD_NS = "overlaylab"
LOCK = PRIVATE_RUN / "labs.lock"

P = ParamSpec("P")
R = TypeVar("R")


def exclusive(change: Callable[P, R]) -> Callable[P, R]:
    """One lab change at a time on this machine (an flock, so across processes): `make test`
    runs two cluster modules at once, and without it both could start the private dockerd,
    or one stop it (its last lab gone) while the other is between two labs."""

    @functools.wraps(change)
    def held(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            PRIVATE_RUN.mkdir(parents=True, exist_ok=True)
            lock = open(LOCK, "a")  # noqa: SIM115 (held for the whole change, closed below)
        except PermissionError:
            return change(*args, **kwargs)  # not root: the change itself says what it needs
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return change(*args, **kwargs)

    return held


@dataclass(frozen=True)
class Engine:
    docker: Docker
    private: bool


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    # A daemon started by this very process lingers as a zombie once it dies: reap it.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


def private_pid() -> int | None:
    return _pid_alive(PRIVATE_PIDFILE)


def has_stored_containers() -> bool:
    containers = PRIVATE_DATA / "containers"
    return containers.is_dir() and any(containers.iterdir())


def find(start: bool) -> Engine | None:
    """The engine to use; with ``start``, a private one is started when none runs."""
    private = Docker(str(PRIVATE_SOCKET))
    if private_pid() is not None and private.ping():
        return Engine(private, True)
    system = Docker(SYSTEM_SOCKET)
    if os.path.exists(SYSTEM_SOCKET) and system.ping():
        return Engine(system, False)
    if not start:
        return None
    start_private()
    return Engine(private, True)


def start_private(timeout: float = 60) -> None:
    """Start Debian's dockerd privately; a crashed earlier one's leftovers are cleared first."""
    if shutil.which("dockerd") is None:
        raise InputError(
            "no Docker engine runs on this machine and dockerd is not installed (apt-get install docker.io)"
        )
    stop_private()
    PRIVATE_RUN.mkdir(parents=True, exist_ok=True)
    PRIVATE_DATA.mkdir(parents=True, exist_ok=True)
    argv = [
        "dockerd",
        "--data-root", str(PRIVATE_DATA),
        "--exec-root", str(PRIVATE_EXEC),
        "--host", f"unix://{PRIVATE_SOCKET}",
        "--pidfile", str(PRIVATE_PIDFILE),
        "--containerd-namespace", CONTAINERD_NS,
        "--containerd-plugins-namespace", f"{CONTAINERD_NS}-plugins",
        "--bridge", "none",
        "--iptables=false",
        "--ip-masq=false",
    ]  # fmt: skip
    with open(PRIVATE_LOG, "ab") as log:
        subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    docker = Docker(str(PRIVATE_SOCKET))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if private_pid() is not None and docker.ping():
            return
        time.sleep(0.3)
    tail = PRIVATE_LOG.read_text(errors="replace").splitlines()[-10:]
    raise OverlaylabError(f"private dockerd did not answer within {timeout:.0f}s:\n  " + "\n  ".join(tail))


def _private_processes() -> list[int]:
    """PIDs of the private dockerd's containerd and shims (found by our namespace / exec root)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmd).decode(errors="replace")
        if int(entry.name) != os.getpid() and (
            str(PRIVATE_EXEC) in text or f"-namespace {CONTAINERD_NS} " in text + " "
        ):
            pids.append(int(entry.name))
    return pids


def _unmount_under(root: Path) -> None:
    """Unmount what a dead daemon left mounted (netns files, overlay roots, shm)."""
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f]
    # dockerd also bind-mounts its data root onto itself.
    ours = [m for m in mounts if m == str(root) or m.startswith(str(root) + "/")]
    for mnt in sorted(ours, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)


def stop_private(timeout: float = 30) -> bool:
    """Stop the private dockerd and everything it started; True when one was running."""
    pid = private_pid()
    was_running = pid is not None
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and private_pid() is not None:
            time.sleep(0.2)
        if private_pid() is not None:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    for leftover in _private_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover, signal.SIGKILL)
    time.sleep(0.2)
    _unmount_under(PRIVATE_RUN)
    _unmount_under(PRIVATE_DATA)
    for stale in (PRIVATE_PIDFILE, PRIVATE_SOCKET):
        stale.unlink(missing_ok=True)
    return was_running
