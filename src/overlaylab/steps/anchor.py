"""Step 7b: one small anchor container per host on the overlay network (KV mode).

Why: Docker 20.10's legacy overlay runs a `watchMiss` goroutine per overlay
sandbox on a thread locked into the sandbox's network namespace. When the last
local container leaves the network, the sandbox is deleted and the goroutine
returns with `UnlockOSThread` without switching the thread back: the thread goes
back to Go's pool inside a dead namespace. Any goroutine later scheduled on it
(Consul KV writes and watches, gossip push/pull) fails with "network is
unreachable", so a host can miss the names of remote containers for good
(measured on the lab: the first containers after an idle period, ~1 run in 3).
Keeping one container on the network keeps the sandbox, and so the thread,
alive. A daemon that already has such threads is restarted by the dockerd step.

No restart policy: after a dockerd restart the anchor must not join the network
before the daemon's gossip has joined the cluster (a sandbox created earlier never
learns its peers; on the manager, whose dockerd also hosts Consul, that is ~10 s
after start). overlaylab recreates it after every restart it makes, once the
daemon is ready.
"""

from __future__ import annotations

import shlex

from overlaylab.checks import verify
from overlaylab.cluster import Node
from overlaylab.facts import ANCHOR_PREFIX, ROLE_LABEL, HostFacts
from overlaylab.plan import Action, Context, Scope, Step
from overlaylab.steps import consul, network

PREFIX = ANCHOR_PREFIX
# It serves verify's stream (a run that changed something fetches it over TCP between the
# anchors). PID 1 must exit on SIGTERM, or every dockerd restart waits the 10 s stop timeout.
COMMAND = f"{verify.SERVE_STREAM}; trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"


def name(node: Node) -> str:
    """Per host: on a KV-backed overlay, endpoint (container) names are global to the network."""
    return PREFIX + node.name


def present(node: Node) -> bool:
    return node.facts.containers.get(name(node)) == "anchor"


def address(node: Node) -> str:
    """The anchor's address on the network, as the facts saw it; "" if none."""
    containers = (node.facts.network or {}).get("Containers") or {}
    found = [c for c in containers.values() if c.get("Name") == name(node)]
    return str(found[0].get("IPv4Address") or "").partition("/")[0] if found else ""


def create(
    node: Node,
    network: str,
    image: str = "busybox:latest",
    witness: Node | None = None,
    recorded: bool = True,
    ip: str = "",
) -> None:
    """(Re)create the anchor: a stopped one, or one that outlived a restart, is replaced.

    A record of our own name that outlived its container (its daemon stopped while the
    store was away, or was killed) would block the name with "endpoint with name ...
    already exists". `docker network disconnect -f` clears exactly that record, but only
    on a daemon that has no container of that name (moby#27398): so it runs on another
    host (``witness``) once the old anchor is gone, and on this one as a fallback. Where
    the store holds no record of the name (``recorded`` False), neither is needed.

    ``ip``: the address it had, asked for again (`--ip`). Docker 20.10's IPAM would give it
    the first free one, and a host that knew the old one by a lookup would go on sending
    it here for good (overlaylab/peers.py; the peers step would then restart that host).
    If the address is taken, or the network has no subnet of the user's (`--ip` needs
    one), the anchor takes any address, as before.
    """
    q = shlex.quote
    clear = f"docker network disconnect -f {q(network)} {name(node)} >/dev/null 2>&1; true" if recorded else "true"
    if witness is not None:
        node.sh(stop_command(node))
        witness.sh(clear)

    def run(options: str = "") -> str:
        return (
            f"docker run -d --name {name(node)} --restart no --label {ROLE_LABEL}=anchor --network {q(network)}"
            f"{options} {q(image)} sh -c {q(COMMAND)} >/dev/null"
        )

    start = run()
    if ip:  # a refused --ip leaves a created container behind: it goes before the plain run
        start = f"{{ {run(f' --ip {q(ip)}')} 2>/dev/null || {{ {stop_command(node)}; {start}; }}; }}"
    node.sh(f"{stop_command(node)}; {clear}; {start}")


def stop_command(node: Node) -> str:
    """Removes the anchor; run before overlaylab restarts the daemon, while the store still answers."""
    return f"docker rm -f {name(node)} >/dev/null 2>&1; true"


class Anchor(Step[None]):
    """kv: one anchor per host, recreated where this run restarted the daemon (it was
    removed before the restart, and must join only once gossip has)."""

    name = "anchor"
    scope = Scope.ALL

    def plan(self, ctx: Context, node: Node) -> Action[None]:
        action = self._action(ctx, node)
        if action.change and node.facts.attached.get(name(node)):  # one there already, made again
            ctx.ledger.moved.add(node.name)
        return action

    def _action(self, ctx: Context, node: Node) -> Action[None]:
        def made(_: HostFacts) -> None:  # for the steps after it: the peers step, verify
            ctx.ledger.anchors_made.add(node.name)

        if node.name in ctx.ledger.restarts:
            return Action(node.name, True, "create (dockerd restarted)", project=made)
        if present(node):
            on = node.facts.attached.get(name(node))
            if on and on.network_id in network.lost(ctx):  # the store lost the network it joined
                why = f"recreate (it is on the lost network {on.network_id[:12]})"
                return Action(node.name, True, why, project=made)
            return Action(node.name, False, "running")
        return Action(node.name, True, "create", project=made)

    def apply(self, ctx: Context, node: Node, action: Action[None]) -> str:
        others = [ctx.nodes[n] for n in ctx.live(ctx.topo.hosts) if n != node.name]
        held = consul.network_endpoints(ctx.inv, ctx.manager)
        recorded = held is None or name(node) in held  # the store cannot tell: the careful way
        pinned = node.facts.attached.get(name(node))  # a stopped one keeps the address it was made with
        ip = ctx.ledger.held_addresses.get(node.name) or address(node) or (pinned.ip if pinned else "")
        witness = others[0] if others and recorded else None
        create(node, ctx.inv.network, witness=witness, recorded=recorded, ip=ip)
        ctx.ledger.anchors_made.add(node.name)
        return "created"


class RemoveAnchor(Step[None]):
    """Teardown, and swarm mode (which needs no anchor): the anchor goes, running or not."""

    name = "anchor"

    def __init__(self, scope: Scope, why: str = "") -> None:
        self.scope, self.why = scope, why

    def plan(self, ctx: Context, node: Node) -> Action[None] | None:
        f = node.facts
        if f.containers.get(name(node)) != "anchor" and f.stopped.get(name(node)) != "anchor":
            return None

        def project(facts: HostFacts) -> None:
            facts.containers.pop(name(node), None)
            facts.stopped.pop(name(node), None)

        return Action(node.name, True, "remove" + self.why, project=project)

    def apply(self, ctx: Context, node: Node, action: Action[None]) -> str:
        node.sh(f"docker rm -f {name(node)} >/dev/null")
        return "removed" + self.why
