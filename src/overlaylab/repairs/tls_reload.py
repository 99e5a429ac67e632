"""A TLS certificate newer than the running dockerd: it reads its certificates at start."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.plan import Context
from overlaylab.reasons import Repair, Seen
from overlaylab.steps import tls


class TlsReload(Repair):
    def why(self, ctx: Context, node: Node, seen: Seen) -> str | None:
        return tls.reload_reason(node)
