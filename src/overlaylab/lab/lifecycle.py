"""lab-up, lab-down and lab-status: read what exists, then change only what differs."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from overlaylab.errors import InputError, OverlaylabError
from overlaylab.lab import engine, firewall, hosts, images, impair, keys, preflight
from overlaylab.lab.docker import Docker
from overlaylab.lab.spec import DEFAULT_RANGE, ENGINE_SUITE, HostSpec, LabSpec, build_spec
from overlaylab.report import Steps

MAX_PARALLEL = 6


@dataclass
class UpResult:
    """What lab-up did, for the summary line and the tests."""

    created: list[str] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # host -> reason
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)  # kind -> ok/imported/built
    files_written: list[str] = field(default_factory=list)
    other_changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(
            self.created
            or self.replaced
            or self.removed
            or self.files_written
            or self.other_changes
            or any(how != "ok" for how in self.images.values())
        )


def inventory_text(spec: LabSpec) -> str:
    """The lab's inventory, in the format a user writes by hand for real hosts."""
    state = keys.state_dir(spec.name)
    lines = [
        "# Written by `fab lab-up`; rewritten on each lab-up, removed by lab-down.",
        f"cluster: {{name: {spec.name}}}",
        f"ssh: {{user: admin, key: {state / 'id_ed25519'}, known_hosts: {state / 'known_hosts'}, port: 22}}",
        "consul: {image: progrium/consul, flavor: progrium, port: 8500}",
        f"network: {{name: ov_net1, subnet: {spec.overlay_subnet}}}",
        "dockerd: {extra_flags: []}",
        f"swarm: {{default_addr_pool: {spec.swarm_pool}}}  # used in mode: swarm",
        "hosts:",
    ]
    lines += [f"  {h.name}: {{address: {h.mgmt_ip}, role: {h.role}, advertise: eth1}}" for h in spec.hosts]
    return "\n".join(lines) + "\n"


def ssh_config_path(inventory: Path) -> Path:
    """The lab's ssh_config, beside its inventory: inventory/lab.yaml -> inventory/lab.ssh_config."""
    return inventory.with_suffix(".ssh_config")


def ssh_config_text(spec: LabSpec) -> str:
    """`ssh -F FILE bm-docker-02` reaches a host by its name, with the lab's key and known_hosts
    and strict host-key checking (as containerlab writes one per lab)."""
    state = keys.state_dir(spec.name)
    lines = ["# Written by `fab lab-up`; removed by lab-down. ssh -F THIS_FILE bm-docker-02"]
    for h in spec.hosts:
        lines += [
            f"Host {h.name}",
            f"    HostName {h.mgmt_ip}",
            "    User admin",
            f"    IdentityFile {state / 'id_ed25519'}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {state / 'known_hosts'}",
            "    StrictHostKeyChecking yes",
            "    BatchMode yes",
        ]
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def _ensure_network(docker: Docker, spec: LabSpec, name: str, bridge: str, subnet: str) -> bool:
    data = docker.inspect("network", name)
    if data is not None:
        subnets = [c.get("Subnet") for c in (data.get("IPAM") or {}).get("Config") or []]
        if subnets == [subnet]:
            return False
        raise OverlaylabError(
            f"network {name} exists with subnets {subnets}, wanted {subnet}: run `fab lab-down` first"
        )
    docker.run(
        "network", "create", "--driver", "bridge", "--internal",
        "--subnet", subnet, "--gateway", str(ipaddress.IPv4Network(subnet).network_address + 1),
        "-o", f"com.docker.network.bridge.name={bridge}",
        "--label", f"{hosts.LABEL_LAB}={spec.name}",
        name,
    )  # fmt: skip
    return True


Built = tuple[dict[str, str], Path, dict[str, str]]  # the hosts' image tags, the inner bundle, its tags


def _images(docker: Docker, spec: LabSpec, result: UpResult, steps: Steps) -> Built:
    """Every image the lab runs, built or re-imported only where missing: the hosts' per
    engine (their tags), and the inner engines' bundle with its tags."""
    node_recipes = {e: images.node_recipe(ENGINE_SUITE[e]) for e in sorted({h.engine for h in spec.hosts})}
    inner = [images.busybox_recipe(), images.consul_recipe()]
    to_build = [r for r in (*node_recipes.values(), *inner) if not r.cache_file.exists()]
    preflight.require_disk(str(images.CACHE), 1.0 + 1.5 * len(to_build))
    for recipe in (*node_recipes.values(), *inner):
        with steps.step(f"Image {recipe.tag}") as note:
            result.images[recipe.kind] = images.ensure(docker, recipe, steps.line)
            note.append(result.images[recipe.kind])
    hashicorp = images.hashicorp_recipe(inner[1])
    with steps.step(f"Image {hashicorp.tag}") as note:
        result.images[hashicorp.kind] = images.ensure_derived(docker, hashicorp)
        note.append(result.images[hashicorp.kind])
    bundled: list[images.Recipe | images.Derived] = [*inner, hashicorp]
    bundle = images.inner_bundle(docker, bundled)
    return {e: r.tag for e, r in node_recipes.items()}, bundle, {r.tag: images.INNER_TAGS[r.kind] for r in bundled}


def _networks(docker: Docker, spec: LabSpec, result: UpResult, steps: Steps) -> None:
    """The lab's two networks (management, cluster) and its own firewall rules."""
    with steps.step("Lab networks and firewall rules") as note:
        for net, bridge, subnet in (
            (spec.network_mgmt, spec.bridge_mgmt, spec.mgmt_net),
            (spec.network_cluster, spec.bridge_cluster, spec.cluster_net),
        ):
            if _ensure_network(docker, spec, net, bridge, str(subnet)):
                result.other_changes.append(f"network {net}")
        if firewall.ensure(spec.name, [spec.bridge_mgmt, spec.bridge_cluster]):
            result.other_changes.append("firewall rules")
        note.append("changed" if result.other_changes else "no change")


@dataclass(frozen=True)
class _Wanted:
    """What a host of the lab is reconciled against."""

    spec: LabSpec
    images: dict[str, str]  # engine -> the host image's tag
    bundle: Path  # the inner engines' images, one archive
    inner_tags: dict[str, str]


def _reconcile(docker: Docker, wanted: _Wanted, obs: hosts.Observed | None, host: HostSpec, result: UpResult,
               steps: Steps) -> None:  # fmt: skip
    """One host as it should be: left alone if healthy, powered on if stopped with its disk,
    replaced whole if it is not what the spec says (or systemd does not run), made if missing."""
    spec = wanted.spec
    image = wanted.images[host.engine]
    why = hosts.mismatch(spec, host, obs, image) if obs else "missing"
    with steps.step(f"Host {host.name} ({host.engine}, {host.mgmt_ip})") as note:
        if why is None and obs is not None and not obs.running:  # a dead host keeps its disk: power it on
            docker.run("start", spec.container(host))
            hosts.wait_ready(docker, spec, host)
            note.append("powered on again")
            result.other_changes.append(f"{host.name} powered on")
        if why is None and hosts.system_state(docker, spec.container(host)) not in ("running", "degraded"):
            why = "systemd not running"
        if why is not None:
            if obs is not None:
                hosts.remove(docker, spec, host.name)
                result.replaced[host.name] = why
                note.append(f"replaced: {why}")
            else:
                result.created.append(host.name)
                note.append("created")
            hosts.create(docker, spec, host, image)
        hosts.wait_ready(docker, spec, host)
        if hosts.load_images(docker, spec, host, wanted.bundle, wanted.inner_tags):
            note.append("images loaded")
            if why is None:
                result.other_changes.append(f"{host.name} images")
        if why is None and len(note) == 0:
            result.unchanged.append(host.name)
            note.append("no change")


@engine.exclusive
def up(
    name: str = "lab",
    count: int | None = None,
    engine_opt: str | None = None,
    inventory: Path | None = None,
    addr_range: str | None = None,
    steps: Steps | None = None,
    impairments: Path | None = None,
) -> UpResult:
    """The lab as asked, from whatever is there: only the difference changes (a second lab-up
    says `no change`); every error comes before anything is created (``impairments``, a YAML
    list as lab-impair --from takes it, is read and checked first, made last)."""
    steps = steps or Steps()
    result = UpResult()
    preflight.require_root()
    build_spec(name, engine_opt, count, {}, **({"addr_range": addr_range} if addr_range else {}))  # options valid?
    preflight.require_tools(building=True)
    with steps.step("Finding the outer Docker engine") as note:
        eng = engine.find(start=True)
        assert eng is not None
        docker = eng.docker
        note.append("private dockerd" if eng.private else "this machine's engine")
    existing = hosts.observe(docker, name)
    addr_range = addr_range or _range_of(name, existing)  # an existing lab keeps its range
    spec = build_spec(
        name, engine_opt, count, {h: o.engine for h, o in existing.items()},
        **({"addr_range": addr_range} if addr_range else {}),
    )  # fmt: skip
    preflight.require_free_range(spec, docker)
    impaired = impair.load(impairments, spec) if impairments is not None else []
    wanted = _Wanted(spec, *_images(docker, spec, result, steps))
    _networks(docker, spec, result, steps)
    keys.client_key(spec)
    for extra in sorted(set(existing) - {h.name for h in spec.hosts}):
        with steps.step(f"Removing {extra} (beyond --count)"):
            hosts.remove(docker, spec, extra)
            result.removed.append(extra)
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(spec.hosts))) as pool:
        for fut in [
            pool.submit(_reconcile, docker, wanted, existing.get(h.name), h, result, steps) for h in spec.hosts
        ]:
            fut.result()
    state = keys.state_dir(name)
    if _write_if_changed(state / "known_hosts", keys.known_hosts_text(spec)):
        result.files_written.append(str(state / "known_hosts"))
    if inventory is not None and _write_if_changed(inventory, inventory_text(spec)):
        result.files_written.append(str(inventory))
    for where in (state / "ssh_config", *([ssh_config_path(inventory)] if inventory is not None else [])):
        if _write_if_changed(where, ssh_config_text(spec)):
            result.files_written.append(str(where))
    if _queues_again(docker, spec):  # a host powered on again
        result.other_changes.append("impairment queues made again")
    if impaired:
        with steps.step("Impairments") as note:
            made = impair.apply(spec, impaired, hosts.cluster_ports(docker, spec))
            result.other_changes += [f"impaired: {imp.describe()}" for imp in made]
            note.append(f"{len(made)} made" if made else "in force already")
    steps.line(" lab is up: " + ("changed" if result.changed else "no change") + f" ({len(spec.hosts)} hosts)")
    return result


@engine.exclusive
def down(name: str = "lab", inventory: Path | None = None, steps: Steps | None = None) -> list[str]:
    """Remove every object of the lab, then the private engine if no other lab uses it."""
    steps = steps or Steps()
    preflight.require_root()
    removed: list[str] = []
    eng = engine.find(start=False)
    started_here = False
    if eng is None and engine.has_stored_containers():
        # A private engine that died (session end, machine restart) still holds
        # containers on disk: start it to remove the lab's properly.
        eng, started_here = engine.find(start=True), True
    label = f"{hosts.LABEL_LAB}={name}"
    if eng is not None:
        docker = eng.docker
        with steps.step(f"Removing lab {name!r}") as note:
            for container in docker.ids("container", label):
                docker.run("rm", "-f", "-v", container)
                removed.append(f"container {container}")
            for volume in docker.ids("volume", label):
                docker.run("volume", "rm", "-f", volume)
                removed.append(f"volume {volume}")
            for network in docker.ids("network", label):
                docker.run("network", "rm", network)
                removed.append(f"network {network}")
            note.append(f"{len(removed)} objects" if removed else "nothing to remove")
        if eng.private and not docker.ids("container", hosts.LABEL_LAB):
            with steps.step("Stopping the private dockerd"):
                engine.stop_private()
                if not started_here:
                    removed.append("private dockerd")
    elif engine.private_pid() is None:
        engine.stop_private()  # clears leftovers of a daemon that died
    n = firewall.remove(name)
    if n:
        removed.append(f"{n} firewall rules")
    if impair.reset(name):
        removed.append("impairments")
    state = keys.state_dir(name)
    if state.exists():
        shutil.rmtree(state)
        removed.append(f"state {state}")
    if inventory is not None and inventory.exists():
        inventory.unlink()
        removed.append(f"inventory {inventory}")
    if inventory is not None and ssh_config_path(inventory).exists():
        ssh_config_path(inventory).unlink()
        removed.append(f"ssh_config {ssh_config_path(inventory)}")
    steps.line(" lab is down: " + (f"removed {len(removed)} things" if removed else "nothing to remove"))
    return removed


def _range_of(name: str, found: dict[str, hosts.Observed]) -> str | None:
    """The address range an existing lab was made with, from any host's management address."""
    for obs in found.values():
        mgmt = obs.addresses.get(f"olab-{name}-mgmt", "")
        if mgmt:
            return str(ipaddress.ip_network(f"{mgmt}/16", strict=False))
    return None


def _lab_host(name: str, node: str) -> tuple[Docker, LabSpec, HostSpec]:
    """One host of a lab as the outer engine has it, or an InputError naming the lab's hosts."""
    preflight.require_root()
    eng = engine.find(start=False)
    found = hosts.observe(eng.docker, name) if eng is not None else {}
    if node not in found:
        known = ", ".join(sorted(found)) or "none"
        raise InputError(f"--node: lab {name!r} has no host {node!r} (its hosts: {known})")
    assert eng is not None
    addr_range = _range_of(name, found) or DEFAULT_RANGE
    spec = build_spec(name, None, None, {h: o.engine for h, o in found.items()}, addr_range=addr_range)
    return eng.docker, spec, spec.host(node)


def reboot(name: str, node: str, hard: bool = False, steps: Steps | None = None) -> str:
    """Reboot one lab host: soft, `systemctl reboot` inside it, then power it on again (systemd
    as a container's PID 1 exits when it reboots); hard, a power cut (SIGKILL) and power on.
    The host keeps what a rebooted machine keeps: its disk (the container's filesystem and
    the /var/lib/docker volume), hostname, SSH identity and addresses; /run and /tmp start
    empty. Returns how long the host took until systemd, docker.service and sshd were up."""
    steps = steps or Steps()
    docker, spec, host = _lab_host(name, node)
    obs = hosts.observe(docker, name)[node]
    how = "hard (power cut)" if hard else "soft (systemctl reboot)"
    with steps.step(f"Rebooting {node}, {how}") as note:
        start = time.monotonic()
        if hard:
            docker.run("kill", "--signal", "KILL", obs.container, check=False)
        elif obs.running:
            docker.run("exec", obs.container, "systemctl", "reboot", check=False)
        try:
            docker.run("wait", obs.container, check=False, timeout=120)  # down: systemd has exited
        except subprocess.TimeoutExpired:
            raise OverlaylabError(f"{node}: still running 120s after `systemctl reboot`") from None
        docker.run("start", obs.container)
        _queues_again(docker, spec)  # its new veth gets the rates and delays in force again
        hosts.wait_ready(docker, spec, host)
        took = time.monotonic() - start
        note.append(f"up again in {took:.1f}s")
    return f"{took:.1f}"


def power_off(name: str, node: str, steps: Steps | None = None) -> None:
    """A host dies: its power is cut (SIGKILL) and it stays down, keeping its disk, until
    `lab-up` powers it on again. Its addresses stop answering at once, as a dead machine's do."""
    steps = steps or Steps()
    docker, spec, host = _lab_host(name, node)
    with steps.step(f"Powering {node} off (power cut)"):
        docker.run("kill", "--signal", "KILL", spec.container(host), check=False)
        docker.run("wait", spec.container(host), check=False, timeout=60)
        state = (docker.inspect("container", spec.container(host)) or {}).get("State") or {}
        if state.get("Running"):  # a cut that did not happen must not pass for one
            raise OverlaylabError(f"{node}: still running after its power cut ({state.get('Status')})")


def lab_names() -> set[str]:
    """Every lab the outer engine holds objects of (found by label, no state file)."""
    eng = engine.find(start=False)
    if eng is None:
        return set()
    names = set()
    for kind in ("container", "network", "volume"):
        fmt = '{{.Label "overlaylab.lab"}}' if kind != "volume" else "{{.Labels}}"
        extra = ["-a"] if kind == "container" else []
        for line in eng.docker.out(
            kind, "ls", *extra, "--filter", "label=overlaylab.lab", "--format", fmt
        ).splitlines():
            for part in line.split(","):
                if "=" in part:
                    key, _, value = part.partition("=")
                    if key.strip() == "overlaylab.lab":
                        names.add(value.strip())
                elif part.strip():
                    names.add(part.strip())
    return names


@dataclass
class HostStatus:
    name: str
    container: str
    state: str
    engine: str
    engine_version: str
    mgmt_ip: str
    cluster_ip: str
    system: str


def status(name: str = "lab") -> list[HostStatus]:
    eng = engine.find(start=False)
    if eng is None:
        return []
    docker = eng.docker
    found = hosts.observe(docker, name)
    out = []
    for host_name, obs in sorted(found.items()):
        running = obs.running
        out.append(
            HostStatus(
                name=host_name,
                container=obs.container,
                state="running" if running else "stopped",
                engine=obs.engine,
                engine_version=hosts.engine_version(docker, obs.container) if running else "",
                mgmt_ip=obs.addresses.get(f"olab-{name}-mgmt", ""),
                cluster_ip=obs.addresses.get(f"olab-{name}-cluster", ""),
                system=hosts.system_state(docker, obs.container) if running else "",
            )
        )
    return out


def status_dicts(name: str = "lab") -> list[dict[str, str]]:
    return [asdict(s) for s in status(name)]


def _queues_again(docker: Docker, spec: LabSpec) -> list[str]:
    """The queues of the rates and delays in force, made again on a port that lost them (a
    host rebooted: a new veth); nothing is looked up when none is in force."""
    if not any(imp.kind in impair.QUEUED for imp in impair.in_force(spec.name)):
        return []
    return impair.shape(spec, hosts.cluster_ports(docker, spec))


def _spec_of(name: str) -> tuple[LabSpec, dict[str, str]]:
    """The lab as the outer engine has it now, with its hosts' cluster ports, or an InputError
    when there is none."""
    preflight.require_root()
    eng = engine.find(start=False)
    found = hosts.observe(eng.docker, name) if eng is not None else {}
    if not found:
        raise InputError(f"no lab {name!r} is up (fab lab-up --name {name})")
    addr_range = _range_of(name, found) or DEFAULT_RANGE
    spec = build_spec(name, None, None, {h: o.engine for h, o in found.items()}, addr_range=addr_range)
    assert eng is not None
    return spec, hosts.cluster_ports(eng.docker, spec)


def impair_now(name: str, wanted: list[impair.Impairment]) -> list[str]:
    """lab-impair: each one checked (nothing made when one is wrong), then made; what is in force."""
    spec, ports = _spec_of(name)
    impair.apply(spec, wanted, ports)
    return [imp.describe() for imp in impair.in_force(name)]


def impairments(name: str, reset: bool = False, node: str | None = None, from_file: Path | None = None) -> list[str]:
    """--show, --reset [--node], --from FILE: what is in force afterwards."""
    spec, ports = _spec_of(name)
    if node is not None and node not in {h.name for h in spec.hosts}:
        raise InputError(f"node: no host {node!r} in lab {name!r}")
    if node is not None and not reset:
        raise InputError("lab-impair: --node with --show or --from says nothing: it goes with --reset or an impairment")
    wanted = impair.load(from_file, spec) if from_file is not None else []  # checked before the reset
    if reset:
        impair.reset(name, node, spec, ports)
    impair.apply(spec, wanted, ports)
    return [imp.describe() for imp in impair.in_force(name)]


def ssh_argv(name: str, node: str, command: str | None) -> list[str]:
    """The system's ssh, by the host's name through the lab's ssh_config."""
    spec, _ = _spec_of(name)
    if node not in {h.name for h in spec.hosts}:
        raise InputError(f"node: no host {node!r} in lab {name!r} (it has {', '.join(h.name for h in spec.hosts)})")
    config = keys.state_dir(name) / "ssh_config"
    _write_if_changed(config, ssh_config_text(spec))
    return ["ssh", "-F", str(config), *(["-t"] if command is None else []), node, *([command] if command else [])]
