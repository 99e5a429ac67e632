"""End to end at scale, real components (sshd, systemd, dockerd 20.10, Consul, busybox):
twelve legacy lab hosts of one lab, the kv backend, Consul of the official image's flavour.
Tests run in order on that lab.

The figures this module prints are for the log; `make bench` measures speed. What is
asserted here is behaviour that only shows at scale: every one of the 132 ordered pairs
pings by IP and by name, with fewer hosts worked on at once than there are, and a no-op
re-run still costs each host two remote commands."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.clusterlab import Lab, every_pair, fab, host_state, module_lab, ping_pairs, statuses
from tests.e2e.labtools import sh

NAME, RANGE = "e2e12", "10.219.0.0/16"
COUNT = 12
ENGINES = ",".join(["legacy"] * COUNT)
HOSTS = list(range(1, COUNT + 1))
NAMES = [f"bm-docker-{i:02d}" for i in HOSTS]
PARALLEL = "5"  # fewer than the hosts: the cap is exercised, not just allowed
# the official image's flavour, one server (the lab's hashicorp/consul: `agent ...`, /consul/data,
# Consul as its consul user); progrium's runs in the other kv modules
HASHICORP = {"image": "hashicorp/consul", "flavor": "hashicorp"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from module_lab(tmp_path_factory, NAME, ENGINES, RANGE)


def test_a_twelve_host_bootstrap_with_five_at_once_pings_every_pair(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc, err = fab(
        "bootstrap-cluster", "--inventory", str(lab.inventory("all", HOSTS, consul=HASHICORP)), "--parallel", PARALLEL
    )
    assert code == 0, err
    assert statuses(doc, "dockerd") == dict.fromkeys(NAMES, "changed")
    assert statuses(doc, "anchor") == dict.fromkeys(NAMES, "changed")
    assert ping_pairs(doc) == every_pair(doc, NAMES)  # 12 x 11 x 3 (anchors) or 4 (probes) checks, none missing
    with capsys.disabled():  # a figure for the log, not a threshold
        print(f"\n    bootstrap of {COUNT} hosts, {PARALLEL} at once: {doc['step_seconds']['verify']:.1f}s")
    conn = lab.conn(COUNT)
    store = f"consul://{lab.spec.hosts[0].cluster_ip}:8500"
    assert sh(conn, "docker info --format '{{.ClusterStore}}'") == store
    conn.close()


def test_a_no_op_re_run_of_twelve_hosts_costs_two_commands_a_host_and_changes_nothing(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    before = host_state(lab, HOSTS)
    code, doc, err = fab(
        "bootstrap-cluster", "--inventory", str(lab.inventory("all", HOSTS, consul=HASHICORP)), "--parallel", PARALLEL
    )
    assert code == 0 and doc["changes"] == 0, err
    assert doc["verified_with"] == "anchors"
    assert ping_pairs(doc) == every_pair(doc, NAMES)
    assert doc["remote_commands"] == dict.fromkeys(NAMES, 2)  # the facts, then the pings
    assert host_state(lab, HOSTS) == before  # same dockerd PIDs, drop-ins, containers
    with capsys.disabled():
        print(f"\n    no-op re-run of {COUNT} hosts: {doc['step_seconds']['verify']:.1f}s")


def test_verify_alone_starts_fresh_probes_on_twelve_hosts_and_leaves_none(lab: Lab) -> None:
    before = host_state(lab, HOSTS)
    code, doc, err = fab(
        "verify", "--inventory", str(lab.inventory("all", HOSTS, consul=HASHICORP)), "--parallel", PARALLEL
    )
    assert code == 0, err
    assert doc["verified_with"] == "probes"
    assert ping_pairs(doc) == every_pair(doc, NAMES)
    assert host_state(lab, HOSTS) == before  # the probes are gone, nothing else changed
