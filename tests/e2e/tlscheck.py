"""What the end-to-end modules use to check the Docker API's TLS (issue 12) from this
machine, as an admin's laptop would: `fab docker-env` evaluated, the docker CLI run with
it against a lab host's address, and bare TLS clients that must be refused."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

from overlaylab import certs
from overlaylab.steps import tls
from tests.e2e.clusterlab import FAB, ROOT, Lab


def tls_inventory(lab: Lab, name: str, hosts: list[int], mode: str | None = None, store: bool = False) -> Path:
    """The lab's inventory with the API over TLS (``store``: the cluster store too), its CA in
    the module's directory."""
    tls = {"docker_api": True, "ca_dir": str(lab.dir / "ca"), **({"store": True} if store else {})}
    return lab.inventory(name, hosts, mode, tls=tls)


def consul_answers(address: str, port: int, ca_dir: Path, scratch: Path) -> dict[str, str]:
    """What Consul at ``address:port`` answers, from this machine: refusals()'s three
    clients, and plain HTTP."""
    found = refusals(address, ca_dir, scratch, port, "/v1/status/leader")
    try:
        with socket.create_connection((address, port), timeout=10) as raw:
            raw.sendall(b"GET /v1/status/leader HTTP/1.0\r\n\r\n")
            found["plain HTTP"] = raw.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError as exc:
        found["plain HTTP"] = f"{type(exc).__name__}: {exc}"
    return found


def docker_env(inventory: Path, node: str) -> dict[str, str]:
    """`eval $(fab docker-env --node NODE)`: the variables its export lines set."""
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), "docker-env", "--node", node, "--inventory", str(inventory)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    env = {}
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"export (\w+)=(.*)", line)
        if match:
            env[match[1]] = shlex.split(match[2])[0]
    assert set(env) == {"DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"}, proc.stdout
    assert "docker context create" in proc.stdout and "PRIVATE" not in proc.stdout + proc.stderr
    return env


def docker_info(env: dict[str, str]) -> tuple[int, str]:
    """`docker info` on this machine with that environment alone (no other DOCKER_* leaks in).
    (exit code, output): the CLI exits 0 also when the daemon answered with an error, so
    the output (the host's name, or the error) is what tells."""
    docker = shutil.which("docker")
    assert docker, "the docker CLI is not installed on this machine"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    proc = subprocess.run(
        [docker, "info", "--format", "{{.Name}}"], capture_output=True, text=True, env={**clean, **env},
        stdin=subprocess.DEVNULL, timeout=60, check=False,
    )  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def refusals(
    address: str, ca_dir: Path, scratch: Path, port: int = certs.API_PORT, path: str = "/info"
) -> dict[str, str]:
    """What the API (or another TLS server of the CA's: ``port``, ``path``) answers, at
    ``address``, to a client without a certificate and to one whose certificate another CA
    signed; each must be refused (answered False). Beside them, the admin's own certificate
    through the same client, so that a refusal is the server's."""
    other, _ = certs.load_or_create(scratch / "other-ca", "someone else")
    certs.ensure_client(other)
    found = {}
    for label, client in (("admin", ca_dir), ("no certificate", None), ("another CA's", scratch / "other-ca")):
        answered, detail = tls.probe(address, ca_dir / certs.CA_CERT, client, port=port, path=path)
        found[label] = ("answered " if answered else "refused: ") + detail
    return found
