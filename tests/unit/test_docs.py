"""Unit (no hosts): the docs cannot lie about the commands, the inventory or each other.

- Every command line of the README and docs/ that runs a task (`fab ...`, `.venv/bin/fab
  ...`, `overlaylab ...`, in a shell block or an inline code span) is parsed by the real
  parser of the tasks (invoke's, over overlaylab.tasks, with the program's own flags): an
  unknown task or option fails.
- Every fenced YAML block is loaded by the real loader: an inventory whole, a fragment (no
  `hosts:`) over a small inventory of five hosts, a list of the lab's impairments against a
  3-host lab. A block right after
  the line `<!-- a bad inventory: the loader must refuse it -->` must fail to load, with
  the words the page shows.
- Every link between pages resolves: the file, and the heading an anchor names.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from invoke.exceptions import ParseError
from invoke.parser import Parser

from overlaylab import inventory, tasks
from overlaylab.cli import program
from overlaylab.errors import InputError
from overlaylab.lab import impair
from overlaylab.lab.spec import build_spec

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BAD = "<!-- a bad inventory: the loader must refuse it -->"
PROGRAM = re.compile(r"^(?:\S*/)?(?:fab|overlaylab)$")
BASE = {  # five hosts: a fragment may ask for up to five Consul servers
    "cluster": {"name": "docs"},
    "hosts": {
        f"bm-docker-0{i}": {
            "address": f"192.168.2.5{i}",
            "role": "manager" if i == 1 else "worker",
            "advertise": "eth1",
        }
        for i in range(1, 6)
    },
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str
    bad: bool = False

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)", lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            bad = i > 0 and lines[i - 1].strip() == BAD
            found.append(Block(page, i + 1, match[1], "\n".join(lines[i + 1 : end]), bad))
            i = end
        i += 1
    return found


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv after the program's name) of every task command line in the docs."""
    found = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in ("sh", "bash", "console", ""):
                continue
            for n, line in enumerate(block.text.replace("\\\n", " ").splitlines()):
                line = re.sub(r"\s#.*$", "", line).removeprefix("$ ")  # a comment, whatever its quotes; a prompt
                if not PROGRAM.match((line.split() or [""])[0]):
                    continue
                words = first_command(line)
                if words:
                    found.append((f"{block.where}+{n + 1}", words[1:]))
        for span in re.findall(r"`([^`\n]+)`", prose(page)):
            for match in re.finditer(r"(?:^|\$\()((?:\S*/)?(?:fab|overlaylab) [^)]*)", span):
                words = first_command(match[1])
                if PROGRAM.match(words[0]) and words[1:2] != ["itself"]:
                    found.append((f"{page.relative_to(ROOT)}: `{span}`", words[1:]))
    return found


def first_command(line: str) -> list[str]:
    """The words of a shell line up to its first `;`, `&&`, `||` or `|`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word in (";", "&&", "||", "|"):
            break
        words.append(word)
    return words


def parse(argv: list[str]) -> list[str]:
    """The tasks the real parser finds in argv; `--help TASK` and `--list` as the program takes them."""
    if argv[:1] == ["--help"] and len(argv) == 2:
        assert argv[1] in tasks.ns.task_names, f"--help of an unknown task: {argv[1]}"
        return [argv[1]]
    parser = Parser(initial=program.initial_context, contexts=tasks.ns.to_contexts())
    return [c.name for c in parser.parse_argv(argv) if c.name]


def test_the_docs_run_the_tasks_often_enough_for_this_test_to_mean_something() -> None:
    found = commands()
    named = {task for _, argv in found for task in parse(argv)}
    assert len(found) > 20 and {"bootstrap-cluster", "verify", "status", "lab-up", "teardown"} <= named, found


@pytest.mark.parametrize(("where", "argv"), commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_a_command_line_of_the_docs_parses(where: str, argv: list[str]) -> None:
    try:
        parse(argv)
    except ParseError as exc:
        pytest.fail(f"{where}: {' '.join(argv)}: {exc}")


def yaml_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang == "yaml"]


LAB = build_spec("docs", "legacy", 3)  # a list of impairments is read against a 3-host lab


def load(block: Block, tmp_path: Path) -> object:
    """An inventory (whole, or a fragment over BASE), or a list of the lab's impairments."""
    doc = yaml.safe_load(block.text) or {}
    path = tmp_path / "example.yaml"
    if isinstance(doc, list):
        path.write_text(block.text)
        return impair.load(path, LAB)
    path.write_text(block.text if "hosts" in doc else yaml.safe_dump({**BASE, **doc}))
    return inventory.load(path)


@pytest.mark.parametrize("block", yaml_blocks(), ids=lambda b: b.where)
def test_an_inventory_of_the_docs_loads_and_a_bad_one_is_refused(block: Block, tmp_path: Path) -> None:
    if block.bad:
        with pytest.raises(InputError) as refused:
            load(block, tmp_path)
        said = str(refused.value).split(": ", 1)[1]  # after the file and line: the field and why
        assert said in block.page.read_text(), f"{block.where}: the page does not show the loader's words: {said}"
    else:
        load(block, tmp_path)


def test_the_docs_show_a_bad_inventory_and_the_example_file_loads() -> None:
    assert any(b.bad for b in yaml_blocks()), f"no block marked {BAD!r}: the refusal is not shown"
    inventory.load(ROOT / "inventory" / "example.yaml")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m[1]) for m in re.finditer(r"^#+ (.+)$", prose(page), flags=re.M)}


def links() -> list[tuple[str, Path, str]]:
    found = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if not re.match(r"^[a-z]+://", target):
                path, _, anchor = target.partition("#")
                found.append((f"{page.relative_to(ROOT)} -> {target}", (page.parent / path) if path else page, anchor))
    return found


@pytest.mark.parametrize(("where", "path", "anchor"), links(), ids=lambda x: x if isinstance(x, str) else None)
def test_a_link_between_pages_resolves(where: str, path: Path, anchor: str) -> None:
    assert path.exists(), f"{where}: no such file"
    if anchor:
        assert path.suffix == ".md" and anchor in anchors(path), f"{where}: no such heading in {path.name}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {path.resolve() for _, path, _ in links() if path.suffix == ".md"}
    assert {p.resolve() for p in PAGES[1:]} <= linked
