"""The drop-in a host should have (`10-machine.conf`): rendered from dockerd's command line
before overlaylab, the inventory's cluster flags, and where its store is served; beside
the one it has. The dockerd step writes it, the repairs and `fab status` compare it."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from overlaylab import certs, render, storetls
from overlaylab.cluster import Node
from overlaylab.facts import BACKUP_DIR, DROPIN, HOST_CA, HOST_CERT, HOST_KEY
from overlaylab.inventory import Inventory
from overlaylab.plan import Context
from overlaylab.ports import LOOPBACK
from overlaylab.storetls import Listener
from overlaylab.topology import Topology


@dataclass(frozen=True)
class DropIn:
    """The drop-in a host should have, next to the one it has."""

    node: Node
    wanted: str | None  # None: no drop-in (teardown when there was none before)
    current: str | None

    @property
    def changed(self) -> bool:
        return self.wanted != self.current

    @property
    def store_move(self) -> str:
        """Where its store moves (storetls.py's rounds), as the report says it; "" if it stays."""
        was, now = storetls.uses(self.current), storetls.uses(self.wanted)
        return f"{now[0]} on :{now[1]}" if was and now and was != now else ""

    def diff(self) -> str:
        before = (self.current or "").splitlines(keepends=True)
        after = (self.wanted or "").splitlines(keepends=True)
        label = f"{self.node.name}:{DROPIN}"
        return "".join(difflib.unified_diff(before, after, f"{label} (now)", f"{label} (wanted)"))


def flags() -> list[str]:
    """The docker-machine flags: the API on every interface, mutual TLS making that safe."""
    return [
        "-H",
        f"tcp://0.0.0.0:{certs.API_PORT}",
        "--tlsverify",
        f"--tlscacert={HOST_CA}",
        f"--tlscert={HOST_CERT}",
        f"--tlskey={HOST_KEY}",
    ]


def with_api(base: list[str]) -> list[str]:
    """The flags after dockerd's own; a command line with no -H listened on the default
    socket, which a -H of ours would otherwise take away, so it is named."""
    has_host = any(a in ("-H", "--host") or a.startswith(("-H", "--host=")) for a in base)
    return [*([] if has_host else ["-H", "unix:///var/run/docker.sock"]), *flags()]


def store_ip(inv: Inventory, manager_ip: str) -> str:
    """Where a dockerd finds its cluster store: the manager's Consul, or in HA mode its own
    host's agent (libkv's Consul backend takes a single address)."""
    return LOOPBACK if Topology.of(inv).ha else manager_ip


def dropin(inv: Inventory, node: Node, manager_ip: str, store: Listener | None = None) -> DropIn:
    """What the templates render for this host from dockerd's command line before overlaylab.
    ``store``: the scheme and port its store is reached at (default: where it ends up)."""
    base = render.base_command(node.facts.exec_start, node.facts.dropin)
    scheme, port = store or storetls.final(inv)[0]
    api = tuple(with_api(base)) if inv.tls.docker_api else ()
    secure = tuple(storetls.kv_opts()) if scheme == storetls.HTTPS else ()
    argv = render.cluster_argv(
        base, store_ip(inv, manager_ip), port, node.host.advertise, inv.extra_flags, inv.discovery, api, secure
    )
    wanted = render.render(inv.cluster, base, argv, BACKUP_DIR)
    return DropIn(node, wanted, node.facts.dropin)


def wanted(ctx: Context, node: Node) -> tuple[DropIn, Listener] | None:
    """The drop-in for this host, and where its store is served now; None where the manager
    did not answer (`fab status` goes on without it: its address is the store's)."""
    if ctx.topo.manager not in ctx.nodes:
        return None
    own = node if ctx.topo.ha else ctx.manager  # the Consul its store is: HA mode's own agent
    store = storetls.target(ctx.inv, storetls.served(own.facts.consul, ctx.inv.consul_port))
    return dropin(ctx.inv, node, ctx.manager.advertise_ip, store), store
