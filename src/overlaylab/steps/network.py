"""The overlay network, created once on the manager; teardown removes it when it is ours and unused."""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from overlaylab.cluster import Node
from overlaylab.errors import OverlaylabError
from overlaylab.facts import ANCHOR_PREFIX, PROBE_PREFIX, ROLE_LABEL
from overlaylab.inventory import Inventory
from overlaylab.plan import Action, Context, Scope, Step

# The overlay driver's option is the MTU of the path *under* the overlay: its containers and
# its VXLAN device get that less the 50 bytes VXLAN adds (moby's overlay driver, maxMTU: 1500
# when the option is not set or 0). network.mtu is what the containers get, so the option is
# network.mtu + 50, and a network is compared by what its containers get.
MTU_OPTION = "com.docker.network.driver.mtu"
VXLAN_OVERHEAD = 50
DEFAULT_MTU = 1500 - VXLAN_OVERHEAD  # a network made without the option: 1450, whatever the host's NIC has


def effective_mtu(data: dict[str, Any]) -> int:
    """The MTU the network's containers get (an explicit network.mtu of 1450 and a network
    made without the option are the same)."""
    value = str((data.get("Options") or {}).get(MTU_OPTION) or "").strip().lstrip("+")
    return (int(value) if value.isdigit() and int(value) > 0 else 1500) - VXLAN_OVERHEAD


def differences(inv: Inventory, data: dict[str, Any], scope: str = "global") -> list[str]:
    """What differs from the wanted network; scope "swarm" also wants it attachable."""
    diffs = []
    if data.get("Driver") != "overlay":
        diffs.append(f"driver {data.get('Driver')}, wanted overlay")
    if data.get("Scope") != scope:
        diffs.append(f"scope {data.get('Scope')}, wanted {scope}")
    if scope == "swarm" and not data.get("Attachable"):
        diffs.append("not attachable, wanted --attachable")
    if inv.subnet:
        subnets = [c.get("Subnet") for c in (data.get("IPAM") or {}).get("Config") or []]
        if inv.subnet not in subnets:
            diffs.append(f"subnets {subnets or 'automatic'}, wanted {inv.subnet}")
    if inv.mtu is not None and effective_mtu(data) != inv.mtu:
        have = effective_mtu(data)
        diffs.append(f"MTU {have}, wanted {inv.mtu}: set network.mtu: {have} to keep it")
    return diffs


def exists(inv: Inventory, data: dict[str, Any]) -> str:
    return f"{inv.network} exists ({data.get('Id', '')[:12]}, {data.get('Scope')} scope)"


class Network(Step[list[str]]):
    """The overlay network, created once on the manager (swarm mode: attachable). One that
    exists with other settings is a refusal: reported, never deleted."""

    name = "network"
    scope = Scope.MANAGER

    def __init__(self, scope: str = "global") -> None:
        self.net_scope = scope

    def plan(self, ctx: Context, node: Node) -> Action[list[str]]:
        inv, data = ctx.inv, node.facts.network
        if data is None:
            gone = lost(ctx)
            if gone:
                ids = ", ".join(i[:12] for i in gone)
                why = f"recreate {inv.network}: the cluster store lost its definition (containers are on {ids})"
                return Action(node.name, True, why, data=gone, reads_back=True)
            if self.net_scope == "global" and not node.facts.store_leader:  # kv: the store did not answer
                why = f"{inv.network}: not known until Consul is back with its data (kept on {inv.consul_volume})"
                return Action(node.name, False, why)
            mtu = f" (MTU {inv.mtu})" if inv.mtu is not None else ""
            return Action(node.name, True, f"create {inv.network}{mtu}", reads_back=True)
        diffs = differences(inv, data, self.net_scope)
        if diffs:
            why = (
                f"network {inv.network} exists with other settings ({'; '.join(diffs)}); left as it is "
                "(made again, it would cut every container's connection): remove it yourself "
                f"(`docker network rm {inv.network}` once no container is on it) or choose another network.name"
            )
            return Action(node.name, False, why, refusal=why)
        return Action(node.name, False, exists(inv, data))

    def apply(self, ctx: Context, node: Node, action: Action[list[str]]) -> str:
        inv = ctx.inv
        extra = " --attachable" if self.net_scope == "swarm" else ""
        subnet = f" --subnet {shlex.quote(inv.subnet)}" if inv.subnet else ""
        mtu = f" --opt {MTU_OPTION}={inv.mtu + VXLAN_OVERHEAD}" if inv.mtu is not None else ""
        name = shlex.quote(inv.network)
        out = node.sh(
            f"docker network create --driver overlay{extra}{subnet}{mtu} --label {ROLE_LABEL}=network {name} "
            f">/dev/null && docker network inspect {name}"
        )
        created = json.loads(out)[0]  # read back: the manager's facts need no second read for the steps after
        node.facts.network, net_id = created, str(created["Id"])
        node.facts.overlays = sorted({*node.facts.overlays, inv.network})
        if not action.data:
            return f"created {inv.network} ({net_id[:12]})"
        left = stranded(ctx, action.data)
        ctx.report.extra["left_on_lost_network"] = left
        if left:
            ctx.report.note(
                f"containers of yours were left on the lost {inv.network} ({', '.join(i[:12] for i in action.data)}): "
                + "; ".join(f"{host}: {', '.join(names)}" for host, names in left.items())
                + f". They are connected to the new {inv.network} (the reconnect step), with their aliases and "
                "fixed addresses; none is removed."
            )
        return f"recreated {inv.network} with a new ID {net_id[:12]} (the lost one was {action.data[0][:12]})"


def lost(ctx: Context) -> list[str]:
    """IDs of a network by our name that containers are on but the store no longer has
    (Consul's data lost): the network must be created again, and its old ID named.

    Only a store that answered can have lost anything: while Consul is away (its
    container removed, its data kept) dockerd says "No such network" just the same."""
    m = ctx.manager.facts
    if not m.store_leader:
        return []
    current = (m.network or {}).get("Id")
    return sorted({a.network_id for n in ctx.nodes.values() for a in n.facts.attached.values()} - {current})


def ours(node: Node, container: str) -> bool:
    """An anchor or a probe: overlaylab's own, by its name (also once a dry pass projected it
    gone from the host's containers) or its role label."""
    labelled = node.facts.containers.get(container) or node.facts.stopped.get(container)
    return bool(labelled) or container.startswith((ANCHOR_PREFIX, PROBE_PREFIX))


def stranded(ctx: Context, gone: list[str]) -> dict[str, list[str]]:
    """host -> the user's containers on a lost network."""
    out = {}
    for host, node in sorted(ctx.nodes.items()):
        names = sorted(c for c, a in node.facts.attached.items() if a.network_id in gone and not ours(node, c))
        if names:
            out[host] = names
    return out


def holds_lost(ctx: Context, node: Node) -> str | None:
    """Why this dockerd must restart before the network the store lost can be made again:
    it keeps the lost one in memory. Where containers still run on it, its sandbox holds
    the VXLAN ID the new network gets again ("failed to create bridge ...: file exists");
    the manager, which creates it, holds its address pool ("Pool overlaps"). Both measured."""
    gone = lost(ctx)
    if not gone:
        return None
    head = f"the store lost {ctx.inv.network} ({', '.join(i[:12] for i in gone)}); this dockerd still"
    running = sorted(c for c, a in node.facts.attached.items() if a.running and a.network_id in gone)
    if running:
        return f"{head} runs it for {', '.join(running)}, and its VXLAN ID would block the new one"
    if node.name == ctx.topo.manager and ctx.manager.facts.network is None and ctx.inv.subnet:
        return f"{head} holds its address pool, which refuses {ctx.inv.subnet} to the new one"
    return None


def users(ctx: Context) -> list[str]:
    """Containers on the network that are not overlaylab's, on every host (each sees its own)."""
    found = []
    for node in ctx.nodes.values():
        data = node.facts.network or {}
        for container in (data.get("Containers") or {}).values():
            name = str(container.get("Name", ""))
            if name and not ours(node, name):
                found.append(name)
    return sorted(set(found))


RELEASE_WAIT = 30.0  # seconds teardown waits for the endpoints of containers just removed to leave the store


class RemoveNetwork(Step[None]):
    """Teardown: the network goes only when overlaylab made it and no container of the user is on it."""

    name = "network"
    scope = Scope.MANAGER

    def plan(self, ctx: Context, node: Node) -> Action[None]:
        inv, data = ctx.inv, node.facts.network
        if data is None:
            return Action(node.name, False, "absent")
        if (data.get("Labels") or {}).get(ROLE_LABEL) != "network":
            return Action(node.name, False, f"{inv.network} was not created by overlaylab: left alone")
        kept = users(ctx)
        if kept:
            return Action(node.name, False, f"{inv.network} kept: containers of yours are on it ({', '.join(kept)})")
        return Action(node.name, True, f"remove {inv.network}")

    def apply(self, ctx: Context, node: Node, action: Action[None]) -> str:
        """A container's endpoint leaves the store after `docker rm -f` returned (its daemon
        releases the network when it sees the exit): right after the anchors went, a host's
        may still count (seen in CI on the 5-host HA lab, 2 s after). No container of the
        user's is on it (the plan's read), so the removal waits for theirs to go, up to
        RELEASE_WAIT seconds, and then says what still holds it."""
        command = f"docker network rm {shlex.quote(ctx.inv.network)} >/dev/null"
        start = time.monotonic()
        while True:
            code, out, err = node.result(command)
            if code == 0:
                waited = time.monotonic() - start
                return f"removed {ctx.inv.network}" + (
                    f" (its last endpoints left in {waited:.1f}s)" if waited > 1 else ""
                )
            said = (err or out).strip()
            if "active endpoints" not in said or time.monotonic() - start > RELEASE_WAIT:
                raise OverlaylabError(f"{node.name}: `{command}` exited {code}: {said[-300:]}")
            time.sleep(1)
