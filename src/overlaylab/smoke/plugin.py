"""The pytest plugin behind the smoke tests: `--inventory`, one verified SSH
connection per host for the whole session, per-host and per-pair parametrization,
and the CI rule (a skipped smoke test fails the run when CI=true)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from overlaylab import cluster, gather, inventory, remote
from overlaylab.cluster import Node
from overlaylab.errors import OverlaylabError
from overlaylab.facts import ROLE_LABEL
from overlaylab.inventory import Inventory
from overlaylab.topology import Topology

SMOKE_MARK = "overlaylab_smoke"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("overlaylab", "overlaylab cluster smoke tests")
    group.addoption("--inventory", default=None, help="overlaylab inventory of the cluster to check")
    group.addoption(
        "--accept-new-host-keys", action="store_true", default=False,
        help="record unknown host keys (never changed ones)",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{SMOKE_MARK}: a cluster smoke test (needs --inventory)")
    config.addinivalue_line("markers", "mode(name): only for clusters in this mode (kv or swarm); deselected otherwise")
    config.addinivalue_line("markers", "ha: only for HA Consul (consul.servers 3 or 5); deselected otherwise")
    config.addinivalue_line("markers", "tls: only for clusters with tls.docker_api on; deselected otherwise")
    config.addinivalue_line("markers", "tls_store: only for clusters with tls.store on; deselected otherwise")
    path = config.getoption("--inventory", default=None)
    config.stash[_INVENTORY] = inventory.load(path) if path else None


_INVENTORY = pytest.StashKey[Inventory | None]()


def _inv(config: pytest.Config) -> Inventory | None:
    return config.stash.get(_INVENTORY, None)


def cluster_mode(inv: Inventory) -> str:
    """kv or swarm; `auto` is decided as bootstrap-cluster decides it, from the live engines."""
    if inv.mode != "auto":
        return inv.mode
    nodes = cluster.connect_all(inv, list(inv.hosts), sudo_password=remote.environ_sudo_password())
    try:
        gather.read_facts(inv, nodes)
        from overlaylab import mode as modes

        return modes.resolve("auto", nodes)[0]
    finally:
        cluster.close_all(nodes)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    inv = _inv(metafunc.config)
    names = [h.name for h in inv.hosts] if inv else ["(no inventory)"]
    if "host" in metafunc.fixturenames:
        metafunc.parametrize("host", names, ids=names)
    if "pair" in metafunc.fixturenames:
        pairs = [(a, b) for a in names for b in names if a != b] or [("(no inventory)", "(no inventory)")]
        metafunc.parametrize("pair", pairs, ids=[f"{a}->{b}" for a, b in pairs])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    inv = _inv(config)
    mode = cluster_mode(inv) if inv else None
    keep, drop = [], []
    for item in items:
        if "overlaylab/smoke" in str(item.path).replace(os.sep, "/") or "tests/smoke" in str(item.path):
            item.add_marker(SMOKE_MARK)
        marker = item.get_closest_marker("mode")
        off = (
            (item.get_closest_marker("ha") and inv and not Topology.of(inv).ha)
            or (item.get_closest_marker("tls") and inv and not inv.tls.docker_api)
            or (item.get_closest_marker("tls_store") and inv and not inv.tls.store)
        )
        if (marker and mode and marker.args[0] != mode) or off:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.get_closest_marker(SMOKE_MARK):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"smoke test skipped in CI, which must run it: {reason}"


@dataclass
class Cluster:
    """The live cluster for one session: inventory, connections and facts, read once."""

    inv: Inventory
    nodes: dict[str, Node]
    token: str = field(default_factory=lambda: secrets.token_hex(3))

    @property
    def manager(self) -> Node:
        return self.nodes[self.inv.manager.name]

    def name(self, what: str) -> str:
        """A unique name for something a test creates (containers, networks)."""
        return f"olab-smoke-{what}-{self.token}-{secrets.token_hex(2)}"

    def sh(self, host: str, command: str, check: bool = True) -> str:
        return self.nodes[host].sh(command, check=check).strip()

    def result(self, host: str, command: str) -> tuple[int, str, str]:
        return self.nodes[host].result(command)


@pytest.fixture(scope="session")
def smoke_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    inv = _inv(request.config)
    if inv is None:
        pytest.skip("no --inventory given: the cluster smoke tests need one (pytest --inventory FILE)")
    accept = bool(request.config.getoption("--accept-new-host-keys"))
    try:
        # A sudo password comes from OVERLAYLAB_SUDO_PASSWORD: pytest has no terminal to prompt on.
        nodes = cluster.connect_all(
            inv, list(inv.hosts), accept_new=accept, sudo_password=remote.environ_sudo_password()
        )
        gather.read_facts(inv, nodes)
    except OverlaylabError as exc:
        pytest.fail(f"cannot reach the cluster: {exc}", pytrace=False)
    try:
        yield Cluster(inv, {n.name: n for n in nodes})
    finally:
        # anything a smoke test created and failed to remove, by its label
        for node in nodes:
            node.sh(
                f"docker ps -aq --filter label={ROLE_LABEL}=smoke | xargs -r docker rm -f >/dev/null 2>&1; "
                f"docker network ls -q --filter label={ROLE_LABEL}=smoke | xargs -r docker network rm >/dev/null 2>&1; "
                "true",
                check=False,
            )
        cluster.close_all(nodes)
