"""Consul's API from the admin's machine, through the host's SSH connection: the laptop
need not reach the cluster network. Beside storetls.py, which says where and how Consul
serves (HTTP, HTTPS, both while the store moves)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import consul
import paramiko
import requests

from overlaylab import certs, storetls
from overlaylab.cluster import Node
from overlaylab.errors import OverlaylabError
from overlaylab.inventory import Inventory
from overlaylab.storetls import Listeners


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
def consul_client(inv: Inventory, node: Node, listeners: Listeners | None = None) -> Iterator[consul.Consul]:
    """Consul's API on ``node``'s cluster address, through its SSH connection: the laptop need
    not reach the cluster network. Where Consul serves HTTPS (storetls.py), the admin's
    certificate is presented and Consul's is verified against the cluster's CA (it names
    127.0.0.1, the forward's end). ``listeners``: where it serves, when the caller read it already."""
    if listeners is None:
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


def leader_over_https(inv: Inventory, node: Node) -> str:
    """The leader as a Consul serving HTTPS alone says it (the facts script speaks plain HTTP
    only); "" when it runs no such Consul or does not answer, as the script would say."""
    data = node.facts.consul or {}
    served = storetls.served(data, inv.consul_port)
    if not (data.get("State") or {}).get("Running") or (storetls.HTTPS, inv.consul_port) not in served:
        return ""  # the script asked consul.port over plain HTTP: its answer stands
    try:
        with consul_client(inv, node, served) as client:
            return str(client.status.leader() or "")
    except (OverlaylabError, requests.RequestException, consul.ConsulException, OSError):
        return ""  # no answer, as the facts script would read it
