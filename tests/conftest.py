"""Suite-wide rule: in CI (CI=true) an end-to-end test that skips fails the run."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.get_closest_marker("e2e"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"end-to-end test skipped in CI, which must run it: {reason}"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup` by the streams of tests/e2e/streams.py: each stream's modules on
    one worker, in order (a module's tests share its lab). xdist's own loadgroup reads
    `xdist_group` marks through a node ID that pytest 9 no longer lets it change."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    from tests.e2e.streams import stream_of

    class Streams(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return stream_of(nodeid) or nodeid.split("::", 1)[0]

    return Streams(config, log)
