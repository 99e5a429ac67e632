"""What the provisioner's end-to-end modules share: a module's lab, `fab` run as a user
runs it (its JSON read back), the packaged smoke suite, and readings of the hosts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from xml.etree import ElementTree

import pytest
import yaml

from overlaylab.checks import verify
from overlaylab.lab import lifecycle
from overlaylab.lab.spec import LabSpec, build_spec
from tests.e2e.labtools import require_lab, sh, ssh

DROPIN = "/etc/systemd/system/docker.service.d/10-machine.conf"
FAB = str(Path(sys.executable).parent / "fab")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Lab:
    spec: LabSpec
    dir: Path
    base: dict[str, Any]  # the lab's own inventory, all five hosts

    def inventory(self, name: str, hosts: list[int], mode: str | None = None, **changes: Any) -> Path:
        """The lab's inventory for some of its hosts, with sections changed and a mode set."""
        doc = json.loads(json.dumps(self.base))
        doc["hosts"] = {h: v for h, v in doc["hosts"].items() if int(h[-2:]) in hosts}
        if mode is not None:
            doc["mode"] = mode
        for section, values in changes.items():
            doc[section] = {**doc.get(section, {}), **values}
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def conn(self, index: int) -> Any:
        return ssh(self.spec, self.spec.hosts[index - 1])


def fab(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), *args, "--json"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not one JSON document:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.returncode, doc, proc.stderr


def run_smoke(inventory: Path, junit: Path, *select: str) -> tuple[int, dict[str, str], float]:
    """The packaged smoke suite, as a user runs it: (passed, {failed test id: message}, seconds);
    ``select``: pytest's own options to run part of it (`-m ha`)."""
    start = time.monotonic()
    env = {**os.environ, "CI": "true"}  # a skipped smoke test must fail here
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "overlaylab.smoke",
         "--inventory", str(inventory), f"--junitxml={junit}", "-q", *select],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, cwd=str(junit.parent),
    )  # fmt: skip
    took = time.monotonic() - start
    assert junit.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
    root = ElementTree.parse(junit).getroot()
    passed, failures = 0, {}
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        name = case.get("name", "")
        if bad is not None:
            failures[name] = bad.get("message", "")
        elif skipped is None:
            passed += 1
    return passed, failures, took


def statuses(doc: dict[str, Any], step: str) -> dict[str, str]:
    return {h: s[step]["status"] for h, s in doc["hosts"].items() if step in s}


def host_state(lab: Lab, hosts: list[int], full: bool = False) -> dict[int, tuple[str, ...]]:
    """(dockerd PID, drop-in bytes or '-', containers) per host; ``full`` adds networks, volumes
    and any listener the preflight's port probe could have left (systemd-socket-activate)."""

    def one(i: int) -> tuple[str, ...]:
        conn = lab.conn(i)
        try:
            found: tuple[str, ...] = (
                sh(conn, "systemctl show -p MainPID --value docker"),
                sh(conn, f"cat {DROPIN} 2>/dev/null || echo -"),
                sh(conn, "docker ps -a --format '{{.Names}}' | sort | tr '\\n' ' '"),
            )
            if full:
                found += (
                    sh(conn, "docker network ls -q | sort | tr '\\n' ' '"),
                    sh(conn, "docker volume ls -q | sort | tr '\\n' ' '"),
                    sh(conn, "ss -Hlntup | grep -c systemd-socket || true"),
                )
            return found
        finally:
            conn.close()

    return each_host(hosts, one)


T = TypeVar("T")


def each_host(hosts: list[int], read: Callable[[int], T]) -> dict[int, T]:
    """A reading of every host at once (a 12-host lab read one host at a time takes seconds)."""
    with ThreadPoolExecutor(max_workers=len(hosts) or 1) as pool:
        return dict(zip(hosts, pool.map(read, hosts), strict=True))


def ping_pairs(doc: dict[str, Any]) -> dict[tuple[str, str, str], bool]:
    return {(p["from"], p["to"], p["by"]): p["ok"] for p in doc["ping_matrix"]["pairs"]}


def checks(doc: dict[str, Any]) -> tuple[str, ...]:
    """The checks each pair had in this run's matrix, as it says them, held to what it ran: the
    pings alone where the standing anchors proved a run that changed nothing, all four after
    one that changed something (the anchors serve the stream) and with fresh probes."""
    made = tuple(doc["ping_matrix"]["checks"])
    pings_alone = doc["verified_with"] == "anchors" and doc.get("changes", 0) == 0
    assert made == (verify.ANCHORED if pings_alone else verify.BY), (doc["verified_with"], doc.get("changes"))
    return made


def every_pair(doc: dict[str, Any], names: list[str]) -> dict[tuple[str, str, str], bool]:
    """What ping_pairs(doc) is when every check of every ordered pair of ``names`` passed."""
    return {(a, b, by): True for a in names for b in names if a != b for by in checks(doc)}


def module_lab(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    engines: str,
    addr_range: str,
    prepare: Callable[[Lab], None] | None = None,
) -> Iterator[Lab]:
    """A lab for one module, from nothing; kept afterwards with OVERLAYLAB_KEEP_LAB=1 (to debug a failure)."""
    require_lab()
    directory = tmp_path_factory.mktemp(name)
    lifecycle.down(name)
    inventory = directory / "lab.yaml"
    lifecycle.up(name, engine_opt=engines, inventory=inventory, addr_range=addr_range)
    lab = Lab(build_spec(name, engines, addr_range=addr_range), directory, yaml.safe_load(inventory.read_text()))
    if prepare is not None:
        prepare(lab)
    yield lab
    if not os.environ.get("OVERLAYLAB_KEEP_LAB"):
        lifecycle.down(name)
