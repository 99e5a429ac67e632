"""SSH connections that verify host keys, and commands run over them.

Fabric auto-adds unknown host keys and ignores known_hosts; every Connection made
here instead loads the inventory's known_hosts and refuses unknown or changed
keys (unknown ones are accepted only on request, like `ssh -o
StrictHostKeyChecking=accept-new`; changed ones never).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Connection
from invoke.exceptions import AuthFailure, CommandTimedOut
from invoke.runners import Result

from overlaylab.errors import InputError, OverlaylabError

# paramiko logs a refused forward ("Secsh channel 3 open FAILED: Connection refused") while
# Consul starts; the caller retries and reports what matters. Without a handler Python's
# last resort would print it on stderr, in the middle of the run's own lines.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class HostKeyError(InputError):
    """An unknown or changed host key: the host is refused before anything runs on it."""


class UnreachableError(InputError):
    """The host did not accept an SSH session."""


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _known_hosts_name(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


class _StrictPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown key: refuse, or with accept_new record it in known_hosts."""

    _lock = threading.Lock()

    def __init__(self, known_hosts: Path, accept_new: bool, port: int) -> None:
        self.known_hosts = known_hosts
        self.accept_new = accept_new
        self.port = port

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.accept_new:
            raise HostKeyError(
                f"{hostname}: unknown host key {key.get_name()} {fingerprint(key)} (not in {self.known_hosts}); "
                "verify it and add it, or pass --accept-new-host-keys"
            )
        entry = f"{_known_hosts_name(hostname, self.port)} {key.get_name()} {key.get_base64()}\n"
        with self._lock:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as f:
                f.write(entry)
        client.get_host_keys().add(_known_hosts_name(hostname, self.port), key.get_name(), key)


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in; ``key``/``port``/``user`` None defer to ~/.ssh/config."""

    name: str
    address: str
    user: str | None = None
    port: int | None = None
    key: Path | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")
    accept_new: bool = False
    sudo_password: str | None = None


# A host that dies mid-command (power cut, container killed) answers nothing, not even a
# reset: without these, paramiko waits on the TCP connection for the kernel's ~15 min of
# retransmissions. With them the kernel gives up on a silent peer in about 30 s, paramiko's
# transport closes, and the command ends as lost (an unreachable host, not a hang).
DEAD_PEER_SECONDS = 30
TCP_OPTIONS = {  # name -> value; a laptop's OS may lack some (macOS has no TCP_USER_TIMEOUT)
    "TCP_KEEPIDLE": 10,
    "TCP_KEEPINTVL": 5,
    "TCP_KEEPCNT": 4,
    "TCP_USER_TIMEOUT": DEAD_PEER_SECONDS * 1000,
}
# A backstop for a command that hangs on a live host (a wedged docker CLI): longer than
# any wait of ours (dockerd's restore can stall 60 s, a ready wait is 60 s), and than a pull.
COMMAND_TIMEOUT = 600


def _detect_dead_peer(conn: Connection) -> None:
    transport = conn.client.get_transport()
    sock = getattr(transport, "sock", None)
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in TCP_OPTIONS.items():
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def connect(target: SshTarget, timeout: float = 15) -> Connection:
    """An open Connection whose host key was verified against ``target.known_hosts``."""
    connect_kwargs: dict[str, object] = {"allow_agent": True}
    if target.key is not None:
        connect_kwargs.update(key_filename=[str(target.key.expanduser())], look_for_keys=False)
    conn = Connection(
        host=target.address,
        user=target.user,
        port=target.port,
        connect_timeout=timeout,
        connect_kwargs=connect_kwargs,
    )
    known_hosts = target.known_hosts.expanduser()
    client = conn.client
    if known_hosts.exists():
        client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(_StrictPolicy(known_hosts, target.accept_new, int(conn.port)))
    if target.sudo_password is not None:
        conn.config.sudo.password = target.sudo_password
    try:
        conn.open()
    except paramiko.BadHostKeyException as exc:
        raise HostKeyError(
            f"{target.name} ({target.address}): host key CHANGED: got {exc.key.get_name()} {fingerprint(exc.key)}, "
            f"{known_hosts} has {fingerprint(exc.expected_key)}; refusing (a changed key is never accepted)"
        ) from None
    except HostKeyError as exc:
        raise HostKeyError(f"{target.name} ({target.address}): {exc}") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise UnreachableError(f"{target.name} ({target.address}): SSH failed: {exc or type(exc).__name__}") from None
    _detect_dead_peer(conn)
    return conn


class RemoteCommandError(OverlaylabError):
    def __init__(self, host: str, command: str, result: Result) -> None:
        self.host, self.command, self.result = host, command, result
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-5:]
        super().__init__(f"{host}: `{command}` exited {result.exited}: " + " | ".join(tail))


class SudoError(InputError):
    """sudo wants a password that was not given, or refused the one given (exit 2)."""


SUDO_HOW = "--ask-sudo-password or OVERLAYLAB_SUDO_PASSWORD"


def run(
    conn: Connection,
    command: str,
    *,
    sudo: bool = False,
    check: bool = True,
    host: str = "",
    timeout: int = COMMAND_TIMEOUT,
) -> Result:
    """Run a shell command, captured; with ``sudo`` through `sudo sh -c` so pipes and && work.

    stdin is never read (pytest and CI have none), and nothing is echoed, so a
    sudo password never reaches the output. Without a password, sudo runs with
    `-n`: a host that wants one fails at once with a clear message, instead of
    Fabric answering the prompt with an empty password that the host logs as a
    failed attempt (and that pam_faillock counts).

    A host that stops answering raises ConnectionError (the SSH connection is gone) or
    TimeoutError (no answer within ``timeout``): both are OSErrors, which a run reports
    as an unreachable host and leaves out of the steps that follow.
    """
    name = host or str(conn.host)
    try:
        result = _run(conn, command, sudo, name, timeout)
    except CommandTimedOut:
        raise TimeoutError(f"{name}: no answer in {timeout}s to `{_short(command)}`") from None
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        raise ConnectionError(f"{name}: SSH connection lost during `{_short(command)}`")
    if check and result.exited != 0:
        raise RemoteCommandError(name, command, result)
    return result


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def _run(conn: Connection, command: str, sudo: bool, name: str, timeout: int) -> Result:
    if sudo and conn.config.sudo.password is None:
        result: Result = conn.run(
            f"LC_ALL=C sudo -n sh -c {shlex.quote(command)}", hide=True, warn=True, in_stream=False, timeout=timeout
        )
        if result.exited == 1 and "sudo: a password is required" in result.stderr:
            raise SudoError(f"{name}: sudo asks for a password and none was given; use {SUDO_HOW}")
        return result
    if sudo:
        try:
            result = conn.sudo(f"sh -c {shlex.quote(command)}", hide=True, warn=True, in_stream=False, timeout=timeout)
        except AuthFailure:
            raise SudoError(f"{name}: sudo refused the password given ({SUDO_HOW})") from None
        return result
    result = conn.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
    return result


def environ_sudo_password() -> str | None:
    return os.environ.get("OVERLAYLAB_SUDO_PASSWORD")
