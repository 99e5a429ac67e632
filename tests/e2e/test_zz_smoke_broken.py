"""End to end, real components: the smoke suite catches a deliberately broken cluster
and names the host. Runs last (file name), on a lab of its own: a broken node of the
legacy overlay may not heal by itself, so no other test may share it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.clusterlab import DROPIN, Lab, fab, module_lab, run_smoke
from tests.e2e.labtools import sh

NAME, RANGE = "e2ebrk", "10.214.0.0/16"


def _bootstrap_then_break(lab: Lab) -> None:
    code, _, err = fab("bootstrap-cluster", "--inventory", str(lab.inventory("broken", [1, 2, 3])))
    assert code == 0, err
    # bm-docker-02: our drop-in removed and docker restarted; bm-docker-03: docker stopped
    conn = lab.conn(2)
    sh(conn, f"rm -f {DROPIN} && systemctl daemon-reload && systemctl restart docker")
    conn.close()
    conn = lab.conn(3)
    sh(conn, "systemctl stop docker.socket docker.service")
    conn.close()


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from module_lab(tmp_path_factory, NAME, "legacy,legacy,legacy", RANGE, _bootstrap_then_break)


def test_the_smoke_suite_fails_where_the_cluster_is_broken_and_names_the_host(broken: Lab) -> None:
    inventory = broken.dir / "broken.yaml"
    passed, failures, _ = run_smoke(inventory, inventory.parent / "smoke.xml")
    assert passed > 0
    expected = {
        "test_dockerd_runs[bm-docker-03]": "bm-docker-03: docker.service is inactive",
        "test_dockerd_runs_with_our_cluster_flags[bm-docker-02]": "bm-docker-02: dockerd runs",
        "test_drop_in_on_disk_is_what_the_templates_render[bm-docker-02]": "bm-docker-02: /etc/systemd/system/docker.service.d/10-machine.conf is missing",
        "test_containers_ping_by_ip[bm-docker-01->bm-docker-03]": "bm-docker-03: no probe container",
        "test_engine_version_has_the_cluster_store[bm-docker-03]": "bm-docker-03: dockerd does not answer",
    }
    for test, message in expected.items():
        assert test in failures, f"{test} did not fail; failures: {sorted(failures)}"
        assert message in failures[test], f"{test}: {failures[test]!r}"
    # every failure is about one of the two broken hosts, and the healthy host's own checks pass
    for test, message in failures.items():
        assert "bm-docker-02" in test + message or "bm-docker-03" in test + message, (test, message)
    assert not any(t.endswith("[bm-docker-01]") for t in failures)
