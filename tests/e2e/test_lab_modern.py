"""End to end, real components: modern-engine hosts (trixie, Docker 26.x) and a mixed lab."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from overlaylab.lab import hosts, lifecycle
from overlaylab.lab.spec import build_spec
from tests.e2e.labtools import E2E_RANGE, outer, require_lab, sh, ssh

NAME = "e2emod"


@pytest.fixture(scope="module")
def modern_lab() -> Iterator[lifecycle.UpResult]:
    require_lab()
    lifecycle.down(NAME)
    yield lifecycle.up(NAME, count=2, engine_opt="modern", addr_range=E2E_RANGE)
    lifecycle.down(NAME)


def test_modern_hosts_run_docker_26(modern_lab: lifecycle.UpResult) -> None:
    spec = build_spec(NAME, "modern", 2, addr_range=E2E_RANGE)
    for host in spec.hosts:
        conn = ssh(spec, host)
        assert sh(conn, "systemctl is-system-running", sudo=False) == "running"
        assert sh(conn, "docker version --format '{{.Server.Version}}'").startswith("26.")
        assert sh(conn, "docker run --rm busybox echo ok") == "ok"
        conn.close()


def test_a_mixed_lab_has_each_engine_where_asked(modern_lab: lifecycle.UpResult) -> None:
    before = hosts.observe(outer(), NAME)
    mixed = lifecycle.up(NAME, engine_opt="legacy,modern", addr_range=E2E_RANGE)
    assert list(mixed.replaced) == ["bm-docker-01"] and mixed.unchanged == ["bm-docker-02"]
    after = hosts.observe(outer(), NAME)
    assert after["bm-docker-02"].container_id == before["bm-docker-02"].container_id
    spec = build_spec(NAME, "legacy,modern", addr_range=E2E_RANGE)
    versions = {}
    for host in spec.hosts:
        conn = ssh(spec, host)
        versions[host.name] = sh(conn, "docker version --format '{{.Server.Version}}'")
        conn.close()
    assert versions["bm-docker-01"].startswith("20.10.5") and versions["bm-docker-02"].startswith("26.")
