"""Fabric tasks: parse options, call the overlaylab package, map errors to exit codes."""

from __future__ import annotations

import json as jsonlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fabric import task
from invoke.exceptions import Exit

from overlaylab.errors import OverlaylabError
from overlaylab.lab import lifecycle
from overlaylab.report import Steps

ROOT = Path(__file__).resolve().parent
LAB_INVENTORY = ROOT / "inventory" / "lab.yaml"
T = TypeVar("T")


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except OverlaylabError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None


@task(
    auto_shortflags=False,
    help={
        "count": "number of hosts (default 3, or as many as the lab has)",
        "engine": "legacy (Docker 20.10, cluster store) or modern (26.x); or one per host: legacy,legacy,modern",
        "name": "lab name (default lab)",
        "range": "private /16 for every lab address (default 10.210.0.0/16)",
    },
)
def lab_up(
    c: Any, count: int | None = None, engine: str | None = None, name: str = "lab", range: str | None = None
) -> None:
    """Bring the local lab up (or repair it); writes inventory/lab.yaml."""
    _run(lambda: lifecycle.up(name, int(count) if count else None, engine, LAB_INVENTORY, range, Steps()))


@task(auto_shortflags=False, help={"name": "lab name (default lab)"})
def lab_down(c: Any, name: str = "lab") -> None:
    """Remove the lab and everything lab-up made; safe to run twice."""
    _run(lambda: lifecycle.down(name, LAB_INVENTORY, Steps()))


@task(auto_shortflags=False, help={"name": "lab name (default lab)", "json": "print JSON"})
def lab_status(c: Any, name: str = "lab", json: bool = False) -> None:
    """List the lab's hosts, addresses, engine versions and state."""
    rows = _run(lambda: lifecycle.status_dicts(name))
    if json:
        print(jsonlib.dumps({"lab": name, "hosts": rows}, indent=2))
        return
    if not rows:
        print(f"lab {name!r}: no hosts")
        return
    cols = ["name", "state", "system", "engine", "engine_version", "mgmt_ip", "cluster_ip"]
    widths = {col: max(len(col), *(len(str(r[col])) for r in rows)) for col in cols}
    print("  ".join(col.upper().ljust(widths[col]) for col in cols))
    for row in rows:
        print("  ".join(str(row[col]).ljust(widths[col]) for col in cols))
    sys.stdout.flush()
