"""Unit tests (no hosts, fake connections): mode selection and the swarm membership plan,
on facts recorded from real lab hosts with the engine's `docker info` Swarm section varied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from overlaylab import inventory, mode
from overlaylab.checks import preflight
from overlaylab.errors import InputError
from overlaylab.steps import swarm
from tests.unit.test_facts_render import inv, node, recorded, with_info

MGR_ADDR = "10.210.1.11:2377"


def swarm_info(state: str, manager: bool = False, managers: tuple[str, ...] = (), cluster: str = "") -> dict[str, Any]:
    return {
        "LocalNodeState": state,
        "ControlAvailable": manager,
        "RemoteManagers": [{"NodeID": "x", "Addr": a} for a in managers],
        "Cluster": {"ID": cluster} if cluster else None,
    }


def modern(name: str, role: str = "worker") -> Any:
    return node(name, with_info(recorded("facts-worker-kv.txt"), ServerVersion="26.1.5+dfsg1"), role)


def test_auto_picks_kv_when_every_engine_has_the_cluster_store() -> None:
    nodes = [node("a", recorded("facts-manager-kv.txt"), "manager"), node("b", recorded("facts-worker-kv.txt"))]
    assert mode.resolve("auto", nodes)[0] == "kv"


def test_auto_picks_swarm_and_says_which_engine_lacks_the_store() -> None:
    nodes = [node("a", recorded("facts-manager-kv.txt"), "manager"), modern("b")]
    picked, why = mode.resolve("auto", nodes)
    assert picked == "swarm" and "b (26.1.5+dfsg1)" in why


def test_an_explicit_mode_is_kept() -> None:
    assert mode.resolve("kv", [modern("b")])[0] == "kv"
    assert mode.resolve("swarm", [node("a", recorded("facts-manager-kv.txt"), "manager")])[0] == "swarm"


def test_kv_preflight_refuses_a_modern_engine_and_points_to_swarm_mode() -> None:
    m, w = node("a", recorded("facts-manager-kv.txt"), "manager"), modern("b")
    problems = preflight.check(inv(m.host, w.host), [m, w], "kv")
    assert "mode: swarm" in problems["b"][0]
    assert preflight.check(inv(m.host, w.host), [m, w], "swarm") == {}


def test_manager_plan_from_swarm_state() -> None:
    m = node("a", recorded("facts-manager-kv.txt"), "manager")
    assert swarm.manager_state(m, False)[0] == "init"
    with_info(m.facts, Swarm=swarm_info("active", manager=True, managers=(MGR_ADDR,), cluster="abc123"))
    assert swarm.manager_state(m, False) == ("ok", "manages swarm abc123")
    with_info(m.facts, Swarm=swarm_info("active", managers=("10.9.9.9:2377",)))
    assert swarm.manager_state(m, False)[0] == "refuse"
    assert swarm.manager_state(m, True)[0] == "reinit"


def test_worker_plan_from_swarm_state() -> None:
    m = node("a", with_info(recorded("facts-manager-kv.txt")), "manager")
    w = node("b", recorded("facts-worker-kv.txt"))
    assert swarm.worker_state(w, m, False)[0] == "join"
    with_info(w.facts, Swarm=swarm_info("active", managers=(MGR_ADDR,)))
    assert swarm.worker_state(w, m, False)[0] == "ok"
    with_info(w.facts, Swarm=swarm_info("active", managers=("10.9.9.9:2377",)))
    state, why = swarm.worker_state(w, m, False)
    assert state == "refuse" and "--leave-other-swarm" in why
    assert swarm.worker_state(w, m, True)[0] == "rejoin"
    with_info(w.facts, Swarm=swarm_info("pending", managers=(MGR_ADDR,)))
    assert swarm.worker_state(w, m, False)[0] == "refuse"


def test_swarm_facts_are_parsed() -> None:
    f = with_info(recorded("facts-worker-kv.txt"), Swarm=swarm_info("active", True, (MGR_ADDR,), "cid"))
    assert (f.swarm_state, f.swarm_manager, f.swarm_remote_managers, f.swarm_cluster_id) == (
        "active",
        True,
        [MGR_ADDR],
        "cid",
    )


def test_inventory_mode_and_swarm_pool(tmp_path: Path) -> None:
    base = "hosts:\n  a: {address: 10.0.0.1, role: manager, advertise: eth1}\n"
    path = tmp_path / "i.yaml"
    path.write_text("mode: swarm\nswarm: {default_addr_pool: 10.20.0.0/16}\n" + base)
    loaded = inventory.load(path)
    assert (loaded.mode, loaded.swarm_addr_pool) == ("swarm", "10.20.0.0/16")
    path.write_text(base)
    assert inventory.load(path).mode == "kv"
    path.write_text("mode: mesh\n" + base)
    with pytest.raises(InputError, match=r"i\.yaml:1: mode: 'mesh' is not one of: kv, swarm, auto"):
        inventory.load(path)
    path.write_text("swarm: {default_addr_pool: nope}\n" + base)
    with pytest.raises(InputError, match=r":1: swarm\.default_addr_pool: 'nope' is not a network"):
        inventory.load(path)
