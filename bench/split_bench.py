"""Counts gossip splits over consecutive kv bootstraps (issue 10: an order change must
show none in 20). Each run starts from hosts put back as before overlaylab (teardown:
the original drop-in, no Consul, no network; the first run from a fresh lab), then
bootstraps 3 legacy hosts and checks every pair. A split is a run whose verify fails;
a run whose anchors did not all ping (verify fell back to fresh probes) is counted
apart. Figures only. Run as root: `make bench`; OVERLAYLAB_SPLIT_RUNS sets the count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bootstrap_bench import FAB, ROOT, fresh_lab

from overlaylab.lab import lifecycle

NAME = "bench"


def run(*args: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [FAB, "-r", str(ROOT), *args, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        return proc.returncode, {"error": proc.stderr[-500:]}


def main() -> None:
    runs = int(os.environ.get("OVERLAYLAB_SPLIT_RUNS", "20"))
    inventory = Path("/tmp/overlaylab-split-bench.yaml")
    fresh_lab(3, inventory)
    splits, fallbacks, failures, took = 0, 0, 0, []
    for i in range(runs):
        if i:
            code, _ = run("teardown", "--inventory", str(inventory))
            if code != 0:
                sys.exit(f"teardown failed before run {i + 1}")
        start = time.monotonic()
        code, doc = run("bootstrap-cluster", "--inventory", str(inventory))
        took.append(time.monotonic() - start)
        matrix = doc.get("ping_matrix") or {}
        if code != 0 and not matrix:
            failures += 1
        elif not isinstance(matrix, dict) or not matrix.get("ok"):
            splits += 1
        if doc.get("verified_with") == "probes":
            fallbacks += 1
        print(f"run {i + 1:>2}: exit {code}, {took[-1]:.1f}s, verified with {doc.get('verified_with')}", flush=True)
    print(
        f"splits: {splits}/{runs} (anchors fell back to probes: {fallbacks}; runs failed before verify: {failures}); "
        f"bootstrap {min(took):.1f}-{max(took):.1f}s",
        flush=True,
    )
    lifecycle.down(NAME)


if __name__ == "__main__":
    main()
