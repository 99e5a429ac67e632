"""Step 7: the overlay network, created once on the manager. An existing one with
other settings is reported, never deleted."""

from __future__ import annotations

import json
import shlex
from typing import Any

from overlaylab.cluster import Node
from overlaylab.errors import OverlaylabError
from overlaylab.facts import ROLE_LABEL
from overlaylab.inventory import Inventory
from overlaylab.steps import anchor, verify


def differences(inv: Inventory, data: dict[str, Any], scope: str = "global") -> list[str]:
    """What differs from the wanted network; scope "swarm" also wants it attachable."""
    diffs = []
    if data.get("Driver") != "overlay":
        diffs.append(f"driver {data.get('Driver')}, wanted overlay")
    if data.get("Scope") != scope:
        diffs.append(f"scope {data.get('Scope')}, wanted {scope}")
    if scope == "swarm" and not data.get("Attachable"):
        diffs.append("not attachable, wanted --attachable")
    if inv.subnet:
        subnets = [c.get("Subnet") for c in (data.get("IPAM") or {}).get("Config") or []]
        if inv.subnet not in subnets:
            diffs.append(f"subnets {subnets or 'automatic'}, wanted {inv.subnet}")
    return diffs


def ensure(inv: Inventory, manager: Node, swarm: bool = False) -> tuple[bool, str]:
    data = manager.facts.network
    extra = " --attachable" if swarm else ""
    if data is not None:
        diffs = differences(inv, data, "swarm" if swarm else "global")
        if diffs:
            raise OverlaylabError(
                f"network {inv.network} exists with other settings ({'; '.join(diffs)}); left as it is, "
                "remove it yourself or choose another network.name"
            )
        return False, f"{inv.network} exists ({data.get('Id', '')[:12]}, {data.get('Scope')} scope)"
    subnet = f" --subnet {shlex.quote(inv.subnet)}" if inv.subnet else ""
    net_id = manager.sh(
        f"docker network create --driver overlay{extra}{subnet} --label {ROLE_LABEL}=network {shlex.quote(inv.network)}"
    ).strip()
    return True, f"created {inv.network} ({net_id[:12]})"


def refresh(inv: Inventory, node: Node) -> None:
    """Re-read the network after this run changed the daemon (a restart, a new swarm)."""
    code, out, _ = node.result(f"docker network inspect {shlex.quote(inv.network)} 2>/dev/null")
    data = json.loads(out) if code == 0 and out.strip() else []
    node.facts.network = data[0] if data else None


def remove(inv: Inventory, manager: Node) -> str | None:
    """Teardown: remove the network only when no container of the user is on it."""
    data = manager.facts.network
    if data is None:
        return None
    if (data.get("Labels") or {}).get(ROLE_LABEL) != "network":
        return f"{inv.network} was not created by overlaylab: left alone"
    users = manager.sh(
        f"docker network inspect {shlex.quote(inv.network)} --format "
        "'{{range $id, $c := .Containers}}{{$c.Name}} {{end}}'",
        check=False,
    ).split()
    users = [u for u in users if not u.startswith((verify.PREFIX, anchor.PREFIX))]
    if users:
        return f"{inv.network} kept: containers of yours are on it ({', '.join(users)})"
    manager.sh(f"docker network rm {shlex.quote(inv.network)} >/dev/null")
    return "removed"
