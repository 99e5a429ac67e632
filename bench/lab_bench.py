"""Prints lab-up figures: from nothing (no cached image), from cached images, and
memory per host, for 3 and 6 hosts. Figures only: nothing here passes or fails.

Run as root: `make bench`. Uses a lab named "bench" in 10.212.0.0/16 and removes it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from overlaylab.lab import engine, hosts, images, lifecycle
from overlaylab.report import Steps

NAME, RANGE = "bench", "10.212.0.0/16"


class Quiet(Steps):
    def line(self, text: str) -> None:
        pass


def timed_up(count: int) -> float:
    start = time.monotonic()
    lifecycle.up(NAME, count=count, engine_opt="legacy", addr_range=RANGE, steps=Quiet())
    return time.monotonic() - start


def memory_per_host_mib() -> list[float]:
    eng = engine.find(start=False)
    assert eng is not None
    out = []
    for obs in hosts.observe(eng.docker, NAME).values():
        usage = eng.docker.out("stats", "--no-stream", "--format", "{{.MemUsage}}", obs.container)
        value, unit = usage.split("/")[0].strip()[:-3], usage.split("/")[0].strip()[-3:]
        out.append(float(value) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}.get(unit, 1))
    return out


def from_nothing(count: int) -> float:
    """Empty cache and no lab image in the engine: debootstrap included."""
    eng = engine.find(start=True)
    assert eng is not None
    for ref in eng.docker.out(
        "images", "--filter", "label=overlaylab.image", "--format", "{{.Repository}}:{{.Tag}}"
    ).split():
        eng.docker.run("rmi", ref, check=False)
    saved = images.CACHE
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        images.CACHE = Path(tmp)
        try:
            took = timed_up(count)
        finally:
            lifecycle.down(NAME, steps=Quiet())  # may stop a private engine: start it again
            images.CACHE = saved
            eng = engine.find(start=True)
            assert eng is not None
            for ref in eng.docker.out("images", "--filter", "label=overlaylab.image", "-q").split():
                eng.docker.run("rmi", "-f", ref, check=False)
    return took


def main() -> None:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise SystemExit("run as root after `make setup`")
    lifecycle.down(NAME, steps=Quiet())
    print(f"{'hosts':>5}  {'from nothing':>12}  {'cached images':>13}  {'re-run':>7}  {'MiB/host (median)':>17}")
    for count in (3, 6):
        nothing = from_nothing(count)
        cached = timed_up(count)  # images re-imported from the real cache, hosts created
        rerun = timed_up(count)
        mem = statistics.median(memory_per_host_mib())
        lifecycle.down(NAME, steps=Quiet())
        print(f"{count:>5}  {nothing:>11.1f}s  {cached:>12.1f}s  {rerun:>6.1f}s  {mem:>17.0f}", flush=True)


if __name__ == "__main__":
    main()
