"""Progress as one line per step (kind's style), plain text so CI logs stay readable."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
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


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells, each column as wide as its widest cell: every table overlaylab prints."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


STATUSES = ("changed", "ok", "failed", "skipped", "may change")  # "may change": a dry run's conditional (plan.Maybe)


class RunReport:
    """Per host and step: changed / ok / failed (with a reason), printed as it happens.

    With ``json_mode`` the lines go to stderr and stdout gets one JSON document at
    the end, so a machine reading stdout sees nothing else.
    """

    def __init__(self, task: str, hosts: list[str], json_mode: bool = False, stream: TextIO | None = None) -> None:
        self.task = task
        self.hosts = hosts
        self.json_mode = json_mode
        self.stream = stream or (sys.stderr if json_mode else sys.stdout)
        self.outcomes: list[dict[str, str]] = []
        self.notes: list[str] = []
        self.extra: dict[str, object] = {}
        self.started = time.monotonic()  # before connecting: timings include SSH set-up
        self.step_seconds: dict[str, float] = {}  # step -> when its last outcome came, from the start (bench/)
        self._lock = threading.Lock()

    def record(self, host: str, step: str, status: str, detail: str = "") -> None:
        assert status in STATUSES, status
        mark = {"changed": "~", "ok": "✓", "failed": "✗", "skipped": "-", "may change": "?"}[status]
        with self._lock:
            self.outcomes.append({"host": host, "step": step, "status": status, "detail": detail})
            elapsed = time.monotonic() - self.started
            self.step_seconds[step] = round(elapsed, 2)
            text = f" {mark} {host:<14} {step:<10} {status}" + (f": {detail}" if detail else "") + f" [{elapsed:.1f}s]"
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(text)
            print(text, file=self.stream, flush=True)

    @property
    def changes(self) -> int:
        return sum(1 for o in self.outcomes if o["status"] == "changed")

    @property
    def conditional(self) -> int:
        return sum(1 for o in self.outcomes if o["status"] == "may change")

    @property
    def failed(self) -> bool:
        return any(o["status"] == "failed" for o in self.outcomes)

    def table(self) -> str:
        steps = list(dict.fromkeys(o["step"] for o in self.outcomes))
        cell = {(o["host"], o["step"]): o["status"] for o in self.outcomes}
        lines = columns(
            [["HOST", *(s.upper() for s in steps)], *([h, *(cell.get((h, s), "") for s in steps)] for h in self.hosts)]
        )
        verdict = "FAILED" if self.failed else ("changed" if self.changes else "no change")
        if self.extra.get("dry_run") or self.extra.get("refused"):
            verdict = ("dry run, nothing changed" if self.extra.get("dry_run") else "nothing changed") + (
                ", refused" if self.failed else ""
            )
            maybe = f"; {self.conditional} may change, on a condition said" if self.conditional else ""
            lines.append(f"{self.task}: {verdict} ({self.changes} changes planned{maybe})")
        else:
            lines.append(f"{self.task}: {verdict} ({self.changes} changes)")
        return "\n".join(lines)

    def document(self, exit_code: int) -> dict[str, object]:
        per_host: dict[str, dict[str, dict[str, str]]] = {h: {} for h in self.hosts}
        for o in self.outcomes:
            per_host.setdefault(o["host"], {})[o["step"]] = {"status": o["status"], "detail": o["detail"]}
        refused = bool(self.extra.get("refused"))  # a refused run's outcomes are its plan: it changed nothing
        return {
            "task": self.task,
            "changes": 0 if refused else self.changes,
            **({"planned_changes": self.changes} if refused else {}),
            "failed": self.failed,
            "exit_code": exit_code,
            "hosts": per_host,  # each step's last outcome per host
            "outcomes": self.outcomes,  # all of them, in order (a step may act twice: storetls.py)
            "step_seconds": self.step_seconds,
            **self.extra,
        }
