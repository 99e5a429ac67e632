"""Unit (no hosts): the facts read through dockerd's Engine API (curl on its unix socket) are
the facts read through the docker CLI. Recorded on a bootstrapped 3-host kv lab, each host's
script run twice at once, as it is (the host has curl: the API) and with the API turned off
(the CLI, as on a host without curl): tests/unit/data/facts-kv-{manager,worker}-{api,cli}.txt.
On the lab then: the anchors, the Consul container on the manager, and on the worker a
user's container on the overlay with a fixed address, an alias and `--restart on-failure:3`,
and a stopped one."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from overlaylab import facts
from overlaylab.facts import HostFacts

DATA = Path(__file__).parent / "data"
# what `docker info` says that moves between two reads (counters, clocks) or only the CLI has
MOVING = {"SystemTime", "NGoroutines", "NFd", "NEventsListener", "ClientInfo", "ServerErrors"}


def read(role: str, via: str) -> HostFacts:
    return facts.parse((DATA / f"facts-kv-{role}-{via}.txt").read_text(), "eth1", "ov_net1")


@pytest.mark.parametrize("role", ["manager", "worker"])
def test_the_engine_api_and_the_cli_read_the_same_facts(role: str) -> None:
    api, cli = read(role, "api"), read(role, "cli")
    assert (api.facts_via, cli.facts_via) == ("api", "cli")
    # free space and dockerd's start (now less its age, to the second) move between the two reads
    fields = {f.name for f in dataclasses.fields(HostFacts)} - {"facts_via", "info", "disk", "docker_started"}
    differ = {
        name: (getattr(api, name), getattr(cli, name)) for name in fields if getattr(api, name) != getattr(cli, name)
    }
    assert differ == {}
    assert {k: v for k, v in api.info.items() if k not in MOVING} == {
        k: v for k, v in cli.info.items() if k not in MOVING
    }
    # what the equality above is worth: the sections the docker CLI answered were not empty
    assert api.info["ServerVersion"] and api.containers and api.attached and api.network and api.images
    assert api.overlays == ["ov_net1"]
    if role == "manager":
        assert api.consul and api.consul_volume and api.store_leader
    else:
        users = api.attached["users_app"]
        assert (users.ip, users.aliases, users.policy) == ("10.214.9.200", ("db",), "on-failure:3")
        assert "users_stopped" in api.stopped


def section(name: str, curl_exit: int, tmp_path: Path) -> str:
    """One section's command of the real script, run here by sh with the API chosen and a
    curl that fails as told (28: its --max-time ran out; 22: an HTTP error under -f)."""
    fake = tmp_path / "curl"
    fake.write_text(f"#!/bin/sh\nexit {curl_exit}\n")
    fake.chmod(0o755)
    command = next(f for f in facts.FACTS if f.name == name).command(facts.Where("eth1", network="ov_net1"))
    script = f"_api=1\n{facts.API_PRELUDE[1]}\n{command}"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=False).stdout


def test_a_failed_api_call_reads_as_the_cli_failing(tmp_path: Path) -> None:
    """curl's timeout is said as timeout's (124), which mode.engine_problem names as a dockerd
    that did not answer; an HTTP error prints nothing, as the CLI's 2>/dev/null did."""
    assert section("info", 28, tmp_path).strip() == "docker info exited 124"
    assert section("info", 22, tmp_path).strip() == "docker info exited 22"
    assert section("info", 7, tmp_path).strip() == "docker info exited 7 (nothing answers on /var/run/docker.sock)"
    text = f"{facts.MARK}info\n{section('info', 28, tmp_path)}{facts.MARK}network\n{section('network', 22, tmp_path)}"
    parsed = facts.parse(text + f"{facts.MARK}end\n", "eth1", "ov_net1")
    assert parsed.info == {} and parsed.info_error == "docker info exited 124" and parsed.network is None


def test_each_section_asks_the_engine_api_for_what_the_cli_asked(tmp_path: Path) -> None:
    """The URLs the sections give curl (a curl here that prints its arguments): the socket,
    curl's own config ignored (-q first), and each list's filters as the CLI's --filter."""
    fake = tmp_path / "curl"
    log = tmp_path / "asked"
    fake.write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    fake.chmod(0o755)
    where = facts.Where("eth1", facts.Store("overlaylab-consul", "overlaylab-consul-data", 8500), "ov_net1")
    asked = {}
    for name in ("info", "containers", "consul", "consul_volume", "network", "attached", "overlays", "images"):
        command = next(f for f in facts.FACTS if f.name == name).command(where)
        script = f"_api=1\n{facts.API_PRELUDE[1]}\n{command}"
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
        log.unlink(missing_ok=True)
        subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=True)
        asked[name] = log.read_text().split()  # the section's first call (attached: its list)
    for argv in asked.values():
        assert argv[:6] == ["-q", "-sf", "--max-time", "20", "--unix-socket", "/var/run/docker.sock"], argv
    urls = {name: argv[6] for name, argv in asked.items()}
    assert urls["info"] == "http://docker/info"
    assert urls["containers"] == "http://docker/containers/json?all=1"
    assert urls["consul"] == "http://docker/containers/overlaylab-consul/json"
    assert urls["network"] == "http://docker/networks/ov_net1"
    assert urls["images"] == "http://docker/images/json"
    assert urls["consul_volume"] == "http://docker/volumes/overlaylab-consul-data"
    query = {name: urllib.parse.parse_qs(urllib.parse.urlsplit(urls[name]).query) for name in ("attached", "overlays")}
    assert json.loads(query["attached"]["filters"][0]) == {"network": ["ov_net1"]} and query["attached"]["all"] == ["1"]
    assert json.loads(query["overlays"]["filters"][0]) == {"driver": ["overlay"]}


def moved(text: str, stalled: bool) -> str:
    """The recorded worker's output as after its cluster address moved from .12 to .42: eth1
    has the new address, dockerd's gossip still listens on the old one; ``stalled``: its
    `docker info` section timed out (curl's 28, said as timeout's 124)."""
    lines = text.splitlines()
    at = lines.index(facts.MARK + "info")
    if stalled:
        lines[at + 1] = "docker info exited 124"
    out = "\n".join(lines) + "\n"
    return out.replace('"local":"10.214.1.12"', '"local":"10.214.1.42"')


class Stalls:
    """A fake host (no SSH) that answers the facts script with the given outputs in turn."""

    def __init__(self, *outputs: str) -> None:
        from overlaylab.inventory import Host

        self.outputs, self.reads = list(outputs), 0
        self.host, self.facts = Host("bm-docker-02", "10.214.0.12", "worker", "eth1"), HostFacts()

    @property
    def name(self) -> str:
        return self.host.name

    def result(self, command: str) -> tuple[int, str, str]:
        self.reads += 1
        return 0, self.outputs.pop(0), ""


@pytest.mark.parametrize(
    ("case", "reads", "stalled"), [("answers", 2, False), ("stalls", 2, True), ("unmoved", 1, True)]
)
def test_a_stall_where_dockerd_gossips_on_an_address_the_host_lost_is_read_once_more(
    case: str, reads: int, stalled: bool
) -> None:
    """gather.read_one(): a moved host's first read stalls on a store connection from its old
    address; it reads once more, which answers, or stalls again ("stalls": the engine check
    names the address left behind). A stall with no move ("unmoved": the recorded output
    stalled, eth1 as it was) is read once, and said as before."""
    from typing import cast

    from overlaylab import gather, mode
    from overlaylab.cluster import Node
    from overlaylab.inventory import Host
    from tests.unit.test_facts_render import inv

    text = (DATA / "facts-kv-worker-api.txt").read_text()
    if case == "unmoved":
        given = [
            text.replace(text.splitlines()[text.splitlines().index(facts.MARK + "info") + 1], "docker info exited 124")
        ]
    else:
        given = [moved(text, True), moved(text, case == "stalls")]
    node = Stalls(*given)
    manager = Host("bm-docker-01", "10.214.0.11", "manager", "eth1")
    gather.read_one(inv(manager, node.host), cast(Node, node))
    assert node.reads == reads and node.facts.info_stalled is stalled
    problem = mode.engine_problem(cast(Node, node))
    if case == "unmoved":
        assert node.facts.gossip_left_behind == "" and problem is not None and "is the manager's Consul" in problem
    elif stalled:
        assert node.facts.gossip_left_behind == "10.214.1.12" and node.facts.advertise_ips == ["10.214.1.42"]
        assert (
            problem is not None
            and "still gossips on 10.214.1.12, which its cluster interface no longer has (10.214.1.42 now)" in problem
        )
    else:
        assert problem is None and node.facts.info["ServerVersion"]
        # answered: dockerd's own word shows the move (the dockerd step restarts it for it)
        assert node.facts.cluster_advertise.startswith("10.214.1.12:") and node.facts.advertise_ips == ["10.214.1.42"]


def test_a_socket_bound_to_an_interface_is_read_with_its_address_alone() -> None:
    """`ss` prints `0.0.0.0%eth1:7946` for a socket bound to an interface: every address on it."""
    found = facts.parse_sockets(
        'tcp LISTEN 0 4096 0.0.0.0%eth1:7946 0.0.0.0:* users:(("dockerd",pid=5,fd=3))\n'
        'tcp LISTEN 0 4096 10.0.0.9:7946 0.0.0.0:* users:(("dockerd",pid=5,fd=4))\n'
    )
    assert [(s.address, s.port, s.process) for s in found] == [
        ("0.0.0.0", 7946, "dockerd"),
        ("10.0.0.9", 7946, "dockerd"),
    ]
    assert found[0].on(["10.0.0.2"]) and not found[1].on(["10.0.0.2"]) and found[1].on(["10.0.0.9"])
