"""The drop-in: dockerd's current command line, minus earlier cluster flags, plus ours.

Rendering is pure (host facts and inventory in, bytes out) so that golden-file
tests pin it, and so that "upload only when the bytes differ" is a string compare.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jinja2

from overlaylab.errors import InputError

# The package's templates/ links to the checkout's top-level templates/ and is a copy in a
# wheel, so an installed package (the smoke suite's drift check) renders what a clone does.
TEMPLATES = Path(__file__).parent / "templates"
BASE_RE = re.compile(r"^# overlaylab-base: (.*)$", re.M)
MANAGED_MARK = "# Managed by overlaylab"
CLUSTER_FLAGS = ("--cluster-store", "--cluster-advertise", "--cluster-store-opt")


def _env() -> jinja2.Environment:
    if not (TEMPLATES / "10-machine.conf.j2").exists():
        raise InputError(f"templates not found in {TEMPLATES} (a broken install or checkout)")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def systemd_quote(arg: str) -> str:
    """Quote one ExecStart argument the way systemd splits them (variables stay expandable)."""
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split(command: str) -> list[str]:
    return shlex.split(command, posix=True)


def strip_cluster_flags(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in CLUSTER_FLAGS:
            skip_next = "=" not in arg
            continue
        out.append(arg)
    return out


def is_ours(dropin: str | None) -> bool:
    return dropin is not None and dropin.startswith(MANAGED_MARK)


def is_ours_with_store(dropin: str | None) -> bool:
    """Our drop-in, running dockerd with a cluster store: a host of a kv cluster of ours. A
    swarm host has our drop-in too (TLS), but none of kv mode's gossip, sandboxes or repairs."""
    return is_ours(dropin) and "--cluster-store=" in (dropin or "")


def base_command(current_exec_start: str | None, dropin: str | None) -> list[str]:
    """dockerd's command line before overlaylab: recorded in our drop-in, else what systemd runs now."""
    if is_ours(dropin):
        assert dropin is not None
        match = BASE_RE.search(dropin)
        if match:
            return split(match.group(1))
    if not current_exec_start:
        raise InputError("docker.service has no ExecStart")
    return strip_cluster_flags(split(current_exec_start.lstrip("-@+!:")))


def tcp_hosts(argv: list[str]) -> list[str]:
    """The `-H tcp://...` sockets a dockerd command line serves."""
    found = []
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-H", "--host") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("-H=", "--host=")):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-H") and len(arg) > 2:
            value = arg[2:]
        if value and value.startswith("tcp://"):
            found.append(value)
    return found


def insecure_tcp(argv: list[str]) -> str | None:
    """A `-H tcp://` without --tlsverify: an unauthenticated root API we refuse to keep."""
    tls = any(a == "--tlsverify" or a.startswith("--tlsverify=true") for a in argv)
    hosts = tcp_hosts(argv)
    return hosts[0] if hosts and not tls else None


STORE_RE = re.compile(r"--cluster-store=consul://([^:/\s\"]+):(\d+)")


def store_ip(dropin: str | None) -> str | None:
    """The manager address an overlaylab drop-in points dockerd's cluster store at."""
    match = STORE_RE.search(dropin or "") if is_ours(dropin) else None
    return match[1] if match else None


def store_url(manager_ip: str, port: int) -> str:
    return f"consul://{manager_ip}:{port}"


def cluster_argv(
    base: list[str],
    manager_ip: str,
    port: int,
    advertise: str,
    extra: tuple[str, ...],
    discovery: tuple[int, int] = (3, 20),
    api: tuple[str, ...] = (),
    store_tls: tuple[str, ...] = (),
) -> list[str]:
    """``api``: steps/tls.py's flags, when the inventory serves the Docker API over TLS;
    ``store_tls``: storetls.py's kv options, when dockerd reaches its store over HTTPS."""
    heartbeat, ttl = discovery
    return [
        *base,
        *api,
        f"--cluster-store={store_url(manager_ip, port)}",
        f"--cluster-advertise={advertise}:2376",
        f"--cluster-store-opt=discovery.heartbeat={heartbeat}",
        f"--cluster-store-opt=discovery.ttl={ttl}",
        *store_tls,
        *extra,
    ]


def render(cluster: str, base: list[str], argv: list[str], backup_dir: str) -> str:
    return (
        _env()
        .get_template("10-machine.conf.j2")
        .render(
            cluster=cluster,
            base=" ".join(systemd_quote(a) for a in base),
            exec_start=" ".join(systemd_quote(a) for a in argv),
            backup_dir=backup_dir,
        )
    )
