"""Mutual TLS for the Docker API (issue 12, `tls: {docker_api: true}`): each host's server
certificate, signed by the cluster's CA on the admin's machine (certs.py), in a root-only
directory; the drop-in flags that serve the API on tcp/2376 to holders of that CA's
certificates alone, as docker-machine's hosts did; renewal 30 days before expiry.

dockerd reads its certificate once, at start: a certificate written after the running
daemon started is not served until it restarts (``reload_reason``), on that host alone.
"""

from __future__ import annotations

import base64
import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from overlaylab import certs, storetls
from overlaylab.cluster import Node
from overlaylab.facts import HOST_CA, HOST_CERT, HOST_KEY, HOST_TLS, HostFacts
from overlaylab.inventory import Inventory
from overlaylab.plan import Action, Context, Scope, Step

# a daemon's start time comes from `ps -o etimes` (whole seconds, read against `date`):
# a certificate must be this much newer than the start to count as written after it
CLOCK_SLACK = 2


def served(dropin: str | None) -> bool:
    """The drop-in uses the TLS files: it serves the API with them, or reaches its store with
    them (storetls.py); they must stay while it does, and dockerd reads them at start."""
    return bool(dropin) and HOST_CERT in (dropin or "")


def wanted(inv: Inventory, store: bool) -> bool:
    """The hosts need certificates: the API over TLS, or (``store``: kv mode) the store."""
    return inv.tls.docker_api or (store and inv.tls.store)


@dataclass(frozen=True)
class HostCert:
    """What a host has in HOST_TLS, from its facts (the key's content is never read)."""

    ca: bytes | None
    cert: x509.Certificate | None
    key: bool
    newest: int  # the latest mtime of the three; 0 when none is there

    @classmethod
    def of(cls, f: HostFacts) -> HostCert:
        def pem(path: str) -> bytes | None:
            entry = f.tls_files.get(path)
            return base64.b64decode(entry[1]) if entry and entry[1] != "-" else None

        raw = pem(HOST_CERT)
        try:
            cert = x509.load_pem_x509_certificate(raw) if raw else None
        except ValueError:
            cert = None
        return cls(pem(HOST_CA), cert, HOST_KEY in f.tls_files, max((m for m, _ in f.tls_files.values()), default=0))


def wanted_names(node: Node) -> tuple[list[str], list[str]]:
    resolved = str(getattr(node.conn, "host", "") or "")
    f = node.facts
    return certs.host_names(node.name, f.hostname, node.host.address, resolved, node.advertise_ip)


def day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d")


def state(ctx: Context, node: Node) -> tuple[str, str]:
    """('ok'|'install'|'renew'|'refuse', why) for a host's server certificate."""
    have = HostCert.of(node.facts)
    keeper = ctx.ca
    assert keeper is not None, "the Certs step runs only where TLS is on, with the cluster's CA read"
    ca = keeper.current
    if have.cert is None or not have.key or have.ca is None:
        missing = [n for n, there in (("ca.pem", have.ca), ("server.pem", have.cert), ("key", have.key)) if not there]
        return "install", f"no server certificate in {HOST_TLS} ({', '.join(missing)} missing)"
    if keeper.reissue:
        return "renew", "--reissue-certs: a new CA signs a new certificate"
    if ca is None or not ca.signed(have.cert):
        issuer = have.cert.issuer.rfc4514_string()
        where = f"{keeper.directory} holds no CA" if ca is None else f"not by the CA in {keeper.directory}"
        return "refuse", (
            f"its certificate in {HOST_CA} was signed by another CA ({issuer}; {where}): restore that CA's "
            "directory (tls.ca_dir), or pass --reissue-certs to make a new CA and new certificates for every host"
        )
    expires = certs.expires(have.cert)
    if have.ca != ca.pem:
        return "renew", "its ca.pem is not the cluster CA's"
    if certs.needs_renewal(have.cert):
        return "renew", f"it expires on {day(expires)}, within {certs.RENEW_WITHIN.days} days"
    ips, names = wanted_names(node)
    if not certs.covers(have.cert, ips, names):
        have_ips, have_names = certs.sans(have.cert)
        missing = sorted((set(ips) - have_ips) | (set(names) - have_names))
        return "renew", f"it does not name {', '.join(missing)}"
    return "ok", f"server certificate valid until {day(expires)}"


def expiry(node: Node) -> str:
    """`fab status`: the host's server certificate's last day, "" when it has none."""
    cert = HostCert.of(node.facts).cert
    if cert is None:
        return ""
    renew = " (due: a re-run renews it)" if certs.needs_renewal(cert) else ""
    return day(certs.expires(cert)) + renew


def reload_reason(node: Node) -> str | None:
    """A certificate newer than the running dockerd: not served until it restarts."""
    f = node.facts
    if not served(f.dropin) or not f.docker_started:
        return None
    newest = HostCert.of(f).newest
    if newest > f.docker_started + CLOCK_SLACK:
        return "its TLS certificate was written after dockerd started (it reads it at start): restarted to use it"
    return None


def probe(
    address: str,
    ca_file: Path,
    client: Path | None,
    timeout: float = 10,
    port: int = certs.API_PORT,
    path: str = "/info",
) -> tuple[bool, str]:
    """GET /info on a host's API, as `docker --tlsverify` would: the server must prove the
    address with a certificate of ``ca_file``'s CA; ``client`` is a DOCKER_CERT_PATH-shaped
    directory whose certificate is presented (None: none). (answered 200, what happened).
    ``port`` and ``path``: another TLS server of the cluster's CA (Consul, storetls.py)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(client / certs.CLIENT_CERT, client / certs.CLIENT_KEY)
    try:
        with (
            socket.create_connection((address, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=address) as conn,
        ):
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    except (ssl.SSLError, OSError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return status.split()[1:2] == ["200"], status


class Certs(Step[str]):
    """The certificate each host serves the API (and Consul, the store) with, and presents to
    the store; a new one where it is missing, expires within 30 days, lacks one of the
    host's names, or (--reissue-certs) always. ``store``: kv mode, where `tls.store` counts."""

    name = "certs"

    def __init__(self, store: bool = False) -> None:
        self.store = store

    def plan(self, ctx: Context, node: Node) -> Action[str] | None:
        if not wanted(ctx.inv, self.store):
            return None
        what, why = state(ctx, node)
        if what == "refuse":
            return Action(node.name, False, why, refusal=why)
        if what == "ok":
            return Action(node.name, False, why)

        def project(facts: HostFacts) -> None:  # written now: newer than the running dockerd
            stamp = (facts.docker_started or 0) + CLOCK_SLACK + 1
            facts.tls_files = {**facts.tls_files, HOST_KEY: (stamp, "-")}
            facts.tls_files.update({p: (stamp, e) for p, (_, e) in facts.tls_files.items() if p != HOST_KEY})

        verb = "install a server certificate" if what == "install" else "renew the server certificate"
        return Action(node.name, True, f"{verb} ({why})", project=project, data=what)

    def apply(self, ctx: Context, node: Node, action: Action[str]) -> str:
        assert ctx.ca is not None, "the Certs step runs only where TLS is on, with the cluster's CA read"
        ca = ctx.ca.authority()
        ips, names = wanted_names(node)
        cert, key = certs.issue(ca, node.facts.hostname or node.name, ips=ips, names=names)
        ca_pem = ca.pem
        node.put_secrets({HOST_CA: ca_pem.decode(), HOST_CERT: cert.decode(), HOST_KEY: key.decode()})
        until = day(certs.expires(x509.load_pem_x509_certificate(cert)))
        done = "server certificate installed" if action.data == "install" else "server certificate renewed"
        return f"{done}, valid until {until} for {', '.join([*ips, *names])}"


class RemoveCerts(Step[None]):
    """The TLS files go once no drop-in serves them: TLS turned off (after the drop-in
    lost its flags and dockerd restarted without them), or teardown."""

    name = "certs"
    scope = Scope.ALL

    def __init__(self, teardown: bool = False, store: bool = False) -> None:
        self.teardown, self.store = teardown, store

    def plan(self, ctx: Context, node: Node) -> Action[None] | None:
        if not node.facts.tls_files or (wanted(ctx.inv, self.store) and not self.teardown):
            return None
        if not self.teardown and node.name not in ctx.targets:
            return None
        if served(node.facts.dropin):  # its drop-in was not rewritten (that step failed): dockerd still reads them
            return Action(node.name, False, f"kept {HOST_TLS}: the drop-in still uses them")
        if not self.teardown and storetls.config(storetls.served(node.facts.consul, ctx.inv.consul_port)):
            return Action(node.name, False, f"kept {HOST_TLS}: Consul still serves HTTPS with them")
        why = "teardown" if self.teardown else "TLS is off"
        return Action(node.name, True, f"remove the TLS files in {HOST_TLS} ({why})", project=_gone)

    def apply(self, ctx: Context, node: Node, action: Action[None]) -> str:
        node.sh(f"rm -rf {HOST_TLS}")
        return f"removed {HOST_TLS}"


def _gone(facts: HostFacts) -> None:
    facts.tls_files = {}
