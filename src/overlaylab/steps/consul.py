"""Step 3 (and 6): Consul on the manager, bound to its cluster address only, and the
registrations dockerd makes in it. The KV is read with the Consul client library
through an SSH forward, since the laptop may not reach the cluster network."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import consul
import requests

from overlaylab import render, storetls
from overlaylab.cluster import Node
from overlaylab.consulapi import consul_client
from overlaylab.errors import OverlaylabError
from overlaylab.facts import ROLE_LABEL, HostFacts
from overlaylab.inventory import FLAVOR_DATA_DIR, FLAVORS, Inventory
from overlaylab.plan import Action, Context, Scope, Step, apply_at_once, fail, foundation
from overlaylab.ports import LOOPBACK
from overlaylab.steps.tls import CLOCK_SLACK, HostCert
from overlaylab.storetls import Listeners
from overlaylab.topology import Topology

SPEC_LABEL = "overlaylab.consul-spec"


KEY_DIR = "/etc/overlaylab/consul"  # root-only; the gossip key reaches Consul as a file, never on a command line
KEY_FILE = f"{KEY_DIR}/gossip.json"
KEY_MOUNT = "/overlaylab/gossip.json"
HA_MIN_VERSION = (1, 0)  # several HTTP addresses (loopback and the cluster's) and -hcl: Consul 1.0


def args(
    inv: Inventory, ip: str, role: str = "server", join: tuple[str, ...] = (), listeners: Listeners = ()
) -> list[str]:
    """The agent's arguments after the image. One server: the flavour's own (the tutorial's
    `-server -bootstrap`), its ports from a config file when it serves HTTPS. HA: servers
    expect their number and every agent retry-joins the servers; HTTP on loopback (this
    host's dockerd) and the cluster address (the admin's reads); the gossip key from a
    mounted file; no DNS (nothing uses it, and port 53 is often taken on a host)."""
    if not Topology.of(inv).ha:
        own = [a.format(ip=ip, port=inv.consul_port) for a in FLAVORS[inv.consul_flavor]]
        if storetls.config(listeners) is None:
            return own
        return [*(a for a in own if not a.startswith("-http-port=")), f"-config-file={storetls.CONFIG_MOUNT}"]
    lead = ["agent"] if inv.consul_flavor == "hashicorp" else []
    server = ["-server", f"-bootstrap-expect={len(Topology.of(inv).consul_servers)}"] if role == "server" else []
    secure = storetls.config(listeners) is not None  # its ports, and RPC's TLS, from that file
    ports = [f"-config-file={storetls.CONFIG_MOUNT}"] if secure else [f"-http-port={inv.consul_port}"]
    return [
        *lead, *server, f"-bind={ip}", f"-advertise={ip}", f"-client={LOOPBACK} {ip}",
        *ports, "-dns-port=-1", f"-config-file={KEY_MOUNT}",
        *[f"-retry-join={peer}" for peer in join if peer != ip],
    ]  # fmt: skip


def spec_hash(
    inv: Inventory, ip: str, role: str = "server", join: tuple[str, ...] = (), listeners: Listeners = ()
) -> str:
    """What the Consul container was made from; a Consul made before the raft setting
    existed differs, and is recreated once with it. Its TLS config counts only when it
    has one, so that a cluster without store TLS keeps its Consul."""
    made = [
        inv.consul_image, inv.consul_flavor, *args(inv, ip, role, join, listeners),
        f"raft_multiplier={inv.raft_multiplier}",
    ]  # fmt: skip
    tls_config = storetls.config(listeners)
    if tls_config is not None:
        made.append(tls_config)
    return hashlib.sha256("\0".join(made).encode()).hexdigest()[:16]


def version_problem(image: str, version_text: str) -> str | None:
    """HA mode's refusal of a Consul older than HA_MIN_VERSION (progrium/consul's registry
    image ships 0.5.2), from `consul version`'s first line."""
    match = VERSION_RE.search(version_text)
    if match and (int(match[1]), int(match[2])) >= HA_MIN_VERSION:
        return None
    full = re.search(r"Consul v[\d.]+", version_text)
    found = full[0] if full else f"no Consul version ({version_text.strip()[:80] or 'no output'})"
    need = ".".join(map(str, HA_MIN_VERSION))
    return (
        f"consul.servers > 1 needs Consul {need} or later in {image} (HTTP on loopback and the cluster "
        f"address at once); it has {found}: set consul.image to a newer Consul, or consul.servers: 1"
    )


def image_version(inv: Inventory, node: Node) -> str:
    return node.sh(f"docker run --rm --entrypoint consul {shlex.quote(inv.consul_image)} version 2>&1 | head -n 1")


VERSION_RE = re.compile(r"Consul v(\d+)\.(\d+)")


def raft_args(inv: Inventory, manager: Node) -> tuple[list[str], str]:
    """`-hcl` with the raft multiplier where the image's Consul takes it (1.0 and later: the
    flag; older ones, such as progrium/consul's 0.5.2, keep their own, already fast, timing)."""
    out = image_version(inv, manager)
    match = VERSION_RE.search(out)
    if match and (int(match[1]), int(match[2])) >= (1, 0):
        return [
            "-hcl",
            f"performance {{ raft_multiplier = {inv.raft_multiplier} }}",
        ], f"raft_multiplier {inv.raft_multiplier}"
    version = match[0] if match else "its Consul"
    return [], f"{version} has no raft_multiplier"


def run_command(
    inv: Inventory,
    ip: str,
    extra: list[str] | None = None,
    role: str = "server",
    join: tuple[str, ...] = (),
    listeners: Listeners = (),
) -> str:
    """Host network: the manager's own dockerd restart then costs ~1 s instead of ~30 s
    (a published port makes dockerd call the store through its own port forward)."""
    q = shlex.quote
    key = ["-v", f"{KEY_FILE}:{KEY_MOUNT}:ro"] if Topology.of(inv).ha else []
    key += storetls.mounts(listeners)
    if key and inv.consul_flavor == "hashicorp":
        # the official image's entrypoint drops Consul to its consul user, who cannot read the
        # root-only key or certificates; this variable (its own) keeps root, as progrium/consul runs
        key += ["-e", "CONSUL_DISABLE_PERM_MGMT=1"]
    served = ["--label", f"{storetls.LABEL}={storetls.encode(listeners)}"] if listeners else []
    parts = [
        "docker", "run", "-d", "--name", inv.consul_name, "--network", "host", "--restart", "always",
        "--label", f"{ROLE_LABEL}=consul",
        "--label", f"{SPEC_LABEL}={spec_hash(inv, ip, role, join, listeners)}", *served,
        "-v", f"{inv.consul_volume}:{FLAVOR_DATA_DIR[inv.consul_flavor]}", *key,
        inv.consul_image, *args(inv, ip, role, join, listeners), *(extra or []),
    ]  # fmt: skip
    return " ".join(q(p) for p in parts)


def state(
    inv: Inventory, manager: Node, role: str = "server", join: tuple[str, ...] = (), listeners: Listeners = ()
) -> tuple[str, str]:
    """('ok'|'create'|'recreate'|'refuse', why), of the Consul a host runs (``manager``: the
    manager alone in single-server mode; any host in HA mode)."""
    data: dict[str, Any] | None = manager.facts.consul
    if data is None:
        return "create", "missing"
    labels = data.get("Config", {}).get("Labels") or {}
    if labels.get(ROLE_LABEL) != "consul":
        return (
            "refuse",
            f"a container named {inv.consul_name} exists and is not overlaylab's: rename it or set consul.name",
        )
    if manager.name == Topology.of(inv).manager:
        gone = moved(manager)
        if gone:
            return "refuse", gone
    if labels.get(SPEC_LABEL) != spec_hash(inv, manager.advertise_ip, role, join, listeners):
        if storetls.served(data, inv.consul_port) != (listeners or storetls.plain(inv.consul_port)):
            return "recreate", f"to serve {storetls.encode(listeners or storetls.plain(inv.consul_port))}"
        return "recreate", "image or arguments differ"
    if not data.get("State", {}).get("Running"):
        return "recreate", f"not running ({data.get('State', {}).get('Status', '?')})"
    if storetls.config(listeners) is not None:
        since = storetls.started(data)
        if since and HostCert.of(manager.facts).newest > since + CLOCK_SLACK:
            return "recreate", "its TLS certificate was written after it started (Consul reads it at start)"
    return "ok", "running with the wanted image and arguments"


def moved(manager: Node) -> str | None:
    """The manager's cluster address is not the one its drop-in points every dockerd's store
    at. Read from the drop-in: dockerd may not answer while its store is away (workers'
    `docker info` then stalls for seconds). HA mode's stores are each host's own agent."""
    was, now = render.store_ip(manager.facts.dropin), manager.advertise_ip
    if not (was and now and was != now and was != LOOPBACK):
        return None
    return (
        f"the manager's cluster address changed from {was} to {now} ({manager.host.advertise}): Consul and "
        f"every worker's cluster store use {was}. Put {was} back, or run teardown and "
        "bootstrap-cluster again"
    )


def create(
    inv: Inventory,
    manager: Node,
    recreate: bool,
    role: str = "server",
    join: tuple[str, ...] = (),
    listeners: Listeners = (),
) -> str:
    extra, timing = raft_args(inv, manager) if role == "server" else ([], "agent")
    remove = f"docker rm -f {shlex.quote(inv.consul_name)} >/dev/null && " if recreate else ""
    tls_config = storetls.config(listeners)
    if tls_config is not None:
        manager.put_secret(storetls.CONFIG_FILE, tls_config)
    manager.sh(remove + run_command(inv, manager.advertise_ip, extra, role, join, listeners))
    return timing


def wait_leader(inv: Inventory, manager: Node, timeout: float = 60) -> str:
    """Until Consul names a leader; connections refused while it starts are retried."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with consul_client(inv, manager) as client:
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
    with consul_client(inv, manager) as client:
        _, keys = client.kv.get("docker/nodes/", keys=True)
    return {k.rsplit("/", 1)[-1] for k in keys or []}


def endpoints(inv: Inventory, manager: Node, network_id: str) -> dict[str, tuple[str, str]] | None:
    """The endpoints the store holds for the network: name -> (its IPv4 address, the cluster
    address of the host it is on); None if the store holds no such network."""
    prefix = "docker/network/v1.0"
    with consul_client(inv, manager) as client:
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
    with consul_client(inv, manager) as client:
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


def running(node: Node) -> bool:
    """Our Consul container on this host runs (as the facts saw it)."""
    return ours(node) and bool((node.facts.consul or {}).get("State", {}).get("Running"))


def key_document(key: str) -> str:
    return json.dumps({"encrypt": key}) + "\n"


def new_key() -> str:
    """Consul's gossip key: 32 random bytes, base64 (what `consul keygen` makes)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def read_key(node: Node) -> str:
    """The gossip key from a host that has it; kept in memory only, never printed."""
    try:
        return str(json.loads(node.sh(f"cat {KEY_FILE}"))["encrypt"])
    except (ValueError, KeyError, TypeError):
        raise OverlaylabError(f"{KEY_FILE} on {node.name} holds no gossip key") from None


def join_list(inv: Inventory, nodes: Mapping[str, Node]) -> tuple[str, ...]:
    """HA mode: the servers' cluster addresses, which every agent retry-joins; () otherwise."""
    topo = Topology.of(inv)
    return tuple(nodes[n].advertise_ip for n in topo.consul_servers if n in nodes) if topo.ha else ()


def servers_up(inv: Inventory, nodes: Mapping[str, Node]) -> tuple[list[str], list[str]]:
    """HA mode: (the servers whose Consul of ours runs, those where it exists in any state).
    A server host that did not answer is in neither."""
    present = [n for n in Topology.of(inv).consul_servers if n in nodes and ours(nodes[n])]
    up = [n for n in present if running(nodes[n])]
    return up, present


def leader(inv: Inventory, nodes: Mapping[str, Node]) -> str:
    """HA mode's leader as the running servers say it; "" when there is none. Fewer than a
    quorum cannot keep a leader, whatever a server still says (for a few seconds after the
    others stopped it names the last one)."""
    up, _ = servers_up(inv, nodes)
    if len(up) < Topology.of(inv).quorum:
        return ""
    return next((nodes[n].facts.store_leader for n in up if nodes[n].facts.store_leader), "")


def quorum_line(inv: Inventory, nodes: Mapping[str, Node]) -> str:
    """What an operator asks first of HA mode: is there a leader, and how many servers run."""
    up, _ = servers_up(inv, nodes)
    leader_now = leader(inv, nodes)

    def why(n: str) -> str:
        return (
            "unreachable" if n not in nodes else (nodes[n].facts.consul or {}).get("State", {}).get("Status", "missing")
        )

    servers = Topology.of(inv).consul_servers
    down = [f"{n} ({why(n)})" for n in servers if n not in up]
    head = f"Consul: leader {leader_now}" if leader_now else "Consul: no leader"
    return f"{head}, {len(up)} of {len(servers)} servers up" + (f"; down: {', '.join(down)}" if down else "")


def quorum_problem(inv: Inventory, nodes: Mapping[str, Node]) -> str | None:
    """HA mode, once its servers were made: fewer than a majority of them run. The store then
    can be neither read nor written, and a run could only plan from facts that cannot tell
    what the store holds; so it refuses, changing nothing, and says how to bring them back."""
    topo = Topology.of(inv)
    if not topo.ha:
        return None
    up, present = servers_up(inv, nodes)
    need = topo.quorum
    if len(present) < need or len(up) >= need:
        return None  # not made yet (the switch from one server), or a quorum runs
    return (
        f"{quorum_line(inv, nodes)}. Without a quorum ({need} of {len(topo.consul_servers)}) the store can be neither "
        f"read nor written: start the stopped servers (docker start {inv.consul_name} on each) or bring their "
        "hosts back, then re-run"
    )


@dataclass
class ConsulPlan:
    """What the Consul step's plan hands its apply for one host."""

    how: str  # ok | create | recreate
    why: str
    role: str  # server | agent
    join: tuple[str, ...]  # the servers it retry-joins (HA)
    key: bool  # HA's gossip key to write first
    listeners: Listeners
    secret: str = ""  # the gossip key, read or made once for all hosts by apply_all


class Consul(Step[ConsulPlan]):
    """Consul with a leader; nothing else proceeds without it. One server on the manager,
    or (HA) 3 or 5 servers and a client agent on every other host, gossip encrypted.

    With ``round_two`` it is round 2 of moving the store between HTTP and HTTPS
    (storetls.py): the wanted scheme alone on consul.port, once the dockerds moved to
    round 1's second port; nothing (not even a line) when there is no move."""

    name = "consul"
    scope = Scope.MANAGER

    def __init__(self, round_two: bool = False) -> None:
        self.round_two = round_two

    def listeners(self, ctx: Context) -> Listeners:
        dropins = [ctx.nodes[n].facts.dropin for n in ctx.topo.hosts if n in ctx.nodes]
        return storetls.wanted(ctx.inv, dropins, self.round_two)

    def hosts(self, ctx: Context) -> list[str]:
        return ctx.live(list(ctx.topo.hosts)) if ctx.topo.ha or not ctx.joining else super().hosts(ctx)

    def plan(self, ctx: Context, node: Node) -> Action[ConsulPlan] | None:
        role = ctx.topo.consul_role(node.name)
        if role is None:
            if node.facts.containers.get(ctx.inv.consul_name) == "consul":
                why = (
                    "a Consul agent of HA mode runs here, and consul.servers is 1: going back to one server "
                    "is not done by a re-run; run teardown, then bootstrap-cluster (docs/ha-consul.md)"
                )
                return Action(node.name, False, why, refusal=why)
            return None
        join = join_list(ctx.inv, ctx.nodes)
        listeners = self.listeners(ctx)
        if self.round_two and (ctx.joining or storetls.served(node.facts.consul, ctx.inv.consul_port) == listeners):
            return None
        how, why = state(ctx.inv, node, role, join, listeners)
        if role == "server" or how == "refuse":  # join-node may start an agent, not the servers
            early = foundation(ctx, node, how, why, "Consul is not running as wanted")
            if early is not None:
                return early
        key_missing = ctx.topo.ha and not node.facts.gossip_key
        if ctx.topo.ha:
            digests = {ctx.nodes[n].facts.gossip_key for n in ctx.topo.hosts} - {""}
            if len(digests) > 1:
                why = f"the hosts hold different gossip keys in {KEY_FILE}: keep one on every host, or teardown first"
                return Action(node.name, False, why, refusal=why)
        if how == "ok" and not key_missing:
            # the run waits for a leader through the manager; a running agent is not asked again
            return Action(node.name, False, why, check=node.name == ctx.topo.manager)
        fresh = not node.facts.consul_volume
        what = f"{how} Consul {role if ctx.topo.ha else ''}".rstrip() + f" ({why})" if how != "ok" else ""
        detail = "; ".join(x for x in (what, "write the gossip key" if key_missing else "") if x)

        def project(facts: HostFacts) -> None:
            labels = {ROLE_LABEL: "consul", SPEC_LABEL: spec_hash(ctx.inv, node.advertise_ip, role, join, listeners)}
            facts.consul = {"Config": {"Labels": labels}, "State": {"Running": True}}
            if listeners:
                storetls.set_served(facts.consul, listeners)
            facts.containers[ctx.inv.consul_name] = "consul"
            if key_missing:
                facts.gossip_key = "(written)"
            if how != "ok":  # the store goes away for a while (steps/watches.py)
                ctx.ledger.consul_made.add(node.name)
            if ctx.topo.ha and how != "ok" and facts.cluster_store:  # its dockerd ran without its store
                ctx.ledger.stores_made.add(node.name)
            if fresh and role == "server" and node.name == ctx.topo.manager:  # an empty store: it answers, no network
                facts.consul_volume, facts.store_leader, facts.network = True, "(new)", None

        plan = ConsulPlan(how, why, role, join, key_missing, listeners)
        return Action(node.name, True, detail, data=plan, project=project)

    def apply_all(self, ctx: Context, actions: list[Action[ConsulPlan]]) -> None:
        """HA: the gossip key first (read from a host that has it, else made once), then the
        servers at once and their leader, then the agents at once."""
        if not ctx.topo.ha:
            return super().apply_all(ctx, actions)
        if any(a.change and a.payload().key for a in actions):
            holder = next((ctx.nodes[n] for n in ctx.topo.hosts if ctx.nodes[n].facts.gossip_key), None)
            try:
                key = read_key(holder) if holder is not None else new_key()
            except (OverlaylabError, OSError) as exc:
                for a in actions:
                    fail(ctx, self.name, a.host, f"the gossip key could not be read: {exc}")
                return None
            for a in actions:
                if a.change:
                    a.payload().secret = key
        servers = [a for a in actions if ctx.topo.consul_role(a.host) == "server"]
        apply_at_once(ctx, self, servers)
        manager = ctx.manager
        if manager.name not in ctx.ledger.failed:
            try:
                wait_leader(ctx.inv, manager)
            except OverlaylabError as exc:
                fail(ctx, self.name, manager.name, str(exc))
                return None
        apply_at_once(ctx, self, [a for a in actions if a not in servers])
        return None

    def apply(self, ctx: Context, node: Node, action: Action[ConsulPlan]) -> str:
        done = action.detail
        if action.change:
            data = action.payload()
            if data.key:
                node.put_secret(KEY_FILE, key_document(data.secret))
            if data.how != "ok":
                listeners = data.listeners
                secure = storetls.config(listeners) is not None
                if secure and ctx.ca is not None:  # our client's certificate, before Consul asks for one
                    made = ctx.ca.admin()
                    if made:
                        ctx.ca.events.append(made)
                timing = create(ctx.inv, node, data.how == "recreate", data.role, data.join, listeners)
                if listeners:  # the leader is asked where Consul now serves (the facts are read later)
                    node.facts.consul = node.facts.consul or {}
                    storetls.set_served(node.facts.consul, listeners)
                empty = "" if node.facts.consul_volume or node.name != ctx.topo.manager else ", with an empty store"
                done = f"{data.how}d ({data.why}{empty}; {timing})"
                if data.key:
                    done += "; gossip key written"
        if ctx.topo.ha and ctx.topo.consul_role(node.name) == "server":
            return done  # the leader is awaited once all servers run (apply_all)
        leader = wait_leader(ctx.inv, node)
        if node.name == ctx.topo.manager and not node.facts.store_leader:  # read while the store did not answer
            ctx.ledger.stale.add(node.name)
        return f"{done}; leader {leader}"


class RemoveConsul(Step[None]):
    """Teardown, and swarm mode (which needs no Consul): every Consul container of ours
    (the server, or HA mode's servers and agents), its volume and the gossip key go."""

    name = "consul"
    scope = Scope.ALL

    def __init__(self, why: str = "", report_absent: bool = True) -> None:
        self.why, self.report_absent = why, report_absent

    def plan(self, ctx: Context, node: Node) -> Action[None] | None:
        if ctx.joining:
            return None  # join-node leaves the cluster's Consul alone
        f = node.facts
        if not ours(node) and f.containers.get(ctx.inv.consul_name) != "consul" and not f.gossip_key:
            return Action(node.name, False, "absent") if self.report_absent and node.name == ctx.topo.manager else None

        def project(facts: HostFacts) -> None:
            facts.consul, facts.gossip_key = None, ""
            facts.containers.pop(ctx.inv.consul_name, None)

        return Action(node.name, True, "remove Consul and its volume" + self.why, project=project)

    def apply(self, ctx: Context, node: Node, action: Action[None]) -> str:
        name, data = shlex.quote(ctx.inv.consul_name), shlex.quote(ctx.inv.consul_volume)
        node.sh(f"docker rm -f {name} >/dev/null && docker volume rm -f {data} >/dev/null && rm -rf {KEY_DIR}")
        return "removed" + self.why
