from __future__ import annotations

from pathlib import Path

import pytest

# the shared helpers assert too: their failures show what differed, as a test's own do
pytest.register_assert_rewrite("tests.e2e.healing", "tests.e2e.clusterlab", "tests.e2e.tlscheck")

# The cluster modules, each on a lab of its own (own name, own address range), in two
# streams that `make test` runs at once (pytest-xdist, --dist loadgroup), balanced by
# their measured times (seconds, serial, on this machine). The lab modules run before,
# alone: one kills the private dockerd every lab runs in, one builds and removes images.
STREAMS = {
    "test_ha.py": "stream-1",  # 400
    "test_dry_run_truth.py": "stream-1",  # 266
    "test_scale.py": "stream-1",  # 90
    "test_heal.py": "stream-2",  # 378
    "test_bootstrap_kv.py": "stream-2",  # 284
    "test_bootstrap_swarm.py": "stream-2",  # 86
    "test_zz_smoke_broken.py": "stream-2",  # 43
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
        stream = STREAMS.get(Path(str(item.path)).name)
        if stream:
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.xdist_group(stream))
