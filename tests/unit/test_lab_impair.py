"""Unit (no lab): the lab's impairments as rules and as input. What each makes of the network
is proven on a real lab (tests/e2e/test_lab_modern.py); here, the rules they become, the
tag each rule carries (what --show reads back), and every bad input refused with its field
before anything changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlaylab.errors import InputError, OverlaylabError
from overlaylab.lab import impair
from overlaylab.lab.impair import Impairment
from overlaylab.lab.spec import build_spec

SPEC = build_spec("t", "legacy", 3, addr_range="10.222.0.0/16")
A, B, C = (h.cluster_ip for h in SPEC.hosts)


def test_a_blocked_port_into_a_node_from_one_peer() -> None:
    imp = Impairment("bm-docker-02", "block", "udp/4789", "bm-docker-03", "in")
    assert impair.rules(SPEC, imp) == [f'ip saddr {C} ip daddr {B} udp dport 4789 drop comment "{imp.tag}"']


def test_loss_and_rate_each_way_and_a_partition_both_ways_whatever_the_direction() -> None:
    loss = impair.rules(SPEC, Impairment("bm-docker-01", "loss", "30"))
    assert [r.split(" comment")[0] for r in loss] == [
        f"ip saddr {A} ip daddr {SPEC.cluster_net} numgen random mod 10000 < 3000 drop",
        f"ip saddr {SPEC.cluster_net} ip daddr {A} numgen random mod 10000 < 3000 drop",
    ]
    rate = impair.rules(SPEC, Impairment("bm-docker-01", "rate", "10mbit", "bm-docker-02", "out"))
    assert rate == [f'ip saddr {A} ip daddr {B} counter comment "olab|bm-docker-01|bm-docker-02|rate|10mbit|out"']
    cut = impair.rules(SPEC, Impairment("bm-docker-03", "partition", "", "bm-docker-01", "in"))
    assert [r.split(" drop")[0] for r in cut] == [f"ip saddr {C} ip daddr {A}", f"ip saddr {A} ip daddr {C}"]
    mtu = impair.rules(SPEC, Impairment("bm-docker-03", "mtu", "1400"))
    assert all(" ip length > 1400 drop " in r for r in mtu) and len(mtu) == 2


def test_a_rate_is_queued_at_the_port_toward_the_host_a_packet_goes_to() -> None:
    both = impair.flows(SPEC, Impairment("bm-docker-01", "rate", "10mbit"))
    assert [(f.name, t.name) for f, t in both] == [
        ("bm-docker-01", "bm-docker-02"), ("bm-docker-01", "bm-docker-03"),
        ("bm-docker-02", "bm-docker-01"), ("bm-docker-03", "bm-docker-01"),
    ]  # fmt: skip
    into = impair.flows(SPEC, Impairment("bm-docker-02", "rate", "1mbit", "bm-docker-03", "in"))
    assert [(f.name, t.name) for f, t in into] == [("bm-docker-03", "bm-docker-02")]


def test_a_tag_says_the_whole_impairment_and_reads_back() -> None:
    for imp in (Impairment("bm-docker-01", "block", "tcp/7946", None, "out"), Impairment("bm-docker-02", "partition")):
        assert Impairment.of_tag(imp.tag) == imp and len(imp.tag) < 128  # nft keeps 128 bytes of a comment
    assert Impairment.of_tag("someone else's comment") is None


@pytest.mark.parametrize(
    ("imp", "said"),
    [
        (Impairment("bm-docker-09", "loss", "10"), "node: no host 'bm-docker-09'"),
        (Impairment("bm-docker-01", "loss", "10", "bm-docker-01"), "peer: bm-docker-01 is the node itself"),
        (Impairment("bm-docker-01", "loss", "0"), "loss: '0' must be a percentage above 0"),
        (Impairment("bm-docker-01", "loss", "101"), "loss: '101' must be a percentage"),
        (Impairment("bm-docker-01", "mtu", "67"), "mtu: '67' must be 68 to 9000"),
        (Impairment("bm-docker-01", "mtu", "9001"), "mtu: '9001' must be 68 to 9000"),
        (Impairment("bm-docker-01", "rate", "fast"), "rate: 'fast' is not a rate"),
        (Impairment("bm-docker-01", "block", "icmp/1"), "block: 'icmp/1' is not PROTO/PORT"),
        (Impairment("bm-docker-01", "block", "udp/70000"), "block: 'udp/70000' is not PROTO/PORT"),
        (Impairment("bm-docker-01", "loss", "10", None, "sideways"), "direction: 'sideways' is not one of"),
    ],
)
def test_bad_input_is_refused_naming_its_field(imp: Impairment, said: str) -> None:
    with pytest.raises(InputError, match=said.replace("(", r"\(")):
        impair.check(SPEC, imp)


def test_a_delay_is_refused_naming_the_kernel_feature_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(impair, "netem_missing", lambda: "this kernel has no netem (CONFIG_NET_SCH_NETEM is not set)")
    with pytest.raises(InputError, match="CONFIG_NET_SCH_NETEM is not set"):
        impair.check(SPEC, Impairment("bm-docker-01", "delay", "100"))


def test_this_machines_kernel_has_no_netem_as_its_configuration_says() -> None:
    """Read from /proc/config.gz (platform facts: CONFIG_NET_SCH_NETEM is not set here)."""
    config = Path("/proc/config.gz")
    if not config.exists():
        pytest.skip("no /proc/config.gz on this machine")
    missing = impair.netem_missing()
    import gzip

    text = gzip.decompress(config.read_bytes()).decode()
    has = "CONFIG_NET_SCH_NETEM=y" in text or "CONFIG_NET_SCH_NETEM=m" in text
    assert (missing is None) == has


def test_a_file_of_impairments_loads_and_each_error_names_file_line_and_field(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "- {node: bm-docker-02, peer: bm-docker-03, block: udp/4789, direction: in}\n- {node: bm-docker-01, loss: 30}\n"
    )
    assert impair.load(good, SPEC) == [
        Impairment("bm-docker-02", "block", "udp/4789", "bm-docker-03", "in"),
        Impairment("bm-docker-01", "loss", "30"),
    ]
    cases = {
        "- {node: bm-docker-01, loss: 30}\n- {node: bm-docker-02, mtu: 40}\n": ":2: [1]: mtu: '40' must be 68 to 9000",
        "- {node: bm-docker-01, loss: 30, mtu: 1400}\n": ":1: [0]: exactly one of",
        "- {node: bm-docker-01, los: 30}\n": ":1: [0].los: unknown",
        "node: bm-docker-01\n": "must be a list of impairments",
        "- [bm-docker-01]\n": ":1: [0]: an impairment is a mapping",
        "- {node: bm-docker-07,\n   partition: true}\n": ":1: [0]: node: no host 'bm-docker-07'",
        "- node: bm-docker-01\n  peer: bm-docker-01\n  loss: 5\n": ":2: [0]: peer: bm-docker-01 is the node itself",
        "- {node: bm-docker-01, partition: false}\n": ":1: [0].partition: 'false': only true",
        "- {node: bm-docker-01, loss: [30]}\n": ":1: [0].loss: one value, e.g. loss: 30",
        "- {node: bm-docker-01,\n   rate: 10 mbit}\n": ":2: [0]: rate: '10 mbit' is not a rate",
    }
    for text, said in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(InputError) as refused:
            impair.load(bad, SPEC)
        assert str(refused.value).startswith(str(bad)) and said in str(refused.value), (text, str(refused.value))


def test_rates_parse_to_bits_per_second() -> None:
    assert [impair.rate_bits(r) for r in ("10mbit", "512kbit", "1gbit", "1.5mbit")] == [
        10_000_000,
        512_000,
        1_000_000_000,
        1_500_000,
    ]
    assert impair.rate_bits("10 mbit") is None and impair.rate_bits("100bit") is None and impair.rate_bits("x") is None


def test_a_partition_is_recorded_both_ways_whatever_direction_was_asked() -> None:
    asked = Impairment("bm-docker-03", "partition", "", "bm-docker-01", "in")
    assert impair.check(SPEC, asked).direction == "both"
    assert impair.check(SPEC, Impairment("bm-docker-03", "loss", "5", None, "in")).direction == "in"


class FakeNft:
    """The lab's table as nft would hold it: rules by handle, each with its comment (the tag)."""

    def __init__(self, have: list[Impairment]) -> None:
        self.rules = {n: imp.tag for n, imp in enumerate(have, start=10)}
        self.scripts: list[str] = []

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        if args[:3] == ("-j", "-a", "list"):
            return json.dumps({"nftables": [{"rule": {"handle": h, "comment": t}} for h, t in self.rules.items()]})
        assert args == ("-f", "-") and stdin is not None
        self.scripts.append(stdin)
        for line in stdin.splitlines():
            if line.startswith("delete rule"):
                del self.rules[int(line.split()[-1])]
            elif line.startswith("add rule"):
                self.rules[max(self.rules, default=0) + 1] = line.split('comment "')[1].rstrip('"')
        return ""

    def in_force(self, lab: str) -> list[Impairment]:
        return list(dict.fromkeys(i for i in map(Impairment.of_tag, self.rules.values()) if i))


def test_a_new_setting_replaces_the_old_one_of_its_pair_and_direction_a_block_adds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old_rate = Impairment("bm-docker-01", "rate", "10mbit", "bm-docker-02", "out")
    old_block = Impairment("bm-docker-01", "block", "udp/4789", "bm-docker-02", "out")
    fake = FakeNft([old_rate, old_block])
    monkeypatch.setattr(impair, "nft", fake)
    monkeypatch.setattr(impair, "in_force", fake.in_force)
    shaped: list[set[str]] = []

    def shape(spec: object, ports: object, touched: set[str]) -> list[str]:
        shaped.append(set(touched))
        return []

    monkeypatch.setattr(impair, "shape", shape)
    new_rate = Impairment("bm-docker-01", "rate", "1mbit", "bm-docker-02", "out")
    new_block = Impairment("bm-docker-01", "block", "tcp/7946", "bm-docker-02", "out")
    assert impair.apply(SPEC, [new_rate, new_block, old_block], {}) == [new_rate, new_block]
    assert fake.in_force("t") == [old_block, new_rate, new_block]
    assert "delete rule bridge olab_t forward handle 10" in fake.scripts[-1]  # one transaction
    assert shaped == [{"bm-docker-02"}]


def test_a_queue_that_fails_puts_the_rules_back_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    old_rate = Impairment("bm-docker-01", "rate", "10mbit", "bm-docker-02", "out")
    fake = FakeNft([old_rate])
    monkeypatch.setattr(impair, "nft", fake)
    monkeypatch.setattr(impair, "in_force", fake.in_force)
    calls: list[int] = []

    def shape(spec: object, ports: object, touched: object) -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise OverlaylabError("tc class add dev vethX: RTNETLINK answers: No such device")
        return []

    monkeypatch.setattr(impair, "shape", shape)
    with pytest.raises(OverlaylabError, match="No such device"):
        impair.apply(SPEC, [Impairment("bm-docker-01", "rate", "1mbit", "bm-docker-02", "out")], {})
    assert fake.in_force("t") == [old_rate] and len(calls) == 2  # the old rate's queue made again


def test_queues_per_flow_a_rate_and_a_delay_in_one_class_unmatched_traffic_straight_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(impair, "netem_missing", lambda: None)  # the commands a kernel with netem gets
    both = [
        Impairment("bm-docker-01", "rate", "10mbit", "bm-docker-02", "out"),
        Impairment("bm-docker-01", "delay", "100", "bm-docker-02", "out"),
        Impairment("bm-docker-03", "delay", "20", "bm-docker-02", "out"),
    ]
    assert [impair.check(SPEC, imp) for imp in both] == both
    monkeypatch.setattr(impair, "in_force", lambda lab: both)
    monkeypatch.setattr(impair, "_shaped", lambda port: False)
    ran: list[str] = []

    def tc(*args: str, check: bool = True) -> str:
        ran.append(" ".join(args))
        return ""

    monkeypatch.setattr(impair, "tc", tc)
    assert impair.shape(SPEC, {"bm-docker-01": "v1", "bm-docker-02": "v2", "bm-docker-03": "v3"}) == ["bm-docker-02"]
    assert ran == [
        "qdisc add dev v2 root handle 1: htb direct_qlen 1000",
        "class add dev v2 parent 1: classid 1:1 htb rate 10mbit ceil 10mbit",
        "qdisc add dev v2 parent 1:1 netem delay 100ms limit 1000",
        f"filter add dev v2 parent 1: protocol ip prio 1 u32 match ip src {A}/32 match ip dst {B}/32 flowid 1:1",
        "class add dev v2 parent 1: classid 1:2 htb rate 10gbit ceil 10gbit",
        "qdisc add dev v2 parent 1:2 netem delay 20ms limit 1000",
        f"filter add dev v2 parent 1: protocol ip prio 1 u32 match ip src {C}/32 match ip dst {B}/32 flowid 1:2",
    ]
