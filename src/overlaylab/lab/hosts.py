"""Lab hosts as containers of the outer engine: observe, create, wait, remove.

No state file: a host is found by its labels, and judged healthy only when the
container runs the wanted image with the wanted addresses and its systemd says
running. Anything less is replaced whole, never half-reused.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlaylab.errors import OverlaylabError
from overlaylab.lab import keys
from overlaylab.lab.docker import Docker
from overlaylab.lab.spec import HostSpec, LabSpec

LABEL_LAB = "overlaylab.lab"
LABEL_HOST = "overlaylab.host"
LABEL_ENGINE = "overlaylab.engine"

# What a VM has and a container lacks, without --privileged (impossible on this
# kind of machine: its bounding set lacks CAP_SYS_RESOURCE).
HOST_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "--device-cgroup-rule", "a *:* rwm", "--device", "/dev/net/tun",
    "--cgroupns", "private",
    "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
    "--stop-signal", "SIGRTMIN+3",  # systemd halts on it (docker import cannot set STOPSIGNAL)
]  # fmt: skip


@dataclass(frozen=True)
class Observed:
    """A lab host container as the outer engine reports it."""

    container: str
    host: str
    engine: str
    image: str
    running: bool
    addresses: dict[str, str]  # network name -> IPv4
    container_id: str

    @classmethod
    def from_inspect(cls, data: dict[str, Any]) -> Observed:
        labels = data["Config"].get("Labels") or {}
        nets = data["NetworkSettings"].get("Networks") or {}
        return cls(
            container=data["Name"].lstrip("/"),
            host=labels.get(LABEL_HOST, ""),
            engine=labels.get(LABEL_ENGINE, ""),
            image=data["Config"]["Image"],
            running=bool(data["State"]["Running"]),
            addresses={name: net.get("IPAddress", "") for name, net in nets.items()},
            container_id=data["Id"],
        )


def observe(docker: Docker, lab: str) -> dict[str, Observed]:
    """Every container of this lab, by host name."""
    found: dict[str, Observed] = {}
    for name in docker.ids("container", f"{LABEL_LAB}={lab}"):
        data = docker.inspect("container", name)
        if data is not None:
            obs = Observed.from_inspect(data)
            found[obs.host] = obs
    return found


def mismatch(spec: LabSpec, host: HostSpec, obs: Observed, image: str) -> str | None:
    """Why an existing container is not the wanted host, or None when it is."""
    if obs.container != spec.container(host):
        return f"container named {obs.container}"
    if obs.image != image:
        return f"image {obs.image}, wanted {image}"
    if obs.engine != host.engine:
        return f"engine {obs.engine}, wanted {host.engine}"
    want = {spec.network_mgmt: host.mgmt_ip, spec.network_cluster: host.cluster_ip}
    if not obs.running:  # powered off: it keeps its networks, and its fixed addresses come back at start
        return None if set(obs.addresses) == set(want) else f"networks {sorted(obs.addresses)}, wanted {sorted(want)}"
    if obs.addresses != want:
        return f"addresses {obs.addresses}, wanted {want}"
    return None


def system_state(docker: Docker, container: str) -> str:
    proc = docker.run("exec", container, "systemctl", "is-system-running", check=False, timeout=30)
    return proc.stdout.strip() or proc.stderr.strip()


def remove(docker: Docker, spec: LabSpec, host_name: str) -> None:
    container = f"olab-{spec.name}-{host_name}"
    docker.run("rm", "-f", "-v", container, check=False)
    docker.run("volume", "rm", "-f", f"olab-{spec.name}-{host_name}-docker", check=False)


# A veth hands the bridge TCP's super-packets whole (GSO, up to 64 KiB), where a real NIC puts
# packets of at most its MTU on the wire: a length rule of lab-impair's (--mtu) would drop a
# stream whose every packet fits. One segment per packet: the host's stack cuts them to size.
WIRE_SIZE = "ip link set gso_max_segs 1 dev"


def create(docker: Docker, spec: LabSpec, host: HostSpec, image: str) -> None:
    """Create and boot one host; its cluster NIC is hot-plugged after start so it is always eth1."""
    labels = ["--label", f"{LABEL_LAB}={spec.name}", "--label", f"{LABEL_HOST}={host.name}"]
    docker.run("volume", "create", *labels, spec.volume(host))
    docker.run(
        "create", "--name", spec.container(host), "--hostname", host.name,
        *labels, "--label", f"{LABEL_ENGINE}={host.engine}",
        "--network", spec.network_mgmt, "--ip", host.mgmt_ip,
        *HOST_FLAGS,
        "-v", f"{spec.volume(host)}:/var/lib/docker",
        image,
    )  # fmt: skip
    docker.run("cp", "-", f"{spec.container(host)}:/", input=keys.identity_tar(spec, host))
    docker.run("start", spec.container(host))
    docker.run("network", "connect", "--ip", host.cluster_ip, spec.network_cluster, spec.container(host))
    # Connecting may bring a gateway back: the host keeps no route out of the lab. Its cluster
    # NIC sends wire-size packets, as a real NIC's segmentation does (entrypoint.sh: wire_size).
    docker.run(
        "exec", spec.container(host), "sh", "-c", f"ip route del default 2>/dev/null; {WIRE_SIZE} eth1"
    )  # fmt: skip


def _ssh_banner(address: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_ready(docker: Docker, spec: LabSpec, host: HostSpec, timeout: float = 180) -> None:
    """Until systemd says running, docker.service is active and sshd answers on the mgmt address."""
    container = spec.container(host)
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = system_state(docker, container)
        if state in ("running", "degraded"):
            break
        time.sleep(0.5)
    if state != "running":
        failed = docker.run("exec", container, "systemctl", "--failed", "--no-legend", "--plain", check=False).stdout
        raise OverlaylabError(
            f"{host.name}: systemd is {state or 'not answering'}; failed units: {failed.strip() or 'none'}"
        )
    while time.monotonic() < deadline:
        docker_ok = docker.run("exec", container, "docker", "version", "--format", "{{.Server.Version}}", check=False)
        if docker_ok.returncode == 0 and _ssh_banner(host.mgmt_ip):
            return
        time.sleep(0.5)
    raise OverlaylabError(f"{host.name}: docker.service or sshd on {host.mgmt_ip}:22 not ready after {timeout:.0f}s")


def load_images(docker: Docker, spec: LabSpec, host: HostSpec, bundle: Path, tags: dict[str, str]) -> bool:
    """Load the inner images (busybox, Consul) into the host's engine; True when loaded now."""
    container = spec.container(host)
    if docker.run("exec", container, "docker", "image", "inspect", *tags, *tags.values(), check=False).returncode == 0:
        return False
    retag = " && ".join(f"docker tag {src} {dst}" for src, dst in tags.items())
    with open(bundle, "rb") as data:
        docker.run("exec", "-i", container, "sh", "-c", f"docker load -q >/dev/null && {retag}", stdin=data)
    return True


def engine_version(docker: Docker, container: str) -> str:
    proc = docker.run(
        "exec", container, "docker", "version", "--format", "{{.Server.Version}}", check=False, timeout=30
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def cluster_ports(docker: Docker, spec: LabSpec) -> dict[str, str]:
    """Each running host's port on the lab's cluster bridge (the outer end of its veth, where a
    rate is shaped), by host name. A reboot makes a new veth, so ports are looked up, never kept:
    the host's cluster NIC (read from its network namespace, nothing run inside the host) names
    its peer's ifindex out here."""

    def ip_json(*argv: str) -> list[dict[str, Any]]:
        proc = subprocess.run([*argv], capture_output=True, text=True, check=False, timeout=30)
        if proc.returncode != 0:
            raise OverlaylabError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
        return list(json.loads(proc.stdout or "[]"))

    outer = {link["ifindex"]: link["ifname"] for link in ip_json("ip", "-j", "link", "show")}
    ports: dict[str, str] = {}
    for host in spec.hosts:
        state = ((docker.inspect("container", spec.container(host)) or {}).get("State")) or {}
        if not state.get("Running") or not state.get("Pid"):
            continue
        for nic in ip_json("nsenter", "-t", str(state["Pid"]), "-n", "ip", "-j", "-4", "addr", "show"):
            if any(a.get("local") == host.cluster_ip for a in nic.get("addr_info", [])):
                port = outer.get(nic.get("link_index"))
                if port:
                    ports[host.name] = port
        if host.name not in ports:  # a running host's queues would silently not be made
            raise OverlaylabError(f"{host.name}: its port on the cluster bridge ({host.cluster_ip}) was not found")
    return ports
