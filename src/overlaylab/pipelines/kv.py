"""The kv backend (the tutorial's): leave any swarm; Consul with a leader; the drop-ins,
the manager first, Consul again, then the workers one at a time; every dockerd
registered; the network; an anchor per host (gossip is up before any container joins
the overlay: a daemon whose gossip starts late never learns earlier endpoints)."""

from __future__ import annotations

from overlaylab.plan import Order, Scope, Step
from overlaylab.steps.anchor import Anchor, RemoveAnchor
from overlaylab.steps.consul import Consul, RemoveConsul
from overlaylab.steps.dockerd import Dockerd, RestoreDropin
from overlaylab.steps.network import Network, RemoveNetwork
from overlaylab.steps.reconnect import Reconnect
from overlaylab.steps.registered import Registered
from overlaylab.steps.swarm import LeaveSwarm
from overlaylab.steps.verify import RemoveProbes

BOOTSTRAP: tuple[Step, ...] = (
    LeaveSwarm(),
    Consul(),
    Dockerd(),
    Registered(),
    Network(),
    Reconnect(),
    Anchor(),
)

TEARDOWN: tuple[Step, ...] = (
    RemoveProbes(),
    RemoveAnchor(Scope.ALL),
    RemoveNetwork(),
    RestoreDropin("restoring the drop-in", Order.WORKERS_FIRST, Scope.ALL, ours_only=False),
    RemoveConsul(),
)
