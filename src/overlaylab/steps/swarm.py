"""Step 2: leave any swarm (the cluster store cannot coexist with swarm mode)."""

from __future__ import annotations

from overlaylab.cluster import Node
from overlaylab.errors import OverlaylabError


def refusal(node: Node, force: bool) -> str | None:
    """A manager with services is not left silently: what would be lost, unless forced."""
    f = node.facts
    if f.swarm_state != "inactive" and f.swarm_manager and f.services and not force:
        return (
            f"manages a swarm with {f.services} service(s); leaving would remove them from this node's control: "
            "pass --force-leave-swarm to leave anyway"
        )
    return None


def needed(node: Node) -> bool:
    return node.facts.swarm_state not in ("inactive", "")


def leave(node: Node) -> str:
    flag = " --force" if node.facts.swarm_manager else ""
    node.sh(f"docker swarm leave{flag}")
    return f"left the swarm (was {node.facts.swarm_state}{', manager' if flag else ''})"


# ---- swarm mode: the backend for engines without a cluster store ------------------------

SWARM_PORT = 2377


def manager_addr(manager: Node) -> str:
    return f"{manager.advertise_ip}:{SWARM_PORT}"


def manager_state(manager: Node, leave_other: bool) -> tuple[str, str]:
    """('ok'|'init'|'reinit'|'refuse', why) for the manager."""
    f = manager.facts
    if f.swarm_state == "inactive":
        return "init", "not in a swarm"
    if f.swarm_state == "active" and f.swarm_manager:
        return "ok", f"manages swarm {f.swarm_cluster_id[:12]}"
    if leave_other:
        return "reinit", f"in another swarm as a worker ({f.swarm_state}): leaving it (--leave-other-swarm)"
    return "refuse", f"is a worker of another swarm ({f.swarm_state}): pass --leave-other-swarm to leave it"


def worker_state(node: Node, manager: Node, leave_other: bool) -> tuple[str, str]:
    """('ok'|'join'|'rejoin'|'refuse', why) for a worker."""
    f = node.facts
    if f.swarm_state == "inactive":
        return "join", "not in a swarm"
    if f.swarm_state == "active" and manager_addr(manager) in f.swarm_remote_managers and not f.swarm_manager:
        return "ok", f"worker of {manager.name}'s swarm"
    if leave_other:
        return "rejoin", f"in another swarm ({f.swarm_state}): leaving it (--leave-other-swarm)"
    return (
        "refuse",
        f"is in another swarm ({f.swarm_state}, managers {f.swarm_remote_managers}): pass --leave-other-swarm",
    )


def init(manager: Node, pool: str | None, rejoin: bool) -> str:
    leave = "docker swarm leave --force >/dev/null && " if rejoin else ""
    ip = manager.advertise_ip
    pool_arg = f" --default-addr-pool {pool}" if pool else ""
    manager.sh(f"{leave}docker swarm init --advertise-addr {ip} --listen-addr {ip}:{SWARM_PORT}{pool_arg} >/dev/null")
    return f"swarm initialised on {ip}:{SWARM_PORT}"


def worker_token(manager: Node) -> str:
    return manager.sh("docker swarm join-token -q worker").strip()


def join(node: Node, manager: Node, token: str, rejoin: bool) -> str:
    leave = "docker swarm leave --force >/dev/null; " if rejoin else ""
    ip = node.advertise_ip
    try:
        node.sh(
            f"{leave}docker swarm join --token {token} --advertise-addr {ip} --listen-addr {ip}:{SWARM_PORT} "
            f"{manager_addr(manager)} >/dev/null"
        )
    except OverlaylabError as exc:  # the join token is a secret: never in a message
        raise OverlaylabError(str(exc).replace(token, "<join-token>")) from None
    return f"joined {manager.name}'s swarm"


def leave_swarm(node: Node) -> bool:
    """Teardown: leave whatever swarm; True when the node was in one."""
    if not needed(node):
        return False
    node.sh("docker swarm leave --force >/dev/null")
    return True
