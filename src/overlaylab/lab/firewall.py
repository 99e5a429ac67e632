"""The lab's own FORWARD rules. Once any dockerd has run, this kind of machine
filters bridged traffic with FORWARD policy DROP, so host-to-host traffic on a lab
bridge needs an explicit accept. Rules carry a comment naming the lab; removal
finds them by that comment and touches nothing else.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess


def _comment(lab: str) -> str:
    return f"overlaylab:{lab}"


def _rule(lab: str, bridge: str) -> list[str]:
    return ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment", _comment(lab), "-j", "ACCEPT"]


def ensure(lab: str, bridges: list[str]) -> bool:
    """Add missing rules; True when something changed."""
    if shutil.which("iptables") is None:
        return False  # nothing filters bridged traffic without iptables
    changed = False
    for bridge in bridges:
        rule = _rule(lab, bridge)
        if subprocess.run(["iptables", "-w", "-C", *rule], capture_output=True, check=False).returncode != 0:
            subprocess.run(["iptables", "-w", "-I", *rule], capture_output=True, check=True)
            changed = True
    return changed


def rules(lab: str) -> list[str]:
    if shutil.which("iptables") is None:
        return []
    listing = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True, check=False).stdout
    mark = f"--comment {_comment(lab)} "
    return [line for line in listing.splitlines() if mark in line + " " or f'"{_comment(lab)}"' in line]


def remove(lab: str) -> int:
    removed = 0
    for line in rules(lab):
        spec = shlex.split(line)
        if spec[:1] == ["-A"]:
            subprocess.run(["iptables", "-w", "-D", *spec[1:]], capture_output=True, check=False)
            removed += 1
    return removed
