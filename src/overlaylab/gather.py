"""Reading the hosts' facts: one remote command per host (facts.py's script, every
section at once), parsed; the leader of a Consul that serves HTTPS alone asked through
the admin's client, since the script speaks plain HTTP. A run reads again wherever it
changed a host (plan.py)."""

from __future__ import annotations

import consul
import requests

from overlaylab import facts, ports, storetls
from overlaylab.cluster import Node, parallel
from overlaylab.consulapi import consul_client
from overlaylab.errors import InputError, OverlaylabError
from overlaylab.inventory import Inventory
from overlaylab.topology import Topology


def read_one(inv: Inventory, node: Node, only: tuple[str, ...] | None = None) -> None:
    """One remote command; read again by a run wherever it changed the host."""
    topo = Topology.of(inv)
    manager = node.name == topo.manager
    server = topo.ha and topo.consul_role(node.name) == "server"
    store = (
        facts.Store(inv.consul_name, inv.consul_volume, inv.consul_port, manager, server)
        if manager or topo.ha
        else None
    )
    _, out, err = node.result(facts.script(node.host.advertise, store, inv.network, ports.watched(inv), only))
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
