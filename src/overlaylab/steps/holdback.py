"""The users' containers on the overlay, held back over a dockerd restart of ours and
started once the daemon's gossip is up; and the sandbox a restart of someone else's left
without a miss watcher, found.

Why: Docker 20.10's legacy overlay gives a sandbox its miss watcher only if the daemon's
gossip is up when the sandbox is made, and records a joining container with the host's
address only once gossip has started (see facts.deaf_sandboxes_script). A restart brings
the containers that have a restart policy back first, in the daemon's restore: their
sandbox never looks up a peer it did not see join, and the daemon answers other hosts'
lookups for them with no address, for as long as it runs (leaving and joining again does
not clear that record: measured, pairs with such a host still failed 20 s on). Measured
on the lab (HA mode, an agent host's dockerd restarted): that host's user's container
neither reached nor was reached by any other host's, while fresh containers, `fab
verify` and the re-run's own verify said all was well.

So every restart overlaylab makes sets those containers' restart policy to "no" for the
restart (the policies are kept in a file on the host first), and starts them
and puts each policy back once gossip is up: they join a sandbox made after it. A host
whose sandbox is already deaf (its dockerd restarted by someone else) is restarted that
way (steps/dockerd.py), which needs --allow-restart: its users' containers stop for it.
A run that stopped between the two halves leaves the file: the next run's `held` step
finishes the job."""

from __future__ import annotations

import shlex

from overlaylab import render
from overlaylab.cluster import Node, write_file_command
from overlaylab.facts import HELD_FILE, ROLE_LABEL, deaf_sandboxes_script, restart_policy
from overlaylab.plan import Action, Context, Scope, Step
from overlaylab.steps import network


def deaf(node: Node) -> bool:
    """The host's sandbox of the cluster's network has no miss watcher, in kv mode under our
    drop-in. Never in swarm mode, though a swarm host runs our drop-in too (TLS): there no
    sandbox has a miss watcher by design (networkdb, not serf), and whether some other
    dockerd thread happens to sit in it when the fact is read is chance (a swarm verify
    failed on it in CI, ci7)."""
    nid = str((node.facts.network or {}).get("Id") or "")
    return bool(nid) and render.is_ours_with_store(node.facts.dropin) and nid[:10] in node.facts.deaf_sandboxes


def to_hold(node: Node) -> dict[str, str]:
    """name -> restart policy: the users' running containers on the overlay that a restart
    of dockerd would start again in its restore, before gossip."""
    return {c: a.policy for c, a in sorted(node.facts.attached.items()) if a.comes_back and not network.ours(node, c)}


def hold_command(held: dict[str, str]) -> str:
    """Run before the restart: the record first, then the policies off."""
    if not held:
        return "true"
    record = "".join(f"{c} {p}\n" for c, p in held.items())
    names = " ".join(shlex.quote(c) for c in held)
    return f"{write_file_command(HELD_FILE, record)} && docker update --restart no {names} >/dev/null"


def leave_command(node: Node) -> str:
    """Stops the users' running containers on the overlay before a restart of ours, while
    gossip is still up. dockerd's shutdown would stop them too, but its gossip stops with
    it and their "leave" events are lost: the other hosts keep sending those addresses
    here (seen on the lab after a soft reboot; overlaylab/peers.py). Stopped first, they
    leave as a `docker rm` does. The held ones start after gossip; the others stay
    stopped, as the daemon's shutdown would have left them."""
    names = sorted(c for c, a in node.facts.attached.items() if a.running and not network.ours(node, c))
    if not names:
        return "true"
    return f"timeout 120 docker stop {' '.join(shlex.quote(c) for c in names)} >/dev/null 2>&1; true"


def release_command(held: dict[str, str]) -> str:
    """Run once gossip is up (or after a rollback): start them, put each policy back, then
    drop the record. Each part on its own: one container gone meanwhile stops no other."""
    if not held:
        return "true"
    q = shlex.quote
    parts = [f"docker start {q(c)} >/dev/null" for c in held]
    parts += [f"docker update --restart {q(p)} {q(c)} >/dev/null" for c, p in held.items()]
    return "; ".join(parts) + f"; rm -f {HELD_FILE}"


def came_back_deaf_command(network_name: str) -> str:
    """After a restart that held nothing back (dockerd was not running, so its containers
    could not be listed): if the network's sandbox has no miss watcher, the running
    containers on it as "name policy role" lines; nothing otherwise."""
    net = shlex.quote(network_name)
    fmt = (
        "{{.Name}} {{.HostConfig.RestartPolicy.Name}}:{{.HostConfig.RestartPolicy.MaximumRetryCount}} "
        f'{{{{index .Config.Labels "{ROLE_LABEL}"}}}}'
    )
    return (
        f"nid=$(timeout 20 docker network inspect -f '{{{{.Id}}}}' {net} 2>/dev/null | cut -c1-10); "
        '[ -n "$nid" ] || exit 0; '
        f'( {deaf_sandboxes_script()} ) | grep -q -- "-$nid$" || exit 0; '
        f"timeout 20 docker ps -q --filter network={net} | xargs -r timeout 20 docker inspect -f {shlex.quote(fmt)}"
    )


def parse_came_back(text: str) -> dict[str, str]:
    """name -> policy of the users' containers in came_back_deaf_command's output."""
    held = {}
    for line in text.splitlines():
        name, raw, role = ([*line.split(), "", "", ""])[:3]
        policy = restart_policy(raw)
        if name and not role and policy not in ("", "no"):
            held[name.lstrip("/")] = policy
    return held


class Release(Step[dict[str, str]]):
    """kv: a record of held-back containers that a stopped run left: they are started and
    their restart policies put back."""

    name = "held"
    scope = Scope.ALL

    def plan(self, ctx: Context, node: Node) -> Action[dict[str, str]] | None:
        held = node.facts.held
        if not held:
            return None
        names = ", ".join(held)
        return Action(
            node.name,
            True,
            f"start {names} and put back their restart policies (a run stopped while it held them)",
            data=held,
        )

    def apply(self, ctx: Context, node: Node, action: Action[dict[str, str]]) -> str:
        node.sh(release_command(action.payload()))
        return f"started {', '.join(action.payload())}, restart policies put back"
