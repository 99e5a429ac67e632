from __future__ import annotations

import pytest

from tests.e2e.streams import stream_of

# the shared helpers assert too: their failures show what differed, as a test's own do
pytest.register_assert_rewrite("tests.e2e.healing", "tests.e2e.clusterlab", "tests.e2e.tlscheck")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
        if stream_of(str(item.path)):
            item.add_marker(pytest.mark.cluster)
