"""Step 3 (and 6): Consul on the manager, bound to its cluster address only, and the
registrations dockerd makes in it. The KV is read with the Consul client library
through an SSH forward, since the laptop may not reach the cluster network."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shlex
import time
from typing import Any

import consul
import requests

from overlaylab import render
from overlaylab.cluster import Node, consul_client
from overlaylab.errors import OverlaylabError
from overlaylab.facts import ROLE_LABEL, HostFacts
from overlaylab.inventory import FLAVOR_DATA_DIR, FLAVORS, Inventory
from overlaylab.plan import Action, Context, Scope, Step, foundation

SPEC_LABEL = "overlaylab.consul-spec"


def args(inv: Inventory, ip: str) -> list[str]:
    return [a.format(ip=ip, port=inv.consul_port) for a in FLAVORS[inv.consul_flavor]]


def spec_hash(inv: Inventory, ip: str) -> str:
    """What the Consul container was made from; a Consul made before the raft setting
    existed differs, and is recreated once with it."""
    text = "\0".join([inv.consul_image, inv.consul_flavor, *args(inv, ip), f"raft_multiplier={inv.raft_multiplier}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


VERSION_RE = re.compile(r"Consul v(\d+)\.(\d+)")


def raft_args(inv: Inventory, manager: Node) -> tuple[list[str], str]:
    """`-hcl` with the raft multiplier where the image's Consul takes it (1.0 and later: the
    flag; older ones, such as progrium/consul's 0.5.2, keep their own, already fast, timing)."""
    out = manager.sh(f"docker run --rm --entrypoint consul {shlex.quote(inv.consul_image)} version 2>&1 | head -n 1")
    match = VERSION_RE.search(out)
    if match and (int(match[1]), int(match[2])) >= (1, 0):
        return [
            "-hcl",
            f"performance {{ raft_multiplier = {inv.raft_multiplier} }}",
        ], f"raft_multiplier {inv.raft_multiplier}"
    version = match[0] if match else "its Consul"
    return [], f"{version} has no raft_multiplier"


def run_command(inv: Inventory, ip: str, extra: list[str] | None = None) -> str:
    """Host network: the manager's own dockerd restart then costs ~1 s instead of ~30 s
    (a published port makes dockerd call the store through its own port forward)."""
    q = shlex.quote
    parts = [
        "docker", "run", "-d", "--name", inv.consul_name, "--network", "host", "--restart", "always",
        "--label", f"{ROLE_LABEL}=consul", "--label", f"{SPEC_LABEL}={spec_hash(inv, ip)}",
        "-v", f"{inv.consul_volume}:{FLAVOR_DATA_DIR[inv.consul_flavor]}",
        inv.consul_image, *args(inv, ip), *(extra or []),
    ]  # fmt: skip
    return " ".join(q(p) for p in parts)


def state(inv: Inventory, manager: Node) -> tuple[str, str]:
    """('ok'|'create'|'recreate'|'refuse', why)."""
    data: dict[str, Any] | None = manager.facts.consul
    if data is None:
        return "create", "missing"
    labels = data.get("Config", {}).get("Labels") or {}
    if labels.get(ROLE_LABEL) != "consul":
        return (
            "refuse",
            f"a container named {inv.consul_name} exists and is not overlaylab's: rename it or set consul.name",
        )
    was, now = render.store_ip(manager.facts.dropin), manager.advertise_ip
    if was and now and was != now:  # read from the drop-in: dockerd may not answer while its store is away
        return (
            "refuse",
            f"the manager's cluster address changed from {was} to {now} ({manager.host.advertise}): Consul and "
            f"every worker's cluster store use {was}. Put {was} back, or run teardown-cluster and "
            "bootstrap-cluster again",
        )
    if labels.get(SPEC_LABEL) != spec_hash(inv, manager.advertise_ip):
        return "recreate", "image or arguments differ"
    if not data.get("State", {}).get("Running"):
        return "recreate", f"not running ({data.get('State', {}).get('Status', '?')})"
    return "ok", "running with the wanted image and arguments"


def create(inv: Inventory, manager: Node, recreate: bool) -> str:
    extra, timing = raft_args(inv, manager)
    remove = f"docker rm -f {shlex.quote(inv.consul_name)} >/dev/null && " if recreate else ""
    manager.sh(remove + run_command(inv, manager.advertise_ip, extra))
    return timing


def wait_leader(inv: Inventory, manager: Node, timeout: float = 60) -> str:
    """Until Consul names a leader; connections refused while it starts are retried."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with consul_client(manager, manager.advertise_ip, inv.consul_port) as client:
                leader = client.status.leader()
            if leader:
                return str(leader)
            last = "no leader yet"
        except (OverlaylabError, requests.RequestException, consul.ConsulException, OSError) as exc:
            last = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        time.sleep(0.5)
    raise OverlaylabError(
        f"Consul on {manager.advertise_ip}:{inv.consul_port} has no leader after {timeout:.0f}s: {last}"
    )


def registered(inv: Inventory, manager: Node) -> set[str]:
    """The `ip:port` of every dockerd registered under docker/nodes/."""
    with consul_client(manager, manager.advertise_ip, inv.consul_port) as client:
        _, keys = client.kv.get("docker/nodes/", keys=True)
    return {k.rsplit("/", 1)[-1] for k in keys or []}


def endpoints(inv: Inventory, manager: Node, network_id: str) -> dict[str, tuple[str, str]] | None:
    """The endpoints the store holds for the network: name -> (its IPv4 address, the cluster
    address of the host it is on); None if the store holds no such network."""
    prefix = "docker/network/v1.0"
    with consul_client(manager, manager.advertise_ip, inv.consul_port) as client:
        _, net = client.kv.get(f"{prefix}/network/{network_id}/")
        if net is None:
            return None
        _, records = client.kv.get(f"{prefix}/endpoint/{network_id}/", recurse=True)
    found = {}
    for record in records or []:
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            ep = json.loads(record["Value"])
            found[str(ep["name"])] = (str(ep["ep_iface"]["addr"]).split("/")[0], str(ep.get("locator", "")))
    return found


def network_endpoints(inv: Inventory, manager: Node) -> dict[str, tuple[str, str]] | None:
    """endpoints() of the network the manager's facts show; None when the store cannot tell
    (no network in the facts, the store away, an error): callers then take the careful way."""
    network_id = str((manager.facts.network or {}).get("Id", ""))
    if not network_id:
        return None
    try:
        return endpoints(inv, manager, network_id)
    except (OverlaylabError, requests.RequestException, consul.ConsulException, OSError):
        return None


def forget(inv: Inventory, manager: Node, ip: str) -> None:
    """Remove a dockerd's registration: one whose address moved, so that, restarted, it does
    not pick its own old address as the one gossip neighbour it joins (it would never retry)."""
    with consul_client(manager, manager.advertise_ip, inv.consul_port) as client:
        client.kv.delete(f"docker/nodes/{ip}:2376")


def wait_registered(inv: Inventory, manager: Node, wanted: dict[str, str], timeout: float = 45) -> dict[str, bool]:
    """host name -> registered, waiting until all are (dockerd registers shortly after start)."""
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    while True:
        with contextlib.suppress(OverlaylabError, requests.RequestException, consul.ConsulException, OSError):
            found = registered(inv, manager)  # Consul may still be starting: try again
        if all(f"{ip}:2376" in found for ip in wanted.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    return {name: f"{ip}:2376" in found for name, ip in wanted.items()}


def ours(manager: Node) -> bool:
    data = manager.facts.consul
    return data is not None and (data.get("Config", {}).get("Labels") or {}).get(ROLE_LABEL) == "consul"


class Consul(Step):
    """Consul on the manager, with a leader; nothing else proceeds without it."""

    name = "consul"
    scope = Scope.MANAGER

    def plan(self, ctx: Context, node: Node) -> Action:
        how, why = state(ctx.inv, node)
        early = foundation(ctx, node, how, why, "Consul is not running as wanted")
        if early is not None:
            return early
        if how == "ok":
            return Action(node.name, False, why, check=True)  # the run waits for its leader
        fresh = not node.facts.consul_volume

        def project(facts: HostFacts) -> None:
            labels = {ROLE_LABEL: "consul", SPEC_LABEL: spec_hash(ctx.inv, node.advertise_ip)}
            facts.consul = {"Config": {"Labels": labels}, "State": {"Running": True}}
            if fresh:  # an empty store: it answers, and holds no network
                facts.consul_volume, facts.store_leader, facts.network = True, "(new)", None

        return Action(node.name, True, f"{how} Consul ({why})", data=(how, why), project=project)

    def apply(self, ctx: Context, node: Node, action: Action) -> str:
        done = action.detail
        if action.change:
            how, why = action.data
            timing = create(ctx.inv, node, recreate=how == "recreate")
            done = f"{how}d ({why}{'' if node.facts.consul_volume else ', with an empty store'}; {timing})"
        leader = wait_leader(ctx.inv, node)
        if not node.facts.store_leader:  # the facts were read while the store did not answer
            ctx.stale.add(node.name)
        return f"{done}; leader {leader}"


class RemoveConsul(Step):
    """Teardown, and swarm mode (which needs no Consul): our Consul container and its volume go."""

    name = "consul"
    scope = Scope.MANAGER

    def __init__(self, why: str = "", report_absent: bool = True) -> None:
        self.why, self.report_absent = why, report_absent

    def plan(self, ctx: Context, node: Node) -> Action | None:
        if ctx.joining:
            return None  # join-node leaves the cluster's Consul alone
        if not ours(node):
            return Action(node.name, False, "absent") if self.report_absent else None

        def project(facts: HostFacts) -> None:
            facts.consul = None

        return Action(node.name, True, "remove Consul and its volume" + self.why, project=project)

    def apply(self, ctx: Context, node: Node, action: Action) -> str:
        name, data = shlex.quote(ctx.inv.consul_name), shlex.quote(ctx.inv.consul_volume)
        node.sh(f"docker rm -f {name} >/dev/null && docker volume rm -f {data} >/dev/null")
        return "removed" + self.why
