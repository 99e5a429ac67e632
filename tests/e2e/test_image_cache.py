"""End to end against the real outer engine: lab images are built once, re-imported
from the cache when the engine lost them, and rebuilt when an input changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from overlaylab.lab import engine, images
from overlaylab.lab.docker import Docker
from tests.e2e.labtools import require_lab


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Docker]:
    require_lab()
    monkeypatch.setattr(images, "CACHE", tmp_path / "cache")
    eng = engine.find(start=True)
    assert eng is not None
    started = eng.private and not engine.has_stored_containers()
    yield eng.docker
    for ref in eng.docker.out("images", "--filter", "label=overlaylab.image=selftest", "-q").split():
        eng.docker.run("rmi", "-f", ref, check=False)
    if started:
        engine.stop_private()


def recipe(content: str, builds: list[str]) -> images.Recipe:
    def build(root: Path) -> None:
        builds.append(content)
        (root / "marker").write_text(content)

    return images.Recipe(kind="selftest", inputs=(content,), build_root=build, changes=('CMD ["/marker"]',))


def test_an_image_is_built_once_reimported_from_cache_and_rebuilt_on_a_changed_input(docker: Docker) -> None:
    builds: list[str] = []
    first = recipe("one", builds)
    assert images.ensure(docker, first) == "built"
    assert images.ensure(docker, first) == "ok"
    docker.run("rmi", first.tag)
    assert images.ensure(docker, first) == "imported"
    assert builds == ["one"]
    changed = recipe("two", builds)
    assert changed.tag != first.tag
    assert images.ensure(docker, changed) == "built"
    assert builds == ["one", "two"]
    assert not first.cache_file.exists() and changed.cache_file.exists()  # stale cache dropped
