"""What a repair is: a reason to mend one host, read from the facts (and the pass's ledger),
that answers why, or None. The repairs themselves are repairs/, one module each; the
dockerd step is handed their list by its pipeline and restarts for the first restart reason
that answers; `fab status` says that one and every other mend's. And the rule every
restart of overlaylab's follows: a user's containers stop only with --allow-restart."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from overlaylab.cluster import Node
from overlaylab.plan import Context


class Mend(Enum):
    """How a re-run mends what a repair finds: a restart of the host's dockerd (the dockerd
    step, for the first restart reason that answers), or a step of its own without one."""

    RESTART = "restarts its dockerd"
    STEP = "mends it without a restart"


@dataclass(frozen=True)
class Seen:
    """What `fab status` reads beyond the facts: the store's registrations (None: not read)."""

    registered: frozenset[str] | None = None


NOTHING_SEEN = Seen()  # a run's plan reads the facts alone


class Repair:
    """One reason; subclasses set ``mend`` and write ``why``."""

    mend: Mend = Mend.RESTART

    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        raise NotImplementedError


def first(repairs: Iterable[Repair], ctx: Context, node: Node, seen: Seen = NOTHING_SEEN) -> str | None:
    """The first reason of the list that answers for this host."""
    return next((why for r in repairs if (why := r.why(ctx, node, seen))), None)


def restart_refusal(node: Node, cause: str, allow_restart: bool) -> str | None:
    """A restart stops the host's running containers: a user's only with --allow-restart."""
    running = node.facts.foreign_containers
    if not running or allow_restart:
        return None
    return f"{cause}: restarting dockerd stops {', '.join(running)}; pass --allow-restart to go ahead"
