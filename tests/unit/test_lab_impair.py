"""Unit (no lab): the lab's impairments as rules and as input. What each makes of the network
is proven on a real lab (tests/e2e/test_lab_modern.py); here, the rules they become, the
tag each rule carries (what --show reads back), and every bad input refused with its field
before anything changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlaylab.errors import InputError
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

    has = "CONFIG_NET_SCH_NETEM=y" in gzip.decompress(config.read_bytes()).decode()
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
        "- {node: bm-docker-07,\n   partition: true}\n": ":2: [0]: node: no host 'bm-docker-07'",
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
