"""The swarm backend: no Consul and no cluster flags (a kv cluster before is undone
first, the manager first); the manager inits a swarm, the workers join, and the
network is an attachable swarm overlay."""

from __future__ import annotations

from typing import Any

from overlaylab.plan import Order, Scope, Step
from overlaylab.steps.anchor import RemoveAnchor
from overlaylab.steps.consul import RemoveConsul
from overlaylab.steps.dockerd import RestoreDropin, SwarmDropin
from overlaylab.steps.network import Network, RemoveNetwork
from overlaylab.steps.probes import RemoveProbes
from overlaylab.steps.swarm import LeaveSwarm, SwarmInit, SwarmJoin
from overlaylab.steps.tls import Certs, RemoveCerts

ANCHORS = False  # every host keeps an anchor container on the overlay (steps/anchor.py)

BOOTSTRAP: tuple[Step[Any], ...] = (
    RemoveAnchor(Scope.TARGETS, " (a kv-mode leftover)"),
    Certs(),
    SwarmDropin(),
    RemoveConsul(" (swarm mode needs no Consul)", report_absent=False),
    SwarmInit(),
    SwarmJoin(),
    Network("swarm"),
    RemoveCerts(),
)

TEARDOWN: tuple[Step[Any], ...] = (
    RemoveProbes(),
    RemoveAnchor(Scope.ALL),
    RemoveNetwork(),
    LeaveSwarm(teardown=True),
    RestoreDropin("restoring the drop-in", Order.WORKERS_FIRST, Scope.ALL, ours_only=False),
    RemoveCerts(teardown=True),
    RemoveConsul(),
)
