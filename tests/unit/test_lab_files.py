"""Unit tests (no I/O beyond a temp dir): per-host identity files and image fingerprints."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from overlaylab.lab import images, keys
from overlaylab.lab.lifecycle import inventory_text
from overlaylab.lab.spec import build_spec


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(keys, "STATE", tmp_path)
    return tmp_path


def test_each_host_gets_its_own_host_key_and_machine_id(state: Path) -> None:
    spec = build_spec("t", count=2)
    h1, h2 = spec.hosts
    assert keys.host_key(spec, h1).read_bytes() != keys.host_key(spec, h2).read_bytes()
    assert keys.machine_id(spec, h1) != keys.machine_id(spec, h2)
    assert len(keys.machine_id(spec, h1)) == 32
    # stable across calls: a replaced host comes back with the same identity
    assert keys.machine_id(spec, h1) == keys.machine_id(spec, h1)


def test_known_hosts_pins_each_hosts_real_key_by_address(state: Path) -> None:
    spec = build_spec("t", count=2)
    lines = keys.known_hosts_text(spec).splitlines()
    assert len(lines) == 2
    for line, host in zip(lines, spec.hosts, strict=True):
        addr, kind, blob = line.split()
        assert addr == host.mgmt_ip and kind == "ssh-ed25519"
        assert blob == keys.host_key(spec, host).with_suffix(".pub").read_text().split()[1]


def test_identity_tar_holds_the_per_host_files(state: Path) -> None:
    spec = build_spec("t", count=2)
    host = spec.hosts[1]
    with tarfile.open(fileobj=io.BytesIO(keys.identity_tar(spec, host))) as tar:
        names = tar.getnames()
        assert "etc/ssh/ssh_host_ed25519_key" in names
        assert tar.getmember("etc/ssh/ssh_host_ed25519_key").mode == 0o600
        member = tar.extractfile("etc/docker/daemon.json")
        assert member is not None
        daemon = json.loads(member.read())
        member = tar.extractfile("home/admin/.ssh/authorized_keys")
        assert member is not None
        assert member.read() == keys.client_key(spec).with_suffix(".pub").read_bytes()
    assert daemon["bip"] == spec.inner_bip
    assert daemon["default-address-pools"][0]["base"] == spec.inner_pool
    assert daemon["dns"] == [host.cluster_ip]


def test_lab_inventory_names_manager_first_and_the_lab_key_files(state: Path) -> None:
    spec = build_spec("t", count=3)
    text = inventory_text(spec)
    assert "bm-docker-01: {address: 10.210.0.11, role: manager, advertise: eth1}" in text
    assert "bm-docker-03: {address: 10.210.0.13, role: worker, advertise: eth1}" in text
    assert f"known_hosts: {state / 't' / 'known_hosts'}" in text


def test_node_image_fingerprint_follows_its_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    base = images.node_recipe("bullseye")
    assert base.fingerprint == images.node_recipe("bullseye").fingerprint
    assert images.node_recipe("trixie").fingerprint != base.fingerprint
    monkeypatch.setenv("OVERLAYLAB_NODE_EXTRA_PACKAGES", "strace")
    assert images.node_recipe("bullseye").fingerprint != base.fingerprint
    monkeypatch.delenv("OVERLAYLAB_NODE_EXTRA_PACKAGES")
    real = images.lab_file
    monkeypatch.setattr(
        images, "lab_file", lambda name: real(name) + (b"# changed\n" if name == "entrypoint.sh" else b"")
    )
    assert images.node_recipe("bullseye").fingerprint != base.fingerprint


def test_trixie_hosts_get_the_docker_cli_package() -> None:
    assert "docker-cli" in images.node_recipe("trixie").inputs[1].split(",")
    assert "docker-cli" not in images.node_recipe("bullseye").inputs[1].split(",")


def test_debian_mirror_is_read_from_the_machines_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert images.debian_mirror(tmp_path) == "http://deb.debian.org/debian"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://mirror.example/debian bookworm main\n")
    assert images.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://other.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    assert images.debian_mirror(tmp_path) == "http://other.example/debian"
