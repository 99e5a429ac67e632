"""Unit tests (files in a temp dir, no hosts): every bad inventory gets one clear
message naming the file, the field and the line, as an exit-2 InputError."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlaylab import inventory
from overlaylab.errors import InputError

GOOD = """\
cluster: {name: lab}
ssh: {user: admin, key: ~/.ssh/id_ed25519, known_hosts: ~/.ssh/known_hosts, port: 22}
consul: {image: progrium/consul, flavor: progrium, port: 8500}
network: {name: ov_net1, subnet: 10.0.9.0/24}
dockerd: {extra_flags: ["--log-level=warn"]}
hosts:
  bm-docker-02: {address: 192.168.2.56, role: worker, advertise: eth1}
  bm-docker-01: {address: 192.168.2.55, role: manager, advertise: eth1}
  bm-docker-03: {address: node3.example.org, role: worker, advertise: 10.1.2.3, port: 2222, user: ops}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    return path


def test_a_good_inventory_loads_with_the_manager_first(tmp_path: Path) -> None:
    inv = inventory.load(write(tmp_path, GOOD))
    assert [h.name for h in inv.hosts] == ["bm-docker-01", "bm-docker-02", "bm-docker-03"]
    assert inv.manager.address == "192.168.2.55"
    assert inv.subnet == "10.0.9.0/24" and inv.consul_port == 8500
    assert inv.extra_flags == ("--log-level=warn",)
    assert inv.host("bm-docker-03").port == 2222 and inv.host("bm-docker-03").user == "ops"
    assert inv.ssh_key == Path("~/.ssh/id_ed25519").expanduser()


def test_the_shipped_example_inventory_is_valid() -> None:
    inv = inventory.load(Path(__file__).parents[2] / "inventory" / "example.yaml")
    assert inv.manager.name == "bm-docker-01"


def test_defaults_fill_what_is_left_out(tmp_path: Path) -> None:
    inv = inventory.load(write(tmp_path, "hosts:\n  a: {address: 10.0.0.1, role: manager, advertise: eth1}\n"))
    assert (inv.consul_image, inv.consul_flavor, inv.consul_port, inv.network) == (
        "progrium/consul", "progrium", 8500, "ov_net1",
    )  # fmt: skip
    assert inv.subnet is None and inv.workers == [] and inv.mtu is None  # Docker's own MTU


def test_an_mtu_in_range_is_the_networks(tmp_path: Path) -> None:
    for mtu in (576, 1400, 9000):
        text = GOOD.replace("subnet: 10.0.9.0/24}", f"subnet: 10.0.9.0/24, mtu: {mtu}}}")
        assert inventory.load(write(tmp_path, text)).mtu == mtu
    auto = inventory.load(write(tmp_path, GOOD.replace("subnet: 10.0.9.0/24}", "subnet: 10.0.9.0/24, mtu: auto}")))
    assert auto.mtu is None and auto.mtu_auto  # sized by the run (checks/pathmtu.py)


BAD = [
    ("yaml error", GOOD.replace("cluster: {name: lab}", "cluster: {name: lab"), r"inv\.yaml:\d+: YAML error"),
    ("no manager", GOOD.replace("role: manager", "role: worker"), r"inv\.yaml:6: hosts: no host has role: manager"),
    (
        "second manager",
        GOOD.replace("bm-docker-02: {address: 192.168.2.56, role: worker", "bm-docker-02: {address: 192.168.2.56, role: manager"),
        r"inv\.yaml:8: hosts\.bm-docker-01\.role: a second manager",
    ),
    (
        "duplicate name",
        GOOD + "  bm-docker-02: {address: 192.168.2.57, role: worker, advertise: eth1}\n",
        r"inv\.yaml:10: hosts\.bm-docker-02: duplicate key",
    ),
    (
        "duplicate address",
        GOOD.replace("192.168.2.56", "192.168.2.55"),
        r"inv\.yaml:8: hosts\.bm-docker-01\.address: 192\.168\.2\.55 is also the address of bm-docker-02",
    ),
    ("not an address", GOOD.replace("192.168.2.56", "192.168.2.300"), r":7: hosts\.bm-docker-02\.address: '192\.168\.2\.300' is not a valid IPv4"),
    ("not a name", GOOD.replace("node3.example.org", "node 3"), r":9: hosts\.bm-docker-03\.address: 'node 3' is not an IP address"),
    ("unknown key", GOOD.replace("port: 8500}", "port: 8500, colour: red}"), r"inv\.yaml:3: consul\.colour: unknown key"),
    ("unknown top key", GOOD + "extra: 1\n", r"inv\.yaml:10: extra: unknown key"),
    ("wrong type", GOOD.replace("port: 8500", "port: '8500'"), r"inv\.yaml:3: consul\.port: must be an integer, got str"),
    ("port range", GOOD.replace("port: 22}", "port: 70000}"), r"inv\.yaml:2: ssh\.port: port 70000 is out of range"),
    ("bad role", GOOD.replace("role: worker, advertise: eth1}\n  bm-docker-01", "role: boss, advertise: eth1}\n  bm-docker-01"), r":7: hosts\.bm-docker-02\.role: 'boss' must be manager or worker"),
    ("missing field", GOOD.replace("role: worker, advertise: eth1}\n  bm-docker-01", "role: worker}\n  bm-docker-01"), r":7: hosts\.bm-docker-02: missing 'advertise'"),
    ("bad subnet", GOOD.replace("10.0.9.0/24", "10.0.9.0/99"), r":4: network\.subnet: '10\.0\.9\.0/99' is not a network"),
    ("mtu range", GOOD.replace("subnet: 10.0.9.0/24}", "subnet: 10.0.9.0/24, mtu: 9001}"), r":4: network\.mtu: 9001 is out of range 576-9000"),
    ("mtu small", GOOD.replace("subnet: 10.0.9.0/24}", "subnet: 10.0.9.0/24, mtu: 575}"), r":4: network\.mtu: 575 is out of range"),
    ("mtu word", GOOD.replace("subnet: 10.0.9.0/24}", "subnet: 10.0.9.0/24, mtu: big}"), r":4: network\.mtu: must be a number \(576 to 9000\) or auto, got 'big'"),
    ("bad flavor", GOOD.replace("flavor: progrium", "flavor: etcd"), r":3: consul\.flavor: 'etcd' is not one of"),
    ("cluster flag", GOOD.replace('["--log-level=warn"]', '["--cluster-store=x"]'), r":5: dockerd\.extra_flags: --cluster-\* flags"),
    ("flag type", GOOD.replace('["--log-level=warn"]', "--debug"), r":5: dockerd\.extra_flags: must be a list"),
    ("hosts type", GOOD.split("\nhosts:")[0] + "\nhosts: [a, b]\n", r":6: hosts: must be a mapping"),
    ("empty", "", r"inv\.yaml: the inventory is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_inventories_are_refused_with_file_field_and_line(
    tmp_path: Path, case: str, text: str, message: str
) -> None:
    with pytest.raises(InputError, match=message) as err:
        inventory.load(write(tmp_path, text))
    assert err.value.exit_code == 2
    assert str(tmp_path / "inv.yaml") in str(err.value)


def test_a_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read inventory"):
        inventory.load(tmp_path / "nope.yaml")


def test_an_unknown_node_name_is_an_input_error(tmp_path: Path) -> None:
    inv = inventory.load(write(tmp_path, GOOD))
    with pytest.raises(InputError, match="no host named 'bm-docker-09'"):
        inv.host("bm-docker-09")


def test_discovery_timing_defaults_to_3_and_20_seconds_and_can_be_set(tmp_path: Path) -> None:
    assert inventory.load(write(tmp_path, GOOD)).discovery == (3, 20)
    text = GOOD.replace(
        'dockerd: {extra_flags: ["--log-level=warn"]}', "dockerd: {discovery_heartbeat: 5, discovery_ttl: 30}"
    )
    assert inventory.load(write(tmp_path, text)).discovery == (5, 30)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("discovery_ttl: 12", r"inv\.yaml:5: dockerd\.discovery_ttl: 12 s is under 20 s: Consul refuses the session"),
        ("discovery_heartbeat: 20", r"inv\.yaml:5: dockerd\.discovery_heartbeat: 20 s must be .* under discovery_ttl"),
        ("discovery_heartbeat: x", r"dockerd\.discovery_heartbeat: must be an integer"),
    ],
)
def test_a_discovery_timing_that_would_hang_dockerd_is_refused(tmp_path: Path, setting: str, message: str) -> None:
    text = GOOD.replace('dockerd: {extra_flags: ["--log-level=warn"]}', f"dockerd: {{{setting}}}")
    with pytest.raises(InputError, match=message):
        inventory.load(write(tmp_path, text))


def test_consuls_raft_multiplier_defaults_to_1_and_is_bounded(tmp_path: Path) -> None:
    assert inventory.load(write(tmp_path, GOOD)).raft_multiplier == 1
    consul = "consul: {image: progrium/consul, flavor: progrium, port: 8500"
    assert inventory.load(write(tmp_path, GOOD.replace(consul, consul + ", raft_multiplier: 5"))).raft_multiplier == 5
    with pytest.raises(InputError, match=r"inv\.yaml:3: consul\.raft_multiplier: 0 must be 1 .* to 10"):
        inventory.load(write(tmp_path, GOOD.replace(consul, consul + ", raft_multiplier: 0")))


FIVE = """\
consul: {servers: SERVERS}
hosts:
  e: {address: 10.0.0.5, role: worker, advertise: eth1}
  b: {address: 10.0.0.2, role: worker, advertise: eth1}
  a: {address: 10.0.0.1, role: manager, advertise: eth1}
  d: {address: 10.0.0.4, role: worker, advertise: eth1}
  c: {address: 10.0.0.3, role: worker, advertise: eth1}
"""


def test_one_consul_server_is_the_manager_alone_and_not_ha(tmp_path: Path) -> None:
    for servers in ("1", "[a]"):
        inv = inventory.load(write(tmp_path, FIVE.replace("SERVERS", servers)))
        assert inv.servers == ("a",) and not inv.ha


def test_a_server_count_takes_the_manager_then_the_next_hosts_in_the_files_order(tmp_path: Path) -> None:
    inv = inventory.load(write(tmp_path, FIVE.replace("SERVERS", "3")))
    assert inv.servers == ("a", "e", "b") and inv.ha
    inv = inventory.load(write(tmp_path, FIVE.replace("SERVERS", "[c, d, a]")))
    assert inv.servers == ("c", "d", "a")


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ("2", r"inv\.yaml:1: consul\.servers: 2 must be 1, 3 or 5 \(an even number"),
        ("7", r"inv\.yaml:1: consul\.servers: 7 must be 1, 3 or 5$"),
        ("[a, b, c, d]", r"inv\.yaml:1: consul\.servers: 4 servers: there must be 1, 3 or 5 \(an even number"),
        ("[a, b, x]", r"inv\.yaml:1: consul\.servers\[2\]: 'x' is not a host of this inventory"),
        ("[a, b, b]", r"inv\.yaml:1: consul\.servers\[2\]: 'b' is named twice"),
        ("[b]", r"consul\.servers: one server runs on the manager \(a\)"),
        ("yes", r"consul\.servers: must be a count \(1, 3 or 5\) or a list of host names"),
    ],
)
def test_a_bad_consul_server_set_is_refused_naming_the_field(tmp_path: Path, servers: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        inventory.load(write(tmp_path, FIVE.replace("SERVERS", servers)))


def test_more_servers_than_hosts_is_refused(tmp_path: Path) -> None:
    three = "consul: {servers: 5}\nhosts:\n" + "".join(
        f"  h{i}: {{address: 10.0.0.{i}, role: {'manager' if i == 1 else 'worker'}, advertise: eth1}}\n"
        for i in (1, 2, 3)
    )
    with pytest.raises(InputError, match=r"inv\.yaml:1: consul\.servers: 5 servers, but the inventory has 3 hosts"):
        inventory.load(write(tmp_path, three))
