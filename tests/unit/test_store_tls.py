"""Unit tests (no hosts): TLS to the cluster store (storetls.py, `tls: {store: true}`) through
the real step protocol on fake connections (tests/unit/test_pipelines.py's): Consul's
listeners and config, the drop-in's kv options, and the two rounds of a move between HTTP
and HTTPS, in the dry run's plan and in the run. The facts' leader script runs for real
under bash against a local socket. The lab proves the rest on real Consul and dockerds
(tests/e2e/test_bootstrap_kv.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import socket
import subprocess
import threading
from pathlib import Path

from overlaylab import certs, facts, storetls
from overlaylab.facts import DROPIN
from overlaylab.inventory import Inventory, Tls
from overlaylab.pipelines import kv
from overlaylab.steps import consul
from tests.unit.test_pipelines import FakeNode, Log, cluster, go, no_remote_services  # noqa: F401
from tests.unit.test_tls import installed, settled

MANAGER_IP = "10.210.1.11"
WRITE_RE = re.compile(rf"echo (\S+) \| base64 -d > {re.escape(DROPIN)}\.overlaylab-tmp")


def with_store(inv: Inventory, ca_dir: Path, on: bool = True) -> Inventory:
    return dataclasses.replace(inv, tls=Tls(store=on, ca_dir=ca_dir))


def consul_runs(log: Log) -> list[tuple[int, str]]:
    return [(i, c) for i, (_, c) in enumerate(log.lines) if "docker run" in c and "overlaylab-consul" in c]


def dropins_written(log: Log, host: str) -> list[tuple[int, str]]:
    found = []
    for i, (h, command) in enumerate(log.lines):
        match = WRITE_RE.search(command)
        if h == host and match:
            found.append((i, base64.b64decode(match[1]).decode()))
    return found


def moves(outcomes: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(host, step, where to) of each Consul and dockerd change, in order."""
    found = []
    for o in outcomes:
        if o["step"] in ("consul", "dockerd") and o["status"] == "changed":
            m = re.search(
                r"serve (https?:\d+(?:,https?:\d+)*)|moves to (\w+ on :\d+)|store now (\w+ on :\d+)", o["detail"]
            )
            found.append((o["host"], o["step"], next((g for g in m.groups() if g), "") if m else ""))
    return found


def settle_certs(nodes: list[FakeNode], ca_dir: Path) -> None:
    """The run's certificates as the facts read them, written before the daemons last started."""
    ca = certs.load(ca_dir)
    assert ca is not None
    for node in nodes:
        installed(node, ca)


def test_a_fresh_cluster_gets_consul_on_https_alone_and_every_dockerd_its_kv_options(tmp_path: Path) -> None:
    inv, nodes, log = cluster()
    inv = with_store(inv, tmp_path / "ca")
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=certs.Keeper(tmp_path / "ca", inv.cluster))
    assert code == 0, report.outcomes
    runs = consul_runs(log)
    assert len(runs) == 1  # straight to the end state: nothing to move
    at, command = runs[0]
    assert f"-config-file={storetls.CONFIG_MOUNT}" in command and "-http-port" not in command
    assert f"-v /etc/overlaylab/tls:{storetls.MOUNT}:ro" in command
    assert f"{storetls.LABEL}=https:8500" in command
    certs_put = [i for i, (_, c) in enumerate(log.lines) if c.startswith("put-secret /etc/overlaylab/tls/")]
    assert len(certs_put) == 3 * 3 and max(certs_put) < at  # every host's files before Consul starts with them
    config = json.loads(next(s for s in log.secrets if '"verify_incoming"' in s))
    assert config["ports"] == {"http": -1, "https": 8500} and config["verify_incoming"] is True
    for node in nodes:
        written = dropins_written(log, node.name)
        assert len(written) == 1, node.name
        assert f"--cluster-store=consul://{MANAGER_IP}:8500" in written[0][1]
        assert all(opt in written[0][1] for opt in storetls.kv_opts())
    assert (tmp_path / "ca" / certs.CLIENT_CERT).exists()  # our own client's, before Consul asks for it


def test_moving_a_running_cluster_to_https_takes_two_rounds_and_the_dry_run_says_so(tmp_path: Path) -> None:
    inv, nodes, log = cluster("bootstrapped")
    settled(inv, nodes)
    inv = with_store(inv, tmp_path / "ca")
    code, dry = go(inv, nodes, kv.BOOTSTRAP, ca=certs.Keeper(tmp_path / "ca", inv.cluster), allow_restart=True,
                   dry_run=True)  # fmt: skip
    assert code == 0 and not consul_runs(log)
    wanted = [
        ("m", "consul", "http:8500,https:8501"),
        *[(h, "dockerd", "https on :8501") for h in ("m", "w1", "w2")],
        ("m", "consul", "https:8500"),
        *[(h, "dockerd", "https on :8500") for h in ("m", "w1", "w2")],
    ]
    assert moves(dry.outcomes) == wanted
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=certs.Keeper(tmp_path / "ca", inv.cluster), allow_restart=True)
    assert code == 0, report.outcomes
    assert moves(report.outcomes) == wanted  # what the dry run said is what the run did
    (first_at, first), (second_at, second) = consul_runs(log)
    assert f"{storetls.LABEL}=http:8500,https:8501" in first and f"{storetls.LABEL}=https:8500" in second
    for node in nodes:
        (one_at, one), (two_at, two) = dropins_written(log, node.name)
        assert first_at < one_at < second_at < two_at, node.name  # both schemes serve while it moves
        assert f"consul://{MANAGER_IP}:8501" in one and f"consul://{MANAGER_IP}:8500" in two
        assert all(opt in one and opt in two for opt in storetls.kv_opts())
    # a re-run with nothing to change changes nothing
    settle_certs(nodes, tmp_path / "ca")
    before = len(log.lines)
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=certs.Keeper(tmp_path / "ca", inv.cluster))
    assert code == 0 and report.changes == 0, [o for o in report.outcomes if o["status"] == "changed"]
    assert not [c for _, c in log.lines[before:] if "docker run" in c or "systemctl restart" in c]
    # and back to plain HTTP: the same two rounds the other way, then the files go
    off = with_store(inv, tmp_path / "ca", on=False)
    before = len(log.lines)
    code, report = go(off, nodes, kv.BOOTSTRAP, ca=None, allow_restart=True)
    assert code == 0, report.outcomes
    assert moves(report.outcomes) == [
        ("m", "consul", "https:8500,http:8501"),
        *[(h, "dockerd", "http on :8501") for h in ("m", "w1", "w2")],
        ("m", "consul", "http:8500"),
        *[(h, "dockerd", "http on :8500") for h in ("m", "w1", "w2")],
    ]
    last = [c for _, c in consul_runs(Log(lines=log.lines[before:]))][-1]
    assert "-config-file" not in last and "-http-port=8500" in last
    assert {h for h, c in log.lines[before:] if c == "rm -rf /etc/overlaylab/tls"} == {"m", "w1", "w2"}
    for node in nodes:
        assert "kv.certfile" not in (node.facts.dropin or "")


def test_the_official_consul_image_keeps_root_to_read_the_root_only_certificates() -> None:
    inv, _, _ = cluster()
    hashi = dataclasses.replace(inv, consul_image="hashicorp/consul", consul_flavor="hashicorp")
    listeners = ((storetls.HTTPS, 8500),)
    command = consul.run_command(hashi, MANAGER_IP, None, "server", (), listeners)
    assert "CONSUL_DISABLE_PERM_MGMT=1" in command and "-http-port" not in command
    assert "CONSUL_DISABLE_PERM_MGMT" not in consul.run_command(hashi, MANAGER_IP, None, "server", ())


def test_a_cluster_without_store_tls_keeps_its_consul_spec() -> None:
    """Clusters made before storetls.py: the same spec, so no Consul is made again on upgrade."""
    inv, _, _ = cluster()
    plain = storetls.plain(inv.consul_port)
    assert consul.spec_hash(inv, MANAGER_IP) == consul.spec_hash(inv, MANAGER_IP, listeners=plain)
    assert consul.spec_hash(inv, MANAGER_IP) != consul.spec_hash(inv, MANAGER_IP, listeners=storetls.final(
        dataclasses.replace(inv, tls=Tls(store=True))))  # fmt: skip


def serve_once(answer: bytes) -> int:
    """A one-shot TCP server on loopback that answers any request with ``answer``."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def reply() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(answer)
        server.close()

    threading.Thread(target=reply, daemon=True).start()
    return int(server.getsockname()[1])


def test_the_facts_leader_script_takes_a_200_answer_only() -> None:
    """A Consul on HTTPS answers the script's plain HTTP with a 400 whose body must not pass
    for a leader (consulapi.leader_over_https asks it over TLS instead)."""
    ok = serve_once(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"10.0.0.1:8300"')
    out = subprocess.run(["bash", "-c", facts.store_leader_script("127.0.0.1", ok)], capture_output=True, text=True)
    assert out.stdout.strip() == '"10.0.0.1:8300"'
    https = serve_once(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
    out = subprocess.run(["bash", "-c", facts.store_leader_script("127.0.0.1", https)], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_in_ha_mode_every_agent_serves_https_and_each_dockerd_moves_with_its_own(tmp_path: Path) -> None:
    """Three servers (every host): each agent's RPC and HTTPS under TLS, each dockerd on its own
    agent at 127.0.0.1; turned off, the two rounds run on every agent."""
    inv, nodes, log = cluster()
    inv = dataclasses.replace(with_store(inv, tmp_path / "ca"), consul_servers=("m", "w1", "w2"))
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=certs.Keeper(tmp_path / "ca", inv.cluster))
    assert code == 0, report.outcomes
    runs = consul_runs(log)
    assert len(runs) == 3
    for _, command in runs:
        assert f"-config-file={storetls.CONFIG_MOUNT}" in command and f"-config-file={consul.KEY_MOUNT}" in command
        assert "-http-port" not in command and f"{storetls.LABEL}=https:8500" in command
    for node in nodes:
        ((_, written),) = dropins_written(log, node.name)
        assert "--cluster-store=consul://127.0.0.1:8500" in written
        assert all(opt in written for opt in storetls.kv_opts())
    settle_certs(nodes, tmp_path / "ca")
    off = dataclasses.replace(inv, tls=Tls(ca_dir=tmp_path / "ca"))
    before = len(log.lines)
    code, report = go(off, nodes, kv.BOOTSTRAP, ca=None, allow_restart=True)
    assert code == 0, report.outcomes
    after = [c for _, c in consul_runs(Log(lines=log.lines[before:]))]
    served = [c.split(f"{storetls.LABEL}=")[1].split()[0] for c in after]
    assert served == ["https:8500,http:8501"] * 3 + ["http:8500"] * 3
    assert "-http-port=8500" in after[-1] and storetls.CONFIG_MOUNT not in after[-1]
    for node in nodes:
        (_, one), (_, two) = [(i, t) for i, t in dropins_written(log, node.name) if i >= before]
        assert "consul://127.0.0.1:8501" in one and "consul://127.0.0.1:8500" in two
        assert "kv.certfile" not in one + two
