"""The cluster modules, each on a lab of its own (own name, own address range), in two
streams that `make test` runs at once (pytest-xdist, `-n 2 --dist loadgroup`; the
scheduler is tests/conftest.py's), balanced by their measured times (seconds, run one at
a time, on this machine) and by how much each slowed down beside the other stream (two
runs). Two lab modules are not here: they run before, alone (one kills the private
dockerd every lab runs in, one builds and removes images); the modern lab's is. A new module not
listed here runs with them, alone: slower, never wrong."""

STREAMS = {  # seconds in the two-stream run of 2026-12-07 (each slowed by the other stream)
    "test_ha.py": "stream-1",  # 466
    "test_dry_run_truth.py": "stream-1",  # 428
    "test_bootstrap_swarm.py": "stream-1",  # 128, and the installed command (~30)
    "test_lab_modern.py": "stream-1",  # ~100: modern hosts, lab-impair's effects, a mixed lab
    "test_heal.py": "stream-2",  # 441, a partition (~60), the broken cluster's smoke suite (~20)
    "test_bootstrap_kv.py": "stream-2",  # 469
    "test_scale.py": "stream-1",  # 110 in ci21 (test_heal's moved worker added ~170 to stream-2)
}


def stream_of(path: str) -> str | None:
    """The stream of a test file's path or node ID, if it is a cluster module."""
    return STREAMS.get(path.split("::", 1)[0].rsplit("/", 1)[-1])
