"""Lab images: the host images (Debian roots made by debootstrap) and the images
the hosts' own engines need (busybox, a Consul that keeps progrium/consul's contract).

Each recipe has a fingerprint of all its inputs. The outer engine's tag carries it,
and the built root is kept in the cache, so an image is rebuilt only when an input
changes, and re-imported (not rebuilt) when only the engine lost it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from overlaylab.errors import CommandError, InputError
from overlaylab.lab.docker import Docker

CACHE = Path(os.environ.get("OVERLAYLAB_CACHE", "/var/cache/overlaylab"))
SCHEMA = "1"  # bump to force every image to rebuild
NODE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "iptables",
    "ca-certificates", "docker.io", "procps", "iputils-ping", "sudo", "util-linux",
    "kmod", "less", "curl",
)  # fmt: skip
SUITE_EXTRA = {"trixie": ("docker-cli",)}  # trixie's docker.io only recommends its CLI
ENTRYPOINT = "/usr/local/sbin/overlaylab-entrypoint"
CONSUL_CONFIG = {"data_dir": "/data", "ui": True, "client_addr": "0.0.0.0", "ports": {"dns": 53}}
CONSUL_START = (
    "#!/bin/sh\n# progrium/consul contract: agent flags come as arguments\n"
    'exec /bin/consul agent -config-dir=/config "$@"\n'
)
INNER_TAGS = {
    "busybox": "busybox:latest",
    "consul": "progrium/consul:latest",
    "consul-hashicorp": "hashicorp/consul:latest",
}
# The official image's contract (hashicorp/docker-consul, docker-entrypoint.sh), on the same
# Consul binary: `agent ...` gets /consul/data and /consul/config, and Consul drops to the
# consul user (busybox su for su-exec) unless CONSUL_DISABLE_PERM_MGMT is set.
HASHICORP_ENTRYPOINT = """#!/bin/sh
set -e
CONSUL_DATA_DIR=/consul/data
CONSUL_CONFIG_DIR=/consul/config
if [ "${1#-}" != "$1" ]; then set -- consul "$@"; fi
if [ "$1" = agent ]; then
    shift
    set -- consul agent -data-dir="$CONSUL_DATA_DIR" -config-dir="$CONSUL_CONFIG_DIR" "$@"
elif [ "$1" = version ]; then
    set -- consul "$@"
fi
if [ "$1" = consul ] && [ -z "${CONSUL_DISABLE_PERM_MGMT+x}" ]; then
    [ "$(stat -c %u "$CONSUL_DATA_DIR")" = "$(id -u consul)" ] || chown consul:consul "$CONSUL_DATA_DIR"
    [ "$(stat -c %u "$CONSUL_CONFIG_DIR")" = "$(id -u consul)" ] || chown consul:consul "$CONSUL_CONFIG_DIR"
    shift
    exec su -s /bin/sh -c 'exec "$0" "$@"' -- consul /bin/consul "$@"
fi
exec "$@"
"""
HASHICORP_USERS = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    "consul:x:100:1000:consul:/consul:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\nconsul:x:1000:consul\n",
}


def lab_file(name: str) -> bytes:
    return resources.files("overlaylab.lab").joinpath("files").joinpath(name).read_bytes()


def debian_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The mirror the machine's own apt uses, so the lab needs no other source."""
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", path.read_text(), re.M)
        if match:
            return match.group(1)
    sources = etc_apt / "sources.list"
    if sources.exists():
        match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s", sources.read_text(), re.M)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def _run(argv: list[str], **kwargs: object) -> str:
    proc = subprocess.run(argv, capture_output=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise CommandError(
            argv, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        )
    return str(proc.stdout.decode(errors="replace"))


@dataclass(frozen=True)
class Recipe:
    """How to make one image, and everything its result depends on."""

    kind: str  # node-bullseye, node-trixie, busybox, consul
    inputs: tuple[str, ...]
    build_root: Callable[[Path], None]
    changes: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256("\0".join((SCHEMA, self.kind, *self.inputs)).encode())
        return digest.hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"overlaylab/{self.kind}:{self.fingerprint}"

    @property
    def cache_file(self) -> Path:
        return CACHE / f"{self.kind}-{self.fingerprint}.tar"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def node_recipe(suite: str) -> Recipe:
    packages = NODE_PACKAGES + SUITE_EXTRA.get(suite, ())
    customize = lab_file("customize.sh")
    entrypoint = lab_file("entrypoint.sh")
    extra = os.environ.get("OVERLAYLAB_NODE_EXTRA_PACKAGES", "")
    packages += tuple(p for p in extra.split(",") if p)

    def build(root: Path) -> None:
        _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), suite, str(root), debian_mirror()])
        (root / "tmp/customize.sh").write_bytes(customize)
        _run(["chroot", str(root), "/bin/sh", "/tmp/customize.sh"])
        (root / "tmp/customize.sh").unlink()
        target = root / ENTRYPOINT.lstrip("/")
        target.write_bytes(entrypoint)
        target.chmod(0o755)

    return Recipe(
        kind=f"node-{suite}",
        inputs=(suite, ",".join(packages), _sha(customize), _sha(entrypoint)),
        build_root=build,
        changes=("ENV container=docker", f'ENTRYPOINT ["{ENTRYPOINT}"]', "CMD []"),
    )


def _is_static(path: Path) -> bool:
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    return "not a dynamic executable" in (proc.stdout + proc.stderr)


def _install_busybox(root: Path) -> None:
    busybox = Path("/bin/busybox")
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = _run([str(busybox), "--list"]).split()
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for d in ("tmp", "etc", "root", "proc", "sys", "dev"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")


def busybox_recipe() -> Recipe:
    if not Path("/bin/busybox").exists() or not _is_static(Path("/bin/busybox")):
        raise InputError("the lab's busybox image needs Debian's busybox-static (apt-get install busybox-static)")
    return Recipe(
        kind="busybox",
        inputs=(_sha(Path("/bin/busybox").read_bytes()),),
        build_root=_install_busybox,
        changes=('CMD ["sh"]',),
    )


def download_deb(suite: str, package: str, dest: Path) -> Path:
    """Fetch one .deb of another Debian suite with a private apt configuration."""
    base = CACHE / f"apt-{suite}"
    (base / "lists/partial").mkdir(parents=True, exist_ok=True)
    (base / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (base / "sources.list").write_text(f"deb [signed-by={keyring}] {debian_mirror()} {suite} main\n")
    opts = [
        "-o", f"Dir::Etc::SourceList={base / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={base / 'lists'}",
        "-o", f"Dir::Cache={base / 'cache'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip
    _run(["apt-get", *opts, "-qq", "update"])
    _run(["apt-get", *opts, "-qq", "download", package], cwd=str(dest))
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise InputError(f"apt-get download {package} ({suite}) produced no .deb")
    return debs[-1]


def _install_consul(root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        deb = download_deb("bullseye", "consul", Path(tmp))
        _run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"])
        _install_busybox(root)
        binary = Path(tmp) / "x/usr/bin/consul"
        shutil.copy2(binary, root / "bin/consul")
    # The binary is linked to glibc: bring the libraries ldd names.
    for line in _run(["ldd", str(root / "bin/consul")]).splitlines():
        for part in line.split():
            if part.startswith("/") and Path(part).exists():
                target = root / part.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(part), target)
    (root / "bin/start").write_text(CONSUL_START)
    (root / "bin/start").chmod(0o755)
    (root / "config").mkdir()
    (root / "config/consul.json").write_text(json.dumps(CONSUL_CONFIG, indent=2) + "\n")
    (root / "data").mkdir()


def consul_recipe() -> Recipe:
    return Recipe(
        kind="consul",
        inputs=("bullseye", "consul", CONSUL_START, json.dumps(CONSUL_CONFIG, sort_keys=True)),
        build_root=_install_consul,
        changes=('ENTRYPOINT ["/bin/start"]', "CMD []", "EXPOSE 8300 8301 8301/udp 8302 8302/udp 8400 8500 53/udp"),
    )


@dataclass(frozen=True)
class Derived:
    """An image made from another one by adding files (one more layer, committed): it shares
    the base's layer in the engine and in the hosts' bundle, so a second Consul image costs
    kilobytes, not the binary's 70 MB again."""

    kind: str
    base: Recipe
    files: tuple[tuple[str, int, str], ...]  # (path, mode, text); a path ending in / is a directory
    changes: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        parts = (SCHEMA, self.kind, self.base.fingerprint, repr(self.files), *self.changes)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"overlaylab/{self.kind}:{self.fingerprint}"

    def layer(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path, mode, text in self.files:
                info = tarfile.TarInfo(path.rstrip("/"))
                info.mode, info.mtime = mode, 0
                data = text.encode()
                if path.endswith("/"):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def hashicorp_recipe(consul: Recipe) -> Derived:
    """A Consul image with the official image's contract (`agent ...`, /consul/data, the
    consul user), from the lab's own Consul binary: no registry needed."""
    files = (
        ("usr/local/bin/", 0o755, ""),
        ("usr/local/bin/docker-entrypoint.sh", 0o755, HASHICORP_ENTRYPOINT),
        ("consul/", 0o755, ""),
        ("consul/data/", 0o755, ""),
        ("consul/config/", 0o755, ""),
        *((path, 0o644, text) for path, text in HASHICORP_USERS.items()),
    )
    changes = (
        'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]',
        'CMD ["agent", "-dev", "-client", "0.0.0.0"]',
        "VOLUME /consul/data",
        "EXPOSE 8300 8301 8301/udp 8302 8302/udp 8500 8600 8600/udp",
    )
    return Derived("consul-hashicorp", consul, files, changes)


def ensure_derived(docker: Docker, recipe: Derived) -> str:
    """Make the derived image present: a container of its base, the files copied in, committed."""
    if docker.inspect("image", recipe.tag) is not None:
        return "ok"
    cid = docker.out("create", recipe.base.tag)
    try:
        docker.run("cp", "-", f"{cid}:/", input=recipe.layer())
        args: list[str] = []
        for change in (*recipe.changes, f"LABEL overlaylab.image={recipe.kind}"):
            args += ["-c", change]
        docker.run("commit", *args, cid, recipe.tag)
    finally:
        docker.run("rm", "-f", cid, check=False)
    return "built"


def ensure(docker: Docker, recipe: Recipe, log: Callable[[str], None] = lambda _m: None) -> str:
    """Make the recipe's image present in the engine; returns how (ok/imported/built)."""
    if docker.inspect("image", recipe.tag) is not None:
        return "ok"
    how = "imported"
    if not recipe.cache_file.exists():
        how = "built"
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=f"build-{recipe.kind}-") as tmp:
            root = Path(tmp) / "root"
            root.mkdir()
            log(f"building {recipe.tag}")
            recipe.build_root(root)
            partial = recipe.cache_file.with_suffix(".partial")
            _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."])
            partial.rename(recipe.cache_file)
        for stale in CACHE.glob(f"{recipe.kind}-*.tar"):
            if stale != recipe.cache_file:
                stale.unlink()
    args: list[str] = []
    for change in recipe.changes:
        args += ["-c", change]
    with open(recipe.cache_file, "rb") as tar:
        docker.run("import", *args, "-c", f"LABEL overlaylab.image={recipe.kind}", "-", recipe.tag, stdin=tar)
    return how


def inner_bundle(docker: Docker, recipes: list[Recipe | Derived]) -> Path:
    """One `docker save` archive of the images every lab host's engine loads."""
    name = "-".join(r.fingerprint for r in recipes)
    path = CACHE / f"inner-{name}.tar"
    if not path.exists():
        partial = path.with_suffix(".partial")
        docker.run("save", "-o", str(partial), *(r.tag for r in recipes))
        partial.rename(path)
        for stale in CACHE.glob("inner-*.tar"):
            if stale != path:
                stale.unlink()
    return path
