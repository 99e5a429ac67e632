"""Unit (no host, no network): the path MTU's ladder, its script run by a real `sh` with a fake
`ping` on PATH that carries packets up to a size per peer, the parsing, and the refusal's words."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from overlaylab.checks import pathmtu

FAKE_PING = """#!/bin/sh
# ping -n -q -M do -c 1 -W 1 -I SRC -s PAYLOAD PEER: answers if the packet fits the peer's path
for peer; do :; done
payload=$(echo "$*" | sed 's/.* -s \\([0-9]*\\) .*/\\1/')
echo "$*" >> "$LOG"
case "$peer" in
  10.0.0.2) limit=1500 ;;
  10.0.0.3) limit=1400 ;;
  *) exit 1 ;;
esac
[ $((payload + 28)) -le "$limit" ]
"""


def test_the_ladder_holds_the_need_and_the_steps_below_1500_largest_first() -> None:
    assert pathmtu.ladder(1500) == (1500, 1450, 1400, 1350, 1300, 1200, 1000, 576)
    assert pathmtu.ladder(1450) == (1500, 1450, 1400, 1350, 1300, 1200, 1000, 576)
    assert pathmtu.ladder(1380)[:4] == (1500, 1450, 1400, 1380)
    assert pathmtu.ladder(9000)[:2] == (9000, 1500)


def test_every_size_goes_to_every_peer_in_one_round_and_the_largest_answer_is_the_path(tmp_path: Path) -> None:
    (tmp_path / "ping").write_text(FAKE_PING)
    (tmp_path / "ping").chmod(0o755)
    log = tmp_path / "log"
    peers = [("b", "10.0.0.2"), ("c", "10.0.0.3"), ("d", "10.0.0.4")]
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LOG": str(log)}
    run = subprocess.run(
        ["sh", "-c", pathmtu.script("10.0.0.1", peers, pathmtu.ladder(1500))], capture_output=True, text=True, env=env
    )
    assert pathmtu.parse(run.stdout, ["b", "c", "d"]) == {"b": 1500, "c": 1400, "d": 0}
    sent = log.read_text().splitlines()
    assert all(line.startswith("-n -q -M do -c 1 -W 1 -I 10.0.0.1 -s ") for line in sent)
    # a size that came back is not tried again; one that did not, three times
    assert sent.count("-n -q -M do -c 1 -W 1 -I 10.0.0.1 -s 1472 10.0.0.2") == 1  # 1500 bytes with its headers
    assert sent.count("-n -q -M do -c 1 -W 1 -I 10.0.0.1 -s 1472 10.0.0.3") == 3
    assert len(sent) == 8 + (6 + 2 * 3) + 8 * 3


def test_a_path_below_the_overlays_need_is_named_with_the_mtu_that_fits() -> None:
    why = pathmtu.too_narrow("bm-docker-01", "bm-docker-03", 1400, 1450)
    assert why is not None and why.startswith("bm-docker-01 -> bm-docker-03: the path carries packets of at most 1400")
    assert "the overlay needs 1500 (its MTU 1450 plus VXLAN's 50): set network.mtu to 1350" in why
    assert pathmtu.too_narrow("a", "b", 1500, 1450) is None
    assert pathmtu.too_narrow("a", "b", 1400, 1350) is None
    assert pathmtu.too_narrow("a", "b", 0, 1450) is None  # nothing came back: not a size
    small = pathmtu.too_narrow("a", "b", 576, 1450)
    assert small is not None and "no overlay MTU of at least 576 fits" in small
    assert pathmtu.parse("M b 1500\nM b 1400\ngarbage\nM x 9000\nM b big\n", ["b", "c"]) == {"b": 1500, "c": 0}


def test_the_link_line_and_the_narrowest_path() -> None:
    assert pathmtu.parse_link("M b 1500\nI 1500\n") == 1500
    assert pathmtu.parse_link("I \n") == 0 and pathmtu.parse_link("") == 0
    assert "ip -o -4 addr show to 10.0.0.1" in pathmtu.link_command("10.0.0.1")
    assert pathmtu.narrowest({"b": 1500, "c": 1400, "d": 0}) == ("c", 1400)
    assert pathmtu.narrowest({"d": 0}) is None and pathmtu.narrowest({}) is None


def test_auto_takes_the_largest_mtu_every_path_carries_or_refuses_naming_the_paths() -> None:
    paths = {"a": {"b": 1500, "c": 1400}, "b": {"a": 1500, "c": 9000}, "c": {"a": 1400, "b": 9000}}
    mtu, said = pathmtu.choose(paths)
    assert mtu == 1350 and said == [
        "network.mtu auto: 1350, the largest every path carries (the narrowest, a -> c, carries 1400 bytes, "
        "less VXLAN's 50)"
    ]
    assert pathmtu.choose({"a": {"b": 9000}, "b": {"a": 9000}})[0] == 8950  # jumbo frames
    assert pathmtu.choose({"a": {}})[0] == 1450  # one host: Docker's own
    mtu, said = pathmtu.choose({"a": {"b": 1500, "c": 0}, "c": {"a": 1500}})
    assert mtu is None and said == [
        "a -> c: no don't-fragment ping came back (ICMP blocked, or the path down): network.mtu: auto cannot "
        "size it; set network.mtu to a number"
    ]
    mtu, said = pathmtu.choose({"a": {"b": 576}, "b": {"a": 1500}})
    assert mtu is None and len(said) == 1 and said[0].startswith("a -> b: the path carries packets of at most 576")
    assert pathmtu.ladder(pathmtu.AUTO_CEILING)[:2] == (9000, 1500)
