"""The tasks, one collection for both ways to run them: the `overlaylab` command that
`pip install` gives (overlaylab.cli) and a clone's `fab` (fabfile.py). They parse options
and call the package; each error becomes its exit code.

Without `--inventory` a task reads `$OVERLAYLAB_INVENTORY`, else the configuration's
`overlaylab.inventory` (Fabric's config files: `fabric.yaml` ...), else the lab's inventory:
`overlaylab.lab_inventory` (a clone's fabfile sets it beside itself), else
`inventory/lab.yaml` under the current directory, which `lab-up` writes."""

from __future__ import annotations

import getpass
import json as jsonlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fabric import task
from invoke.collection import Collection
from invoke.exceptions import Exit

from overlaylab import cluster, provision, remote
from overlaylab import inventory as inventory_mod
from overlaylab.errors import InputError, OverlaylabError
from overlaylab.lab import impair, lifecycle
from overlaylab.report import Steps, columns

LAB_INVENTORY = Path("inventory") / "lab.yaml"
T = TypeVar("T")

COMMON_HELP = {
    "inventory": "inventory file (default: $OVERLAYLAB_INVENTORY, fabric config overlaylab.inventory, "
    "inventory/lab.yaml)",
    "json": "print one JSON document on stdout (progress goes to stderr)",
    "accept_new_host_keys": "accept and record unknown host keys (never changed ones), "
    "like StrictHostKeyChecking=accept-new",
    "ask_sudo_password": "prompt for the sudo password (or set OVERLAYLAB_SUDO_PASSWORD); never printed",
    "parallel": f"hosts worked on at once (default {cluster.MAX_PARALLEL})",
}


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except OverlaylabError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None


def _settings(c: Any) -> dict[str, Any]:
    return dict(c.config.get("overlaylab") or {}) if hasattr(c, "config") else {}


def _lab_inventory(c: Any) -> Path:
    """Where lab-up writes the lab's inventory, and where the tasks look last."""
    configured = _settings(c).get("lab_inventory")
    return Path(configured) if configured else LAB_INVENTORY


def _inventory_path(c: Any, given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("OVERLAYLAB_INVENTORY"):
        return Path(os.environ["OVERLAYLAB_INVENTORY"])
    configured = _settings(c).get("inventory")
    return Path(configured) if configured else _lab_inventory(c)


def _provision(
    c: Any, fn: Callable[..., int], inventory: str | None, ask_sudo_password: bool, *args: Any, **kw: Any
) -> None:
    def go() -> int:
        inv = inventory_mod.load(_inventory_path(c, inventory))
        password = getpass.getpass("sudo password: ") if ask_sudo_password else remote.environ_sudo_password()
        return fn(inv, provision.Options(sudo_password=password, **kw), *args)

    code = _run(go)
    if code:
        raise Exit(code=code)


@task(
    auto_shortflags=False,
    help={
        **COMMON_HELP,
        "dry_run": "show per-host diffs and what would restart; change nothing",
        "force_leave_swarm": "kv mode: leave a swarm even where this node manages services",
        "leave_other_swarm": "swarm mode: a node in another swarm leaves it and joins this one",
        "allow_restart": "restart dockerd even where containers that are not overlaylab's run",
        "reissue_certs": "tls: a new CA (the old one kept aside) and a new certificate for every host",
    },
)
def bootstrap_cluster(
    c: Any,
    inventory: str | None = None,
    dry_run: bool = False,
    json: bool = False,
    accept_new_host_keys: bool = False,
    force_leave_swarm: bool = False,
    leave_other_swarm: bool = False,
    allow_restart: bool = False,
    reissue_certs: bool = False,
    ask_sudo_password: bool = False,
    parallel: int = cluster.MAX_PARALLEL,
) -> None:
    """kv: Consul, the cluster-store drop-in, the overlay; swarm: init, join, an attachable overlay; then pings."""
    _provision(
        c, provision.bootstrap, inventory, ask_sudo_password, dry_run=dry_run, json=json,
        accept_new_host_keys=accept_new_host_keys, force_leave_swarm=force_leave_swarm,
        leave_other_swarm=leave_other_swarm, allow_restart=allow_restart, reissue_certs=reissue_certs,
        parallel=int(parallel),
    )  # fmt: skip


@task(
    auto_shortflags=False,
    help={
        **COMMON_HELP,
        "node": "the worker to join",
        "dry_run": "show the diff; change nothing",
        "force_leave_swarm": "kv mode: leave a swarm even where this node manages services",
        "leave_other_swarm": "swarm mode: a node in another swarm leaves it and joins this one",
        "allow_restart": "restart dockerd even where containers that are not overlaylab's run",
    },
)
def join_node(
    c: Any,
    node: str,
    inventory: str | None = None,
    dry_run: bool = False,
    json: bool = False,
    accept_new_host_keys: bool = False,
    force_leave_swarm: bool = False,
    leave_other_swarm: bool = False,
    allow_restart: bool = False,
    ask_sudo_password: bool = False,
    parallel: int = cluster.MAX_PARALLEL,
) -> None:
    """Bring one worker into an existing cluster; re-running it changes nothing."""
    _provision(
        c, provision.join_node, inventory, ask_sudo_password, node, dry_run=dry_run, json=json,
        accept_new_host_keys=accept_new_host_keys, force_leave_swarm=force_leave_swarm,
        leave_other_swarm=leave_other_swarm, allow_restart=allow_restart, parallel=int(parallel),
    )  # fmt: skip


@task(auto_shortflags=False, help=COMMON_HELP)
def verify(
    c: Any,
    inventory: str | None = None,
    json: bool = False,
    accept_new_host_keys: bool = False,
    ask_sudo_password: bool = False,
    parallel: int = cluster.MAX_PARALLEL,
) -> None:
    """The ping matrix alone: every ordered pair of hosts, by IP, by name and with a full-size packet."""
    _provision(
        c, provision.verify_only, inventory, ask_sudo_password, json=json,
        accept_new_host_keys=accept_new_host_keys, parallel=int(parallel),
    )  # fmt: skip


@task(auto_shortflags=False, help=COMMON_HELP)
def status(
    c: Any,
    inventory: str | None = None,
    json: bool = False,
    accept_new_host_keys: bool = False,
    ask_sudo_password: bool = False,
    parallel: int = cluster.MAX_PARALLEL,
) -> None:
    """Per host: engine version, cluster flags in effect, Consul registration, overlay networks."""
    _provision(
        c, provision.status, inventory, ask_sudo_password, json=json,
        accept_new_host_keys=accept_new_host_keys, parallel=int(parallel),
    )  # fmt: skip


@task(
    auto_shortflags=False,
    help={
        **COMMON_HELP,
        "dry_run": "say what would be undone; change nothing",
        "allow_restart": "restart dockerd even where containers that are not overlaylab's run",
        "remove_ca": "tls: also remove the cluster's CA and the admin certificate from this machine",
    },
)
def teardown(
    c: Any,
    inventory: str | None = None,
    json: bool = False,
    dry_run: bool = False,
    allow_restart: bool = False,
    remove_ca: bool = False,
    accept_new_host_keys: bool = False,
    ask_sudo_password: bool = False,
    parallel: int = cluster.MAX_PARALLEL,
) -> None:
    """Put every host back as before overlaylab: original drop-in, no Consul, no network. Safe twice."""
    _provision(
        c, provision.teardown, inventory, ask_sudo_password, json=json, dry_run=dry_run,
        allow_restart=allow_restart, remove_ca=remove_ca, accept_new_host_keys=accept_new_host_keys,
        parallel=int(parallel),
    )  # fmt: skip


@task(auto_shortflags=False, help={"node": "the host", "inventory": COMMON_HELP["inventory"]})
def docker_env(c: Any, node: str, inventory: str | None = None) -> None:
    """Like `docker-machine env`: export lines for `eval` that point docker at one host over TLS."""
    print(_run(lambda: provision.docker_env(inventory_mod.load(_inventory_path(c, inventory)), node)))


@task(
    auto_shortflags=False,
    help={
        "count": "number of hosts (default 3, or as many as the lab has)",
        "engine": "legacy (Docker 20.10, cluster store) or modern (26.x); or one per host: legacy,legacy,modern",
        "name": "lab name (default lab)",
        "range": "private /16 for every lab address (default 10.210.0.0/16)",
        "impairments": "a YAML list of impairments to make once the lab is up (as lab-impair --from)",
    },
)
def lab_up(
    c: Any,
    count: int | None = None,
    engine: str | None = None,
    name: str = "lab",
    range: str | None = None,
    impairments: str | None = None,
) -> None:
    """Bring the local lab up (or repair it); writes its inventory (inventory/lab.yaml) and ssh_config."""
    given = Path(impairments) if impairments else None
    _run(lambda: lifecycle.up(name, int(count) if count else None, engine, _lab_inventory(c), range, Steps(), given))


@task(auto_shortflags=False, help={"name": "lab name (default lab)"})
def lab_down(c: Any, name: str = "lab") -> None:
    """Remove the lab and everything lab-up made; safe to run twice."""
    _run(lambda: lifecycle.down(name, _lab_inventory(c), Steps()))


@task(
    auto_shortflags=False,
    help={
        "node": "the lab host to reboot",
        "hard": "power-cycle it (a power cut) instead of `systemctl reboot` inside it",
        "name": "lab name (default lab)",
    },
)
def lab_reboot(c: Any, node: str, hard: bool = False, name: str = "lab") -> None:
    """Reboot one lab host; it keeps its disk, hostname, SSH identity and addresses."""
    _run(lambda: lifecycle.reboot(name, node, hard, Steps()))


@task(auto_shortflags=False, help={"node": "the lab host that dies", "name": "lab name (default lab)"})
def lab_poweroff(c: Any, node: str, name: str = "lab") -> None:
    """Cut one lab host's power: it stays down, disk kept, until lab-up powers it on."""
    _run(lambda: lifecycle.power_off(name, node, Steps()))


@task(auto_shortflags=False, help={"name": "lab name (default lab)", "json": "print JSON"})
def lab_status(c: Any, name: str = "lab", json: bool = False) -> None:
    """List the lab's hosts, addresses, engine versions and state."""
    rows = _run(lambda: lifecycle.status_dicts(name))
    impaired = [imp.describe() for imp in impair.in_force(name)]
    if json:
        print(jsonlib.dumps({"lab": name, "hosts": rows, "impairments": impaired}, indent=2))
        return
    if not rows:
        print(f"lab {name!r}: no hosts")
        return
    cols = ["name", "state", "system", "engine", "engine_version", "mgmt_ip", "cluster_ip"]
    print("\n".join(columns([[c.upper() for c in cols], *([str(r[c]) for c in cols] for r in rows)])))
    for line in impaired:
        print(f"impaired: {line}")
    sys.stdout.flush()


@task(
    auto_shortflags=False,
    help={
        "node": "the lab host (its cluster address) the impairment is on",
        "peer": "the other host (default: every other host)",
        "block": "drop PROTO/PORT, e.g. udp/4789 or tcp/7946",
        "direction": "in (toward the node), out, or both (default)",
        "loss": "percent of packets lost, each way",
        "mtu": "packets over N bytes of IP total length dropped (a black hole)",
        "rate": "a rate like 10mbit or 512kbit, each way",
        "partition": "all cluster traffic between node and peers dropped, both ways",
        "delay": "milliseconds of delay (needs the kernel's netem: refused where it lacks it)",
        "show": "list what is in force",
        "reset": "remove the impairments of --node, or all of them",
        "from": "a YAML list of impairments to make (docs/lab.md)",
        "name": "lab name (default lab)",
        "json": "print JSON",
    },
)
def lab_impair(
    c: Any,
    node: str | None = None,
    peer: str | None = None,
    block: str | None = None,
    direction: str = "both",
    loss: str | None = None,
    mtu: str | None = None,
    rate: str | None = None,
    partition: bool = False,
    delay: str | None = None,
    show: bool = False,
    reset: bool = False,
    from_: str | None = None,
    name: str = "lab",
    json: bool = False,
) -> None:
    """The lab's network misbehaving, outside the hosts: blocked ports, loss, a small MTU, a rate, a partition."""
    kinds = {"block": block, "loss": loss, "mtu": mtu, "rate": rate, "delay": delay}
    wanted = [k for k, v in kinds.items() if v is not None] + (["partition"] if partition else [])

    def go() -> list[str]:
        if show or reset or from_:
            if wanted or peer is not None:
                given = ", ".join(f"--{k}" for k in wanted + (["peer"] if peer is not None else []))
                raise InputError(f"lab-impair: {given} cannot go with --show, --reset or --from (one or the other)")
            return lifecycle.impairments(name, reset=reset, node=node, from_file=Path(from_) if from_ else None)
        if node is None or not wanted:
            raise InputError("lab-impair: name --node and one impairment (or --show, --reset, --from FILE)")
        made = [impair.Impairment(node, k, str(kinds.get(k) or ""), peer, direction) for k in wanted]
        return lifecycle.impair_now(name, made)

    lines = _run(go)
    if json:
        print(jsonlib.dumps({"lab": name, "impairments": lines}, indent=2))
    else:
        print("\n".join(lines) or f"lab {name!r}: no impairment in force")


@task(
    auto_shortflags=False,
    help={"node": "the lab host", "command": "run this and return its exit code (else a shell)", "name": "lab name"},
)
def lab_ssh(c: Any, node: str, command: str | None = None, name: str = "lab") -> None:
    """ssh into a lab host by its name, with the lab's key and strict host keys (its ssh_config)."""
    argv = _run(lambda: lifecycle.ssh_argv(name, node, command))
    code = subprocess.call(argv)
    if code:
        raise Exit(code=code)


ns = Collection(
    bootstrap_cluster,
    join_node,
    verify,
    status,
    teardown,
    docker_env,
    lab_up,
    lab_down,
    lab_reboot,
    lab_poweroff,
    lab_status,
    lab_impair,
    lab_ssh,
)
