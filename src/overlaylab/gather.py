"""Reading the hosts' facts: one remote command per host (facts.py's script, every
section at once), parsed; the leader of a Consul that serves HTTPS alone asked through
the admin's client, since the script speaks plain HTTP. A run reads again wherever it
changed a host (plan.py)."""

from __future__ import annotations

from overlaylab import facts, ports
from overlaylab.cluster import Node, parallel
from overlaylab.consulapi import leader_over_https
from overlaylab.errors import InputError
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
    script = facts.script(node.host.advertise, store, inv.network, ports.watched(inv), only)
    for _ in range(2):
        _, out, err = node.result(script)
        if facts.MARK + "end" not in out:
            raise InputError(f"{node.name}: reading facts failed (sudo?): {(err or out).strip()[-300:]}")
        node.facts = facts.parse(out, node.host.advertise, inv.network)
        # its cluster address moved: dockerd's store connections from the old address hang,
        # and the request that took one stalls (~5-20 s on the lab); the next gets a new one
        if not (node.facts.info_stalled and node.facts.gossip_left_behind):
            break
    if store is not None and (manager or server) and not node.facts.store_leader:
        node.facts.store_leader = leader_over_https(inv, node)


def read_facts(inv: Inventory, nodes: list[Node], only: tuple[str, ...] | None = None) -> None:
    """Facts for every node, in parallel, one remote command each; sudo failures are input errors."""

    def read(node: Node) -> None:
        read_one(inv, node, only)

    errors = parallel(nodes, read)
    if errors:
        raise InputError("\n".join(str(e) for e in errors.values()))
