"""A run's view of the cluster: one verified SSH connection per host, reused for every
step, and hosts worked on in parallel, boundedly. The facts are read through it
(gather.py), Consul's API too (consulapi.py)."""

from __future__ import annotations

import base64
import contextlib
import secrets
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from fabric import Connection

from overlaylab import facts, remote
from overlaylab.errors import InputError, OverlaylabError
from overlaylab.inventory import Host, Inventory

MAX_PARALLEL = 8  # hosts worked on at once, by default: the run's --parallel sets it
T = TypeVar("T")
_limit = MAX_PARALLEL


def set_parallel(limit: int) -> None:
    """The cap on hosts worked on at once, for this run (every parallel() below)."""
    global _limit
    if limit < 1:
        raise InputError(f"--parallel: {limit} must be at least 1")
    _limit = limit


class Forwarding(Protocol):
    """A local port forwarded through the host's SSH connection (consulapi.Forward)."""

    port: int

    def close(self) -> None: ...


@dataclass
class Node:
    host: Host
    conn: Connection
    facts: facts.HostFacts = field(default_factory=facts.HostFacts)
    commands: int = 0  # remote commands run for this host in this run (for the bench)
    forwards: dict[tuple[str, int], Forwarding] = field(default_factory=dict)  # consulapi.Forward, by destination

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def advertise_ip(self) -> str:
        return self.facts.advertise_ips[0] if self.facts.advertise_ips else ""

    def address_moved(self) -> str | None:
        """dockerd resolves --cluster-advertise once, at start: after the interface's address
        changed (DHCP), it goes on registering and gossiping with the old one until it restarts."""
        advertised = self.facts.cluster_advertise.rpartition(":")[0]
        if advertised and self.advertise_ip and advertised != self.advertise_ip:
            return f"dockerd advertises {advertised}, but {self.host.advertise} now has {self.advertise_ip}"
        return None

    def sh(self, command: str, check: bool = True) -> str:
        self.commands += 1
        return str(remote.run(self.conn, command, sudo=True, check=check, host=self.name).stdout)

    def result(self, command: str) -> tuple[int, str, str]:
        self.commands += 1
        res = remote.run(self.conn, command, sudo=True, check=False, host=self.name)
        return int(res.exited), str(res.stdout), str(res.stderr)

    def put_secret(self, path: str, content: str) -> None:
        """A root-only file whose content never appears on a command line (`ps`) or in a
        log: over SFTP into a file only the SSH user can read, then moved into place by root."""
        self.put_secrets({path: content})

    def put_secrets(self, files: dict[str, str]) -> None:
        """Several root-only files, put in place by one command after all have arrived: a
        run cut off midway leaves the old set or the new one, never a certificate beside
        another's key (with which dockerd would not start)."""
        q = shlex.quote
        sftp = self.conn.sftp()
        moves, tmps = [], []
        for path, content in files.items():
            tmp = f"/tmp/.overlaylab-{secrets.token_hex(6)}"
            with sftp.open(tmp, "w") as f:
                f.chmod(0o600)  # before the first byte
                f.write(content)
            tmps.append(tmp)
            moves.append(
                f"mkdir -p -m 0700 {q(str(Path(path).parent))} && install -m 0600 -o root -g root {tmp} {q(path)}.new"
            )
        done = " && ".join(f"mv -f {q(p)}.new {q(p)}" for p in files)
        self.sh(f"{' && '.join(moves)} && {done}; rc=$?; rm -f {' '.join(tmps)}; exit $rc")


def parallel(
    items: Sequence[T], fn: Callable[[T], object], limit: int | None = None, key: Callable[[T], str] | None = None
) -> dict[str, BaseException]:
    """Run fn on every item; per-item exceptions come back keyed by name (as Fabric's
    GroupResult keys by connection), never lost and never raised for the others."""
    name = key or (lambda item: str(item.name))  # type: ignore[attr-defined]
    errors: dict[str, BaseException] = {}
    if not items:
        return errors
    with ThreadPoolExecutor(max_workers=min(limit or _limit, len(items))) as pool:
        futures = {name(item): pool.submit(fn, item) for item in items}
        for item_name, fut in futures.items():
            exc = fut.exception()
            if exc is not None:
                errors[item_name] = exc
    return errors


def target(inv: Inventory, host: Host, accept_new: bool, sudo_password: str | None) -> remote.SshTarget:
    return remote.SshTarget(
        name=host.name,
        address=host.address,
        user=host.user or inv.ssh_user,
        port=host.port or inv.ssh_port,
        key=inv.ssh_key,
        known_hosts=inv.known_hosts,
        accept_new=accept_new,
        sudo_password=sudo_password,
    )


def connect_all(
    inv: Inventory, hosts: list[Host], accept_new: bool = False, sudo_password: str | None = None
) -> list[Node]:
    """Connect to every host in parallel; any failure (key, unreachable) is an InputError naming all."""
    nodes, _ = connect_reachable(inv, hosts, accept_new, sudo_password, tolerate=False)
    return nodes


def connect_reachable(
    inv: Inventory, hosts: list[Host], accept_new: bool, sudo_password: str | None, tolerate: bool = True
) -> tuple[list[Node], dict[str, str]]:
    """(the hosts connected, {host: why not} for those that did not answer). A host key that
    is unknown or changed is never tolerated: that is an InputError whatever ``tolerate`` says."""
    nodes: dict[str, Node] = {}

    def one(host: Host) -> None:
        where = target(inv, host, accept_new, sudo_password)
        nodes[host.name] = Node(host, remote.connect(where))

    errors = parallel(hosts, one)
    gone = {n: str(e) for n, e in errors.items() if tolerate and isinstance(e, remote.UnreachableError)}
    fatal = {n: e for n, e in errors.items() if n not in gone}
    if fatal:
        for node in nodes.values():
            node.conn.close()
        raise InputError("\n".join(str(e) for e in fatal.values()))
    return [nodes[h.name] for h in hosts if h.name in nodes], gone


def close_all(nodes: list[Node]) -> None:
    for node in nodes:
        for forward in node.forwards.values():
            forward.close()
        with contextlib.suppress(Exception):
            node.conn.close()


def journal(node: Node, lines: int = 20) -> str:
    try:
        return node.sh(f"journalctl -u docker.service -n {lines} --no-pager -o short-iso", check=False).strip()
    except OverlaylabError as exc:
        return f"(journal unavailable: {exc})"


def write_file_command(path: str, content: str) -> str:
    """A shell fragment that writes content atomically (no sftp round trip, no temp file on the laptop)."""
    data = base64.b64encode(content.encode()).decode()
    tmp = f"{path}.overlaylab-tmp"
    return f"mkdir -p {Path(path).parent} && echo {data} | base64 -d > {tmp} && chmod 0644 {tmp} && mv -f {tmp} {path}"
