"""Per-lab SSH identity: the admin's client key, each host's own host key and
machine-id, and the known_hosts file that makes strict host-key checking work
from the first connection. Kept in the lab's state directory so a replaced host
comes back with the same identity and known_hosts stays true.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import uuid
from pathlib import Path

from overlaylab.lab.spec import HostSpec, LabSpec

STATE = Path("/var/lib/overlaylab/labs")


def state_dir(lab: str) -> Path:
    return STATE / lab


def _keygen(path: Path, comment: str) -> None:
    if path.exists() and path.with_suffix(".pub").exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)


def client_key(spec: LabSpec) -> Path:
    key = state_dir(spec.name) / "id_ed25519"
    _keygen(key, f"overlaylab-{spec.name}-admin")
    return key


def host_key(spec: LabSpec, host: HostSpec) -> Path:
    key = state_dir(spec.name) / "hosts" / host.name / "ssh_host_ed25519_key"
    _keygen(key, f"root@{host.name}")
    return key


def machine_id(spec: LabSpec, host: HostSpec) -> str:
    path = state_dir(spec.name) / "hosts" / host.name / "machine-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex + "\n")
    return path.read_text().strip()


def known_hosts_text(spec: LabSpec) -> str:
    lines = []
    for host in spec.hosts:
        pub = host_key(spec, host).with_suffix(".pub").read_text().split()
        lines.append(f"{host.mgmt_ip} {pub[0]} {pub[1]}")
    return "\n".join(lines) + "\n"


def hosts_file(spec: LabSpec, host: HostSpec) -> str:
    """/etc/hosts of a lab host: itself and every other host, by cluster address."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    lines += [f"{h.cluster_ip} {h.name}" for h in spec.hosts]
    return "\n".join(lines) + "\n"


def inner_daemon_json(spec: LabSpec, host: HostSpec) -> str:
    """Inner engine settings: every address inside the lab's range, DNS only inside the lab.

    In daemon.json, not as flags: a drop-in that adds the same flags would stop dockerd.
    """
    conf = {
        "bip": spec.inner_bip,
        "default-address-pools": [{"base": spec.inner_pool, "size": 24}],
        "dns": [host.cluster_ip],
    }
    return json.dumps(conf, indent=2) + "\n"


def identity_tar(spec: LabSpec, host: HostSpec) -> bytes:
    """The per-host files, as a tar stream for `docker cp - CONTAINER:/`."""
    key = host_key(spec, host)
    files: list[tuple[str, bytes, int]] = [
        ("etc/machine-id", (machine_id(spec, host) + "\n").encode(), 0o444),
        ("etc/ssh/ssh_host_ed25519_key", key.read_bytes(), 0o600),
        ("etc/ssh/ssh_host_ed25519_key.pub", key.with_suffix(".pub").read_bytes(), 0o644),
        ("home/admin/.ssh/authorized_keys", client_key(spec).with_suffix(".pub").read_bytes(), 0o600),
        ("etc/overlaylab/hosts", hosts_file(spec, host).encode(), 0o644),
        ("etc/overlaylab/interfaces", f"eth0 {host.mgmt_ip}\neth1 {host.cluster_ip}\n".encode(), 0o644),
        ("etc/docker/daemon.json", inner_daemon_json(spec, host).encode(), 0o644),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for directory in ("etc/docker", "etc/overlaylab"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
