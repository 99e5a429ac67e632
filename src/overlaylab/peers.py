"""Stale peers: a host's overlay still sends an address to a host that serves no container there.

Why: Docker 20.10's legacy overlay learns where each container runs from gossip events (a
"join" or "leave" of an endpoint, libnetwork ``ov_serf.go``) into a peer table held in
memory, and programs the sandbox's kernel neighbour and FDB entries from it. Only a
"leave" removes an entry, and only the one with the leaving endpoint's ID: nothing
expires one, and a peer host that fails or leaves gossip takes none of its entries with
it. Leaves are lost when a host dies, and when a dockerd stops its containers in its own
shutdown or cleans up, starting again, those that died with the old one. And an entry
learned by a lookup, as a host learns every container that was already running elsewhere
when its dockerd started (``watchMiss`` adds it under the endpoint ID "dummy"), is never
removed by a leave at all. The entry then stays for the holding daemon's life.

It bites later: a container's MAC follows from its address (02:42 + the IPv4), so when
the address is given to a new container on another host, the table holds two entries
for the same key and the kernel keeps the first (``peerAddOp``'s "transient case"): the
new container is unreachable from that host, and its replies to it go astray. Measured
on the lab: a worker powered off with a container on it and powered on again, that
container removed; a new container on the manager got its address and did not answer the
other worker, whose FDB still sent the MAC to the powered-off host. In the HA module's
host-death fault, the fresh containers of a later check got two such addresses (a CI
failure, 2 runs in 5). Only a restart empties the holding dockerd's table: a restart
reason (steps/dockerd.py), under the --allow-restart rule.

An entry is judged only against a host of the run whose facts were read and whose dockerd
runs (its own containers on the network are the truth); one toward a host that does not
answer is left alone, and so is one toward an address no host has, except the old address
of a host whose move the run itself saw and restarted it for (toward_gone: the run's
ledger knows it; measured: after a worker's move every other host still sent its
containers' addresses to the old one, and their new joins did not replace them). A
container started on the other host between the two hosts' facts would look stale here
for that moment: a restart more, reported, never a loss."""

from __future__ import annotations

from collections.abc import Iterable

from overlaylab.cluster import Node


def local_addresses(node: Node) -> set[str]:
    """The addresses of the host's own containers on the network: `docker network inspect`
    lists them by container ID (another host's endpoints, if listed, by ``ep-<ID>``)."""
    containers = (node.facts.network or {}).get("Containers") or {}
    mine = [c for key, c in containers.items() if not key.startswith("ep-")]
    return {str(c.get("IPv4Address") or "").partition("/")[0] for c in mine} - {""}


def stale(node: Node, nodes: Iterable[Node]) -> dict[str, str]:
    """address -> the host this one's overlay sends it to, which runs no container there (kv mode)."""
    f = node.facts
    nid = str((f.network or {}).get("Id") or "")[:10]
    if not nid or "--cluster-store=" not in (f.dropin or "") or f.docker_active != "active":
        return {}
    serves = {  # VTEP -> (host, its containers' addresses)
        n.advertise_ip: (n.name, local_addresses(n))
        for n in nodes
        if n.name != node.name and n.advertise_ip and n.facts.docker_active == "active" and n.facts.network is not None
    }
    return {
        ip: serves[vtep][0]
        for ip, vtep in sorted(f.peers.get(nid, {}).items())
        if vtep in serves and ip not in serves[vtep][1]
    }


def toward_gone(node: Node, gone: dict[str, str]) -> dict[str, str]:
    """address -> the old cluster address (VTEP) this host's overlay still sends it to, of a
    host whose address moved and which this run restarted under its new one (``gone``: old
    address -> that host). The entries judged by stale() are toward live addresses only;
    these are toward one no host has any more, so only the run that saw the move knows them."""
    f = node.facts
    nid = str((f.network or {}).get("Id") or "")[:10]
    if not nid or not gone or f.docker_active != "active":
        return {}
    return {ip: vtep for ip, vtep in sorted(f.peers.get(nid, {}).items()) if gone.get(vtep, node.name) != node.name}


def describe_gone(found: dict[str, str], gone: dict[str, str]) -> str:
    where = ", ".join(f"{ip} to {gone[vtep]}'s old address {vtep}" for ip, vtep in found.items())
    return (
        f"its overlay still sends {where}, which that host no longer has (it moved, and its "
        "containers' leaves did not reach this host's table): traffic to those containers "
        "goes to an address no host holds; only a restart of its dockerd forgets them"
    )


def describe(found: dict[str, str]) -> str:
    """The reason, as the plan, `fab verify` and `fab status` say it."""
    where = ", ".join(f"{ip} to {host}" for ip, host in found.items())
    return (
        f"its overlay still sends {where}, where no such container runs "
        "(a leave it never got, or a lookup's entry, which no leave removes): "
        "a container given one of these addresses elsewhere would be unreachable from this host; "
        "only a restart of its dockerd forgets them"
    )


def stale_hosts(nodes: list[Node]) -> dict[str, str]:
    """host -> why, for every host whose overlay holds stale peers."""
    return {n.name: describe(found) for n in nodes if (found := stale(n, nodes))}
