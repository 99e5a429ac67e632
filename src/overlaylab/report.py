"""Progress as one line per step (kind's style), plain text so CI logs stay readable."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Steps:
    """Prints `• title` when a step starts and `✓ title (1.2s)` or `✗ title: why` when it ends."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        """The yielded list takes an optional outcome word (e.g. "no change") for the end line."""
        self.line(f" • {title} ...")
        start = time.monotonic()
        outcome: list[str] = []
        try:
            yield outcome
        except BaseException as exc:
            self.line(f" ✗ {title}: {exc}")
            raise
        took = time.monotonic() - start
        suffix = f" ({', '.join(outcome)})" if outcome else ""
        self.line(f" ✓ {title}{suffix} [{took:.1f}s]")
