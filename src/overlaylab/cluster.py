"""A run's view of the cluster: one verified SSH connection per host, reused for every
step, and the facts read through it. Hosts are handled in parallel, boundedly."""

from __future__ import annotations

import base64
import contextlib
import secrets
import select
import shlex
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import consul
import paramiko
import requests
from fabric import Connection

from overlaylab import certs, facts, remote, storetls
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


@dataclass
class Node:
    host: Host
    conn: Connection
    facts: facts.HostFacts = field(default_factory=facts.HostFacts)
    commands: int = 0  # remote commands run for this host in this run (for the bench)
    forwards: dict[tuple[str, int], Forward] = field(default_factory=dict)

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
        nodes[host.name] = Node(host, remote.connect(target(inv, host, accept_new, sudo_password)))

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


def read_one(inv: Inventory, node: Node, only: tuple[str, ...] | None = None) -> None:
    """One remote command; read again by a run wherever it changed the host."""
    manager = node.host.is_manager
    server = inv.ha and node.name in inv.servers
    store = (
        facts.Store(inv.consul_name, inv.consul_volume, inv.consul_port, manager, server) if manager or inv.ha else None
    )
    ports = (
        *facts.PORTS,
        inv.consul_port,
        inv.consul_port + 1,  # storetls.py's round 1
        *((facts.CONSUL_GOSSIP,) if inv.ha else ()),
        *((certs.API_PORT,) if inv.tls.docker_api else ()),
    )
    _, out, err = node.result(facts.script(node.host.advertise, store, inv.network, ports, only))
    if facts.MARK + "end" not in out:
        raise InputError(f"{node.name}: reading facts failed (sudo?): {(err or out).strip()[-300:]}")
    node.facts = facts.parse(out, node.host.advertise)
    if store is not None and (manager or server) and not node.facts.store_leader:
        node.facts.store_leader = secure_leader(inv, node)


def secure_leader(inv: Inventory, node: Node) -> str:
    """The leader as a Consul serving HTTPS alone says it (the facts script speaks plain HTTP
    only); "" when it runs no such Consul or does not answer, as the script would say."""
    data = node.facts.consul or {}
    served = storetls.served(data, inv.consul_port)
    if not (data.get("State") or {}).get("Running") or (storetls.HTTPS, inv.consul_port) not in served:
        return ""  # the script asked consul.port over plain HTTP: its answer stands
    try:
        with consul_client(inv, node) as client:
            return str(client.status.leader() or "")
    except (OverlaylabError, requests.RequestException, consul.ConsulException, OSError):
        return ""  # no answer, as the facts script would read it


def read_facts(inv: Inventory, nodes: list[Node], only: tuple[str, ...] | None = None) -> None:
    """Facts for every node, in parallel, one remote command each; sudo failures are input errors."""
    errors = parallel(nodes, lambda node: read_one(inv, node, only))
    if errors:
        raise InputError("\n".join(str(e) for e in errors.values()))


class Forward:
    """A local port forwarded through a host's SSH transport (direct-tcpip), for the whole run.

    Fabric's forward_local waits about a second to close and accepts nothing more once
    one of its channels failed; this one closes at once, and a channel that cannot open
    (Consul not listening yet) only drops that connection, so callers simply retry.
    """

    def __init__(self, transport: paramiko.Transport, ip: str, port: int) -> None:
        self.transport, self.dest = transport, (ip, port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, origin = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client, origin), daemon=True).start()

    def _pipe(self, client: socket.socket, origin: tuple[str, int]) -> None:
        try:
            chan = self.transport.open_channel("direct-tcpip", self.dest, origin, timeout=5)
        except (paramiko.SSHException, OSError):
            client.close()
            return
        try:
            watched: list[Any] = [client, chan]
            while not self.closed:
                ready, _, _ = select.select(watched, [], [], 0.5)
                for source, sink in ((client, chan), (chan, client)):
                    if source in ready:
                        data = source.recv(65536)
                        if not data:
                            return
                        sink.sendall(data)
        except OSError:
            pass
        finally:
            chan.close()
            client.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@contextlib.contextmanager
def consul_client(inv: Inventory, node: Node) -> Iterator[consul.Consul]:
    """Consul's API on ``node``'s cluster address, through its SSH connection: the laptop need
    not reach the cluster network. Where Consul serves HTTPS (storetls.py), the admin's
    certificate is presented and Consul's is verified against the cluster's CA (it names
    127.0.0.1, the forward's end)."""
    listeners = storetls.served(node.facts.consul, inv.consul_port)
    secure = [port for scheme, port in listeners if scheme == storetls.HTTPS]
    directory = inv.ca_dir
    admin = (directory / certs.CLIENT_CERT, directory / certs.CLIENT_KEY)
    plain = [port for scheme, port in listeners if scheme == storetls.HTTP]
    use_tls = bool(secure) and (all(p.exists() for p in admin) or not plain)  # round 1 of a move: either
    port = secure[0] if use_tls else plain[0]
    key = (node.advertise_ip, port)
    if key not in node.forwards:
        transport = node.conn.client.get_transport()
        if transport is None:
            raise OverlaylabError(f"{node.name}: no SSH transport for the Consul forward")
        node.forwards[key] = Forward(transport, *key)
    local = node.forwards[key].port
    if not use_tls:
        yield consul.Consul(host="127.0.0.1", port=local, connections_timeout=5)
        return
    if not all(p.exists() for p in admin):
        raise OverlaylabError(
            f"Consul on {node.name} serves HTTPS only and {directory} holds no admin certificate "
            f"({certs.CLIENT_CERT}, {certs.CLIENT_KEY}): restore tls.ca_dir, or re-run with --reissue-certs"
        )
    yield consul.Consul(
        host="127.0.0.1", port=local, scheme="https", verify=str(directory / certs.CA_CERT),
        cert=tuple(str(p) for p in admin), connections_timeout=5,
    )  # fmt: skip


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
