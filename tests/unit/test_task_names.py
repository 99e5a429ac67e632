"""Unit (no hosts): every task a message of overlaylab's names exists. Two messages once
told users to "run teardown-cluster", a task that never existed (it is `teardown`).

The messages are the string literals of src/ and fabfile.py (f-strings' parts included);
a task-like word is a kebab-case word whose first part begins one of the fabfile's task
names (bootstrap-, join-, lab-, docker-, teardown-, ...). Each must be a task of the
fabfile's collection, as `fab` loads it, or one of the few words listed here that are not
tasks. What it cannot see: a wrong name with a first part no task has ("remove-cluster"),
and a one-word name ("run destroy")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from invoke.collection import Collection

import fabfile

ROOT = Path(__file__).resolve().parents[2]
NOT_TASKS = {
    "docker-cli": "a Debian package",
    "docker-machine": "the tool whose drop-in overlaylab replaces",
    "join-failed": "a state the dockerd step's wait prints",
    "join-token": "`docker swarm join-token`",
}


def tasks() -> set[str]:
    return set(Collection.from_module(fabfile).task_names)


def task_word() -> re.Pattern[str]:
    """A kebab-case word that begins as a task's name begins, not part of a path or a longer word."""
    prefixes = sorted({name.split("-")[0] for name in tasks()})
    return re.compile(rf"(?<![\w./-])((?:{'|'.join(prefixes)})-[a-z0-9]+(?:-[a-z0-9]+)*)(?![\w-])")


def named_in_messages() -> dict[str, set[str]]:
    """task-like word -> the files whose string literals name it."""
    word = task_word()
    found: dict[str, set[str]] = {}
    for path in [*sorted((ROOT / "src").rglob("*.py")), ROOT / "fabfile.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for match in word.finditer(node.value):
                    found.setdefault(match[1], set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_fabfile_has_the_tasks_the_readme_starts_with() -> None:
    assert {"bootstrap-cluster", "join-node", "verify", "status", "teardown", "lab-up", "lab-down"} <= tasks()


def test_every_task_a_message_names_exists() -> None:
    found = named_in_messages()
    assert {"bootstrap-cluster", "join-node", "lab-up", "docker-env"} <= set(found)  # the scan reads messages
    unknown = {w: sorted(files) for w, files in found.items() if w not in tasks() and w not in NOT_TASKS}
    assert unknown == {}, f"messages name tasks that do not exist: {unknown}"


def test_the_scan_catches_the_name_once_given() -> None:
    """The scan itself, on the wrong name a message once gave."""
    said = "Put it back, or run teardown-cluster and bootstrap-cluster again"
    assert [m[1] for m in task_word().finditer(said)] == ["teardown-cluster", "bootstrap-cluster"]
    assert "teardown-cluster" not in tasks()
