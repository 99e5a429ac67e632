"""Which overlay backend a cluster uses: the tutorial's Consul cluster store (kv), or
swarm mode, the only one Docker 23.0 and newer have. `auto` decides from the engines."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Protocol

from overlaylab.facts import INFO_TIMEOUT, HostFacts


class Node(Protocol):
    """What the mode needs of a host (cluster.Node has it): the mode sits below the cluster."""

    @property
    def name(self) -> str: ...

    facts: HostFacts


class Mode(str, Enum):
    """A str, so that the inventory, JSON documents and pytest markers keep plain words."""

    KV = "kv"
    SWARM = "swarm"
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value


MODES = tuple(m.value for m in Mode)  # what the inventory accepts
LAST_KV_ENGINE = (23, 0, 0)  # --cluster-store was removed in Engine 23.0


def engine_problem(node: Node) -> str | None:
    """Why this engine cannot join a Consul cluster store, or None."""
    f = node.facts
    version = f.version_tuple
    if version is None:
        if f.info_stalled and f.gossip_left_behind:
            return (
                f"docker info did not answer in {INFO_TIMEOUT} s, twice: its dockerd still gossips on "
                f"{f.gossip_left_behind}, which its cluster interface no longer has "
                f"({', '.join(f.advertise_ips) or 'no address'} now), and its store connections from there hang: "
                "re-run (a hung connection is one request's; a re-run restarts that dockerd, and the hosts "
                "whose overlay still sends to its old address, which a restart by hand would leave unknown)"
            )
        if f.info_stalled:
            return (
                f"docker info did not answer in {INFO_TIMEOUT} s (a dockerd with a cluster store stalls while it "
                "cannot reach the store: is the manager's Consul reachable at the address its drop-in names?)"
            )
        return f"cannot read the Docker engine version ({f.info_error or 'docker info gave nothing'})"
    if version >= LAST_KV_ENGINE:
        return (
            f"Docker {f.version} has no --cluster-store (removed in Engine 23.0; dockerd would refuse to start): "
            "use the swarm backend for this engine"
        )
    if not f.consul_backend:
        return (
            f"Docker {f.version} was built without the Consul cluster store (as Debian bookworm's 20.10.24 is): "
            "use an engine that has it, or the swarm backend"
        )
    return None


def resolve(wanted: str, nodes: Sequence[Node]) -> tuple[Mode, str]:
    """(mode, why). auto: kv when every engine has a Consul cluster store, else swarm."""
    if Mode(wanted) is not Mode.AUTO:
        return Mode(wanted), f"mode: {wanted} (inventory)"
    lacking = [f"{n.name} ({n.facts.version or '?'})" for n in nodes if engine_problem(n)]
    if lacking:
        return Mode.SWARM, "mode: auto picked swarm: no Consul cluster store on " + ", ".join(lacking)
    return Mode.KV, "mode: auto picked kv: every engine has a Consul cluster store"
