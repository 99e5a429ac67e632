"""TLS to the cluster store (issue 12, `tls: {store: true}`, kv mode).

Consul serves HTTPS with `verify_incoming`: only holders of a certificate of the
cluster's CA (each host's, which carries clientAuth, and the admin's) are answered. In
HA mode every agent does, and the servers' RPC takes TLS alone (`verify_outgoing` on
every agent). dockerd reaches its store with `kv.cacertfile/certfile/keyfile`;
overlaylab's own client, with the admin's certificate, through its SSH forward.

Moving a running cluster between plain HTTP and HTTPS takes two rounds, because one
Consul cannot serve both on ``consul.port``:

1. Consul serves the old scheme on ``consul.port`` and the new one on the next port;
   each dockerd moves to the new scheme there, one at a time, its store never away.
2. Consul serves the new scheme on ``consul.port`` alone; each dockerd moves back to it.

In HA mode "Consul" is every host's agent, and each dockerd moves with its own. Round
2's Consul restart leaves a dockerd without its store until its own restart, as every
restart of the manager's dockerd does (Consul is one of its containers).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from typing import Any

from overlaylab import render
from overlaylab.facts import HOST_CA, HOST_CERT, HOST_KEY, HOST_TLS
from overlaylab.inventory import Inventory

HTTP, HTTPS = "http", "https"
LABEL = "overlaylab.consul-listeners"  # what a Consul container of ours serves, "http:8500,https:8501"
MOUNT = "/overlaylab/tls"  # HOST_TLS inside Consul's container
CONFIG_FILE = "/etc/overlaylab/consul/tls.json"  # beside the gossip key (steps/consul.py KEY_DIR)
CONFIG_MOUNT = "/overlaylab/tls.json"

Listener = tuple[str, int]  # (scheme, port)
Listeners = tuple[Listener, ...]


def plain(port: int) -> Listeners:
    """What Consul served before issue 12, and serves with `tls.store` off."""
    return ((HTTP, port),)


def final(inv: Inventory) -> Listeners:
    return ((HTTPS if inv.tls.store else HTTP, inv.consul_port),)


def interim(inv: Inventory) -> Listeners:
    """Round 1: the old scheme stays on consul.port, the wanted one on the next port."""
    scheme, port = final(inv)[0]
    return ((HTTP if scheme == HTTPS else HTTPS, port), (scheme, port + 1))


def encode(listeners: Listeners) -> str:
    return ",".join(f"{scheme}:{port}" for scheme, port in listeners)


def served(consul: dict[str, Any] | None, port: int) -> Listeners:
    """What a Consul container of ours serves, from its label (none: plain HTTP, as before)."""
    labels = ((consul or {}).get("Config") or {}).get("Labels") or {}
    text = labels.get(LABEL)
    if not text:
        return plain(port)
    found = []
    for item in str(text).split(","):
        scheme, _, number = item.partition(":")
        if scheme in (HTTP, HTTPS) and number.isdigit():
            found.append((scheme, int(number)))
    return tuple(found) or plain(port)


def set_served(consul: dict[str, Any], listeners: Listeners) -> None:
    consul.setdefault("Config", {}).setdefault("Labels", {})[LABEL] = encode(listeners)


def config(listeners: Listeners) -> str | None:
    """Consul's -config-file for these listeners; None for plain HTTP alone (the agent's own
    -http-port, as before issue 12, so that a cluster without store TLS keeps its spec)."""
    if all(scheme == HTTP for scheme, _ in listeners):
        return None
    ports = dict(listeners)
    doc = {
        "ports": {"http": ports.get(HTTP, -1), "https": ports[HTTPS]},
        "ca_file": f"{MOUNT}/{HOST_CA.rsplit('/', 1)[1]}",
        "cert_file": f"{MOUNT}/{HOST_CERT.rsplit('/', 1)[1]}",
        "key_file": f"{MOUNT}/{HOST_KEY.rsplit('/', 1)[1]}",
        "verify_incoming": True,
        "verify_outgoing": True,
    }
    return json.dumps(doc, sort_keys=True) + "\n"


def mounts(listeners: Listeners) -> list[str]:
    """docker run's -v for the certificates and the config, read-only; none without TLS."""
    if config(listeners) is None:
        return []
    return ["-v", f"{HOST_TLS}:{MOUNT}:ro", "-v", f"{CONFIG_FILE}:{CONFIG_MOUNT}:ro"]


def kv_opts() -> list[str]:
    """dockerd's TLS to the store: it takes effect only when all three are set."""
    return [
        f"--cluster-store-opt=kv.cacertfile={HOST_CA}",
        f"--cluster-store-opt=kv.certfile={HOST_CERT}",
        f"--cluster-store-opt=kv.keyfile={HOST_KEY}",
    ]


def uses(dropin: str | None) -> Listener | None:
    """The scheme and port an overlaylab drop-in gives dockerd's store; None: no store."""
    match = render.STORE_RE.search(dropin or "")
    if match is None:
        return None
    return (HTTPS if f"kv.certfile={HOST_CERT}" in (dropin or "") else HTTP, int(match[2]))


def secure(dropin: str | None) -> bool:
    """The drop-in's dockerd reaches its store over HTTPS."""
    used = uses(dropin)
    return used is not None and used[0] == HTTPS


def wanted(inv: Inventory, dropins: Iterable[str | None], round_two: bool = False) -> Listeners:
    """What Consul should serve in this round: both schemes while a dockerd still uses the
    old one on consul.port, else the wanted scheme alone on consul.port."""
    if not round_two:
        old = interim(inv)[0]
        if any(uses(d) == old for d in dropins):
            return interim(inv)
    return final(inv)


def target(inv: Inventory, consul_serves: Listeners) -> Listener:
    """Where a dockerd's store should point, given what Consul serves (or will, once the
    steps before have run): the wanted listener, or round 1's second port."""
    want = final(inv)[0]
    if want in consul_serves:
        return want
    moved = (want[0], want[1] + 1)
    return moved if moved in consul_serves else want


def started(consul: dict[str, Any] | None) -> int:
    """When the Consul container last started, seconds since the epoch (0: unknown)."""
    text = str(((consul or {}).get("State") or {}).get("StartedAt") or "")
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", text)
    if not match or text.startswith("0001"):
        return 0
    return int(dt.datetime.fromisoformat(match[1]).replace(tzinfo=dt.timezone.utc).timestamp())
