"""Unit tests (no hosts): the Docker API's TLS (issue 12) through the real step protocol on
fake connections (tests/unit/test_pipelines.py's), the inventory's tls section, the facts'
tls section, preflight's refusals and `fab docker-env`. The lab proves it on real dockerds
(tests/e2e/test_tls.py)."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from overlaylab import certs, dropins, facts, inventory, provision, render
from overlaylab.checks import preflight
from overlaylab.errors import InputError
from overlaylab.facts import HOST_CA, HOST_CERT, HOST_KEY
from overlaylab.inventory import Tls
from overlaylab.pipelines import kv, swarm
from overlaylab.report import RunReport
from overlaylab.run import Refused
from overlaylab.steps import tls
from tests.unit.test_pipelines import NAMES, FakeNode, Log, cluster, go, no_remote_services  # noqa: F401

STARTED = 1_700_000_000


def tls_inv(inv: inventory.Inventory, ca_dir: Path) -> inventory.Inventory:
    return dataclasses.replace(inv, tls=Tls(docker_api=True, ca_dir=ca_dir))


def installed(node: FakeNode, ca: certs.Authority, *, days: int = 365, at: int = STARTED - 100) -> None:
    """The host's facts as after an install of a certificate signed by ``ca``."""
    ips, names = tls.wanted_names(node)
    cert, _ = certs.issue(ca, node.name, ips=ips, names=names, days=days)
    ca_b64, cert_b64 = base64.b64encode(ca.pem).decode(), base64.b64encode(cert).decode()
    node.facts.tls_files = {HOST_CA: (at, ca_b64), HOST_CERT: (at, cert_b64), HOST_KEY: (at, "-")}
    node.facts.docker_started = STARTED


def on_tls(tmp_path: Path) -> tuple[inventory.Inventory, list[FakeNode], Log, certs.Authority]:
    """A bootstrapped cluster serving the API, every host with a certificate of the CA in tmp_path/ca."""
    inv, nodes, log = cluster("bootstrapped")
    inv = tls_inv(inv, tmp_path / "ca")
    settled(inv, nodes)
    ca, _ = certs.load_or_create(tmp_path / "ca", inv.cluster)
    for node in nodes:
        installed(node, ca)
    return inv, nodes, log, ca


def settled(inv: inventory.Inventory, nodes: list[FakeNode]) -> None:
    """A bootstrapped cluster whose drop-ins serve the API: anchors up, gossip listening."""
    for node in nodes:
        node.facts.containers[f"overlaylab-anchor-{node.name}"] = "anchor"
        node.facts.gossip = True
        node.facts.dropin = dropins.dropin(inv, node, "10.210.1.11").wanted


def test_the_inventory_turns_the_api_and_the_store_on(tmp_path: Path) -> None:
    base = "hosts:\n  m: {address: 10.0.0.1, role: manager, advertise: eth1}\n"
    p = tmp_path / "inv.yaml"
    p.write_text(base + "tls: {docker_api: true, ca_dir: ca}\n")
    inv = inventory.load(p)
    assert inv.tls.docker_api and inv.tls.ca_dir == tmp_path / "ca"  # relative to the inventory file
    p.write_text(base + "tls: {docker_api: yes please}\n")
    with pytest.raises(InputError, match=r"inv.yaml:3: tls.docker_api: must be true or false"):
        inventory.load(p)
    p.write_text(base + "tls: {store: true}\n")
    assert inventory.load(p).tls.store and inventory.load(p).tls.on
    p.write_text(base + "consul: {port: 65535}\ntls: {store: true}\n")
    with pytest.raises(InputError, match=r"consul.port: 65535: moving the store to HTTPS also uses the next port"):
        inventory.load(p)
    p.write_text(base)
    assert inventory.load(p).tls == Tls()  # off by default: the tutorial's drop-in


def test_the_drop_in_serves_the_api_over_tls_and_keeps_the_distributions_socket(tmp_path: Path) -> None:
    inv, nodes, _ = cluster()
    inv = tls_inv(inv, tmp_path)
    text = dropins.dropin(inv, nodes[1], "10.210.1.11").wanted or ""
    exec_start = render.split(text.split("ExecStart=")[-1])
    assert exec_start.count("-H") == 2 and "fd://" in exec_start and "tcp://0.0.0.0:2376" in exec_start
    assert "--tlsverify" in exec_start and f"--tlskey={HOST_KEY}" in exec_start
    assert render.insecure_tcp(exec_start) is None
    # a command line with no -H listened on the default socket: it stays
    assert dropins.with_api(["/usr/bin/dockerd"])[:2] == ["-H", "unix:///var/run/docker.sock"]
    off = dropins.dropin(dataclasses.replace(inv, tls=Tls()), nodes[1], "10.210.1.11").wanted or ""
    assert "--tls" not in off and "tcp://" not in off


def test_turning_the_api_on_installs_every_hosts_certificate_before_its_restart(tmp_path: Path) -> None:
    inv, nodes, log = cluster("bootstrapped")
    settled(inv, nodes)
    inv = tls_inv(inv, tmp_path / "ca")
    keeper = certs.Keeper(tmp_path / "ca", inv.cluster)
    code, dry = go(inv, nodes, kv.BOOTSTRAP, dry_run=True, ca=keeper)
    assert code == 0 and log.lines == [] and not (tmp_path / "ca").exists()  # a dry run makes no CA
    assert "would make a new CA in" in "\n".join(dry.notes)
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=keeper)
    assert code == 0, report.outcomes
    assert {(o["host"], o["status"]) for o in report.outcomes if o["step"] == "certs"} == {
        (n, "changed") for n in NAMES
    }
    for name in NAMES:  # the files arrive before the host's restart
        put = next(i for i, (h, c) in enumerate(log.lines) if h == name and c.startswith(f"put-secret {HOST_KEY}"))
        restart = next(i for i, (h, c) in enumerate(log.lines) if h == name and c == "restart-start")
        assert put < restart
    assert report.extra["restarts"] == dict.fromkeys(NAMES, "drop-in changed")
    assert oct((tmp_path / "ca" / certs.CA_KEY).stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "ca" / certs.CLIENT_CERT).exists()  # the admin's, for `fab docker-env`
    keys = [s for s in log.secrets if "PRIVATE KEY" in s]
    assert len(keys) == 3 and not any(k[40:80] in "\n".join(report.notes) + str(report.outcomes) for k in keys)
    assert not any("PRIVATE" in c for _, c in log.lines)  # never on a command line


def test_an_expiring_certificate_is_renewed_and_only_that_hosts_dockerd_restarts(tmp_path: Path) -> None:
    inv, nodes, log, ca = on_tls(tmp_path)
    keeper = certs.Keeper(tmp_path / "ca", inv.cluster)
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=keeper)
    assert code == 0 and report.changes == 0 and report.extra["restarts"] == {}
    installed(nodes[1], ca, days=10)
    code, dry = go(inv, nodes, kv.BOOTSTRAP, ca=keeper, dry_run=True)
    assert code == 0 and list(dry.extra["restarts"]) == ["w1"]  # type: ignore[call-overload]
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=keeper)
    renewed = [o for o in report.outcomes if o["step"] == "certs" and o["status"] == "changed"]
    assert [o["host"] for o in renewed] == ["w1"] and "renewed" in renewed[0]["detail"]
    assert "written after dockerd started" in report.extra["restarts"]["w1"]  # type: ignore[index]
    assert log.commands("restart-start") == ["w1"]


def test_a_certificate_of_another_ca_is_refused_before_any_change_unless_reissued(tmp_path: Path) -> None:
    inv, nodes, log, ours = on_tls(tmp_path)
    other, _ = certs.load_or_create(tmp_path / "other", "elsewhere")
    installed(nodes[2], other)
    with pytest.raises(Refused, match=r"w2: its certificate in /etc/overlaylab/tls/ca.pem was signed by another CA"):
        go(inv, nodes, kv.BOOTSTRAP, ca=certs.Keeper(tmp_path / "ca", inv.cluster))
    assert log.lines == []
    # the CA lost: a new one, and a new certificate for every host; the old CA kept aside
    keeper = certs.Keeper(tmp_path / "ca", inv.cluster, reissue=True)
    code, report = go(inv, nodes, kv.BOOTSTRAP, ca=keeper)
    assert code == 0, report.outcomes
    assert len([c for _, c in log.lines if c.startswith(f"put-secret {HOST_CERT}")]) == 3
    new = certs.load(tmp_path / "ca")
    assert new is not None and new.pem != ours.pem
    assert [p.name for p in (tmp_path / "ca").glob("replaced-*/ca-key.pem")] == ["ca-key.pem"]


def test_turning_the_api_off_restarts_without_the_flags_then_removes_the_files(tmp_path: Path) -> None:
    on, nodes, log, _ = on_tls(tmp_path)
    code, _ = go(dataclasses.replace(on, tls=Tls()), nodes, kv.BOOTSTRAP)  # tls off in the inventory
    assert code == 0
    for name in NAMES:
        restart = next(i for i, (h, c) in enumerate(log.lines) if h == name and c == "restart-start")
        removed = next(i for i, (h, c) in enumerate(log.lines) if h == name and "rm -rf /etc/overlaylab/tls" in c)
        assert restart < removed


def test_swarm_mode_writes_a_drop_in_with_the_api_flags_alone(tmp_path: Path) -> None:
    inv, nodes, log = cluster()
    inv = dataclasses.replace(tls_inv(inv, tmp_path / "ca"), mode="swarm")
    code, report = go(inv, nodes, swarm.BOOTSTRAP, ca=certs.Keeper(tmp_path / "ca", inv.cluster))
    assert code == 0, report.outcomes
    diff = report.extra["diffs"]["m"]  # type: ignore[index]
    assert "tcp://0.0.0.0:2376" in diff and "--cluster-store" not in diff
    assert log.commands("restart-start") == list(NAMES)
    assert all("{{.ID}}" in c for _, c in log.lines if "systemctl restart docker.service &&" in c)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: setattr(f, "daemon_json", {"hosts": ["unix://"]}), r"daemon.json sets hosts"),
        (lambda f: setattr(f, "daemon_json", {"tlsverify": True}), r"daemon.json sets tlsverify"),
        (
            lambda f: setattr(f, "exec_start", "/usr/bin/dockerd -H tcp://0.0.0.0:2376 --tlsverify -H fd://"),
            r"dockerd already serves tcp://0.0.0.0:2376",
        ),
        (
            lambda f: f.sockets.append(facts.Socket("tcp", "0.0.0.0", 2376, "nginx", 42)),
            r"tcp/2376 on 0.0.0.0 is held by nginx",
        ),
    ],
)
def test_preflight_refuses_what_the_api_flags_would_clash_with(
    tmp_path: Path, change: Callable[[facts.HostFacts], None], message: str
) -> None:
    inv, nodes, _ = cluster()
    inv = tls_inv(inv, tmp_path)
    assert preflight.tls_problems(inv, nodes[1]) == []
    change(nodes[1].facts)
    problems = preflight.tls_problems(inv, nodes[1])
    assert len(problems) == 1 and re.search(message, problems[0]), problems
    assert preflight.tls_problems(dataclasses.replace(inv, tls=Tls()), nodes[1]) == []


def test_the_facts_read_the_certificates_and_when_dockerd_started_but_never_the_key() -> None:
    assert "base64 -w0 $f" in facts.TLS_SCRIPT and f"{HOST_KEY} $(stat -c %Y {HOST_KEY}) -" in facts.TLS_SCRIPT
    out = (
        f"{facts.MARK}tls\nstarted 1700000000\n{HOST_CA} 1699999000 QUJD\n{HOST_CERT} 1699999000 REVG\n"
        f"{HOST_KEY} 1699999000 -\n{facts.MARK}end\n"
    )
    f = facts.parse(out, "eth1")
    assert f.docker_started == 1_700_000_000 and f.tls_files[HOST_KEY] == (1_699_999_000, "-")
    assert f.tls_files[HOST_CA] == (1_699_999_000, "QUJD")


def test_docker_env_prints_export_lines_and_a_context_for_the_inventory_address(tmp_path: Path) -> None:
    inv, _, _ = cluster()
    with pytest.raises(InputError, match=r"tls\.docker_api is not on"):
        provision.docker_env(inv, "w1")
    inv = tls_inv(inv, tmp_path / "ca")
    with pytest.raises(InputError, match="no CA for cluster lab: run bootstrap-cluster first"):
        provision.docker_env(inv, "w1")
    certs.load_or_create(tmp_path / "ca", inv.cluster)
    out = provision.docker_env(inv, "w1")
    lines = out.splitlines()
    assert lines[:3] == [
        "export DOCKER_HOST=tcp://w1.example:2376",
        "export DOCKER_TLS_VERIFY=1",
        f"export DOCKER_CERT_PATH={tmp_path / 'ca'}",
    ]
    assert "docker context create lab-w1 --docker host=tcp://w1.example:2376,ca=" in out
    assert "PRIVATE" not in out
    with pytest.raises(InputError, match="no host named 'nope'"):
        provision.docker_env(inv, "nope")


def test_an_unreadable_ca_directory_ca_key_or_admin_key_is_an_input_error(tmp_path: Path) -> None:
    """Root reads any file, and CI runs as root: unreadable here is a directory where a file
    should be, which root cannot read as one either (the same OSError path)."""
    d = tmp_path / "ca"
    ca, _ = certs.load_or_create(d, "c")
    certs.ensure_client(ca)
    (d / certs.CLIENT_KEY).unlink()
    (d / certs.CLIENT_KEY).mkdir()
    with pytest.raises(InputError, match=r"ca/key.pem: cannot read the admin key"):
        certs.Keeper(d, "c")
    (d / certs.CA_KEY).unlink()
    (d / certs.CA_KEY).mkdir()
    with pytest.raises(InputError, match=r"ca/ca-key.pem: cannot read the CA key"):
        certs.Keeper(d, "c")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(InputError, match=r"file: the CA directory cannot be read \(not a directory\)"):
        certs.Keeper(f, "c")


def test_remove_ca_takes_only_the_files_it_wrote(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    certs.load_or_create(d, "c")
    (d / "notes.txt").write_text("the admin's own")
    assert certs.remove(d) == f"removed the CA in {d}"
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    assert certs.remove(tmp_path / "none") == f"no CA in {tmp_path / 'none'}"


def test_join_node_installs_the_joining_workers_certificate_alone(tmp_path: Path) -> None:
    inv, nodes, log, _ = on_tls(tmp_path)
    nodes[2].facts.tls_files = {}  # w2 joins: no certificate yet
    code, report = go(inv, nodes, kv.BOOTSTRAP, targets=("w2",), ca=certs.Keeper(tmp_path / "ca", inv.cluster))
    assert code == 0, report.outcomes
    assert {h for h, c in log.lines if c.startswith("put-secret")} == {"w2"}
    assert statuses_of(report, "certs") == {"w2": "changed"}


def test_in_ha_mode_the_api_flags_sit_beside_the_local_agents_store(tmp_path: Path) -> None:
    inv, nodes, _ = cluster()
    inv = dataclasses.replace(tls_inv(inv, tmp_path), consul_servers=NAMES)
    argv = render.split((dropins.dropin(inv, nodes[1], "10.210.1.11").wanted or "").split("ExecStart=")[-1])
    assert "--cluster-store=consul://127.0.0.1:8500" in argv and "tcp://0.0.0.0:2376" in argv
    assert argv.index("tcp://0.0.0.0:2376") < argv.index("--cluster-store=consul://127.0.0.1:8500")


def statuses_of(report: RunReport, step: str) -> dict[str, str]:
    return {o["host"]: o["status"] for o in report.outcomes if o["step"] == step}


def test_teardown_keeps_the_files_where_the_drop_in_could_not_be_restored(tmp_path: Path) -> None:
    """w1's restore fails: its dockerd still reads the certificates, so they stay there (an
    `ok` line saying why, not a change), and go everywhere else."""
    inv, nodes, log, _ = on_tls(tmp_path)
    log.fail = {"w1": "systemctl restart docker.service"}
    code, report = go(inv, nodes, kv.TEARDOWN, teardown=True)
    assert code == 1
    removed = {h for h, c in log.lines if c == "rm -rf /etc/overlaylab/tls"}
    assert removed == {"m", "w2"}
    kept = next(o for o in report.outcomes if o["host"] == "w1" and o["step"] == "certs")
    assert kept["status"] == "ok" and "the drop-in still uses them" in kept["detail"]
