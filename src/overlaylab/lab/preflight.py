"""Checks that run before the lab creates anything, each with a specific message."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

from overlaylab.errors import InputError
from overlaylab.lab.docker import Docker
from overlaylab.lab.spec import LabSpec

GIB = 1 << 30


def require_root() -> None:
    if os.geteuid() != 0:
        raise InputError("the lab needs root (it runs containers with systemd and writes firewall rules): run as root")


def require_tools(building: bool) -> None:
    need = ["docker", "ssh-keygen", "ip"]
    if building:
        need += ["debootstrap", "chroot", "tar"]
    missing = [tool for tool in need if shutil.which(tool) is None]
    if missing:
        raise InputError(
            f"missing on this machine: {', '.join(missing)} (make demo installs them: "
            "apt-get install docker.io debootstrap busybox-static iptables openssh-client)"
        )


def require_disk(path: str, needed_gib: float) -> None:
    os.makedirs(path, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_gib * GIB:
        raise InputError(f"{path}: {free / GIB:.1f} GiB free, the lab needs about {needed_gib:.1f} GiB")


def _local_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, network) for every IPv4 address and route of this machine."""
    found = []
    addrs = json.loads(
        subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout or "[]"
    )
    for link in addrs:
        for info in link.get("addr_info", []):
            net = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            found.append((link["ifname"], net))
    routes = json.loads(
        subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True, check=True).stdout or "[]"
    )
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default":
            found.append((route.get("dev", "?"), ipaddress.IPv4Network(dst, strict=False)))
    return found


def require_free_range(spec: LabSpec, docker: Docker) -> None:
    """The lab's range must not overlap anything on this machine but the lab itself."""
    ours = {spec.bridge_mgmt, spec.bridge_cluster}
    for dev, net in _local_networks():
        if dev not in ours and net.overlaps(spec.addr_range):
            raise InputError(
                f"address range {spec.addr_range} is already in use on this machine ({net} on {dev}); "
                "choose another with --range"
            )
    for name in docker.out("network", "ls", "--format", "{{.Name}}").splitlines():
        if name in (spec.network_mgmt, spec.network_cluster):
            continue
        data = docker.inspect("network", name) or {}
        for conf in (data.get("IPAM") or {}).get("Config") or []:
            subnet = conf.get("Subnet", "")
            if subnet and ":" not in subnet and ipaddress.IPv4Network(subnet).overlaps(spec.addr_range):
                raise InputError(
                    f"address range {spec.addr_range} overlaps Docker network {name} ({subnet}); "
                    "choose another with --range"
                )
