"""The kv backend (the tutorial's): leave any swarm; the hosts' certificates (tls); Consul
with a leader; the drop-ins, the manager first, Consul again, then the workers one at a
time (twice, only while the store moves between HTTP and HTTPS: storetls.py); every dockerd
registered; the network; an anchor per host; after any restart, every host's peers read
again and those the restarts left stale restarted too (steps/stale.py); a dockerd whose
store watch stopped made to watch again (steps/watches.py). No container
joins the overlay before its daemon's gossip is up (a sandbox made before gossip never
looks up its peers): the users' containers are held back over each restart
(steps/holdback.py), and a stopped run's held ones are released."""

from __future__ import annotations

from typing import Any

from overlaylab import repairs
from overlaylab.plan import Order, Scope, Step
from overlaylab.steps.anchor import Anchor, RemoveAnchor
from overlaylab.steps.consul import Consul, RemoveConsul
from overlaylab.steps.dockerd import Dockerd, RestoreDropin
from overlaylab.steps.holdback import Release
from overlaylab.steps.network import Network, RemoveNetwork
from overlaylab.steps.probes import RemoveProbes
from overlaylab.steps.reconnect import Reconnect
from overlaylab.steps.registered import Registered
from overlaylab.steps.stale import MendPeers
from overlaylab.steps.swarm import LeaveSwarm
from overlaylab.steps.tls import Certs, RemoveCerts
from overlaylab.steps.watches import StoreWatches

ANCHORS = True  # every host keeps an anchor container on the overlay (steps/anchor.py)

BOOTSTRAP: tuple[Step[Any], ...] = (
    LeaveSwarm(),
    Certs(store=True),
    Consul(),
    Dockerd(repairs.RESTARTS),
    Consul(round_two=True),
    Dockerd(repairs.RESTARTS, round_two=True),
    Registered(),
    Network(),
    Reconnect(),
    Release(),
    Anchor(),
    MendPeers(),
    StoreWatches(),
    RemoveCerts(store=True),
)

TEARDOWN: tuple[Step[Any], ...] = (
    RemoveProbes(),
    RemoveAnchor(Scope.ALL),
    RemoveNetwork(),
    RestoreDropin("restoring the drop-in", Order.WORKERS_FIRST, Scope.ALL, ours_only=False),
    RemoveCerts(teardown=True, store=True),
    RemoveConsul(),
)
