"""Unit tests (no hosts, fake connections): the registered step of the kv backend. A host
that does not register in Consul fails and takes no further step; the others go on."""

from __future__ import annotations

import pytest

from overlaylab.pipelines import kv
from overlaylab.steps import consul
from tests.unit.test_pipelines import NAMES, cluster, go, no_remote_services  # noqa: F401 (autouse)


def test_every_host_registered_is_a_check_that_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[dict[str, str]] = []

    def wait(inv: object, node: object, wanted: dict[str, str]) -> dict[str, bool]:
        asked.append(wanted)
        return dict.fromkeys(wanted, True)

    monkeypatch.setattr(consul, "wait_registered", wait)
    inv, nodes, _ = cluster()
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 0
    assert asked == [{"m": "10.210.1.11", "w1": "10.210.1.12", "w2": "10.210.1.13"}]
    rows = {o["host"]: (o["status"], o["detail"]) for o in report.outcomes if o["step"] == "registered"}
    assert rows == {n: ("ok", f"docker/nodes/{ip}:2376") for n, ip in asked[0].items()}


def test_the_dry_run_says_the_run_will_check_it(monkeypatch: pytest.MonkeyPatch) -> None:
    inv, nodes, log = cluster()
    code, report = go(inv, nodes, kv.BOOTSTRAP, dry_run=True)
    assert code == 0 and log.lines == []
    assert {o["host"] for o in report.outcomes if o["step"] == "registered"} == set(NAMES)


def test_a_host_that_does_not_register_fails_and_gets_no_anchor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consul, "wait_registered", lambda inv, node, wanted: {n: n != "w2" for n in wanted})
    inv, nodes, log = cluster()
    code, report = go(inv, nodes, kv.BOOTSTRAP)
    assert code == 1
    failed = [(o["host"], o["step"], o["detail"]) for o in report.outcomes if o["status"] == "failed"]
    assert failed == [("w2", "registered", "no docker/nodes/10.210.1.13:2376 in Consul")]
    anchored = {h for h, c in log.lines if "overlaylab-anchor" in c and "docker run" in c}
    assert anchored == {"m", "w1"}
