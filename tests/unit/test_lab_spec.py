"""Unit tests (no I/O): the lab's address plan and option parsing."""

from __future__ import annotations

import ipaddress

import pytest

from overlaylab.errors import InputError
from overlaylab.lab.spec import build_spec, parse_engines


def test_default_lab_is_three_legacy_hosts_named_as_in_the_tutorial() -> None:
    spec = build_spec("lab")
    assert [h.name for h in spec.hosts] == ["bm-docker-01", "bm-docker-02", "bm-docker-03"]
    assert [h.engine for h in spec.hosts] == ["legacy"] * 3
    assert [h.role for h in spec.hosts] == ["manager", "worker", "worker"]


def test_every_address_lies_inside_the_lab_range_and_is_unique() -> None:
    spec = build_spec("lab", count=6, addr_range="10.77.0.0/16")
    rng = ipaddress.IPv4Network("10.77.0.0/16")
    addrs = [h.mgmt_ip for h in spec.hosts] + [h.cluster_ip for h in spec.hosts]
    assert len(set(addrs)) == 12
    assert all(ipaddress.IPv4Address(a) in rng for a in addrs)
    for net in (
        spec.mgmt_net,
        spec.cluster_net,
        ipaddress.IPv4Network(spec.inner_pool),
        ipaddress.IPv4Network(spec.overlay_subnet),
        ipaddress.IPv4Interface(spec.inner_bip).network,
    ):
        assert net.subnet_of(rng)
    assert all(ipaddress.IPv4Address(h.mgmt_ip) in spec.mgmt_net for h in spec.hosts)
    assert all(ipaddress.IPv4Address(h.cluster_ip) in spec.cluster_net for h in spec.hosts)
    assert not ipaddress.IPv4Network(spec.inner_pool).overlaps(spec.mgmt_net)


def test_bridge_names_fit_the_kernel_limit() -> None:
    spec = build_spec("abcdefgh")
    assert len(spec.bridge_mgmt) <= 15 and len(spec.bridge_cluster) <= 15


@pytest.mark.parametrize("name", ["", "Lab", "9lab", "toolongname", "la-b"])
def test_bad_lab_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="--name"):
        build_spec(name)


@pytest.mark.parametrize("rng", ["8.8.0.0/16", "10.1.0.0/24", "nonsense"])
def test_bad_ranges_are_refused(rng: str) -> None:
    with pytest.raises(InputError, match="--range"):
        build_spec("lab", addr_range=rng)


def test_engine_list_sets_count_and_order() -> None:
    assert parse_engines("legacy,legacy,modern", None, {}) == ["legacy", "legacy", "modern"]


def test_one_engine_applies_to_every_host() -> None:
    assert parse_engines("modern", 4, {}) == ["modern"] * 4


def test_without_engine_existing_hosts_keep_theirs_and_new_ones_are_legacy() -> None:
    existing = {"bm-docker-01": "modern", "bm-docker-02": "legacy"}
    assert parse_engines(None, None, existing) == ["modern", "legacy"]
    assert parse_engines(None, 3, existing) == ["modern", "legacy", "legacy"]


@pytest.mark.parametrize(
    ("engine", "count", "message"),
    [("docker", None, "unknown engine 'docker'"), ("legacy,modern", 3, "lists 2 engines"), (None, 0, "--count")],
)
def test_bad_engine_options_are_refused(engine: str | None, count: int | None, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_engines(engine, count, {})
