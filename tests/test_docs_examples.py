"""The examples in README.md and docs/ run as written, and the CLI page is whole.

Every fenced ``python`` block is run on its own, in a fresh interpreter, in an
empty directory, and must exit with status 0.  A block that cannot run there
(it needs a server, a terminal, a file of yours) starts with a comment that
says so, ``# not run: <why>``, and is skipped: visibly, on the page and here.

The command line page must name every option that ``--help`` lists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
NOT_RUN = "# not run:"

pytestmark = pytest.mark.skipif(
    not DOCS.is_dir(), reason="the docs are not here (an installed copy of the tests)"
)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The fenced ``python`` blocks of a Markdown file: (first line number, code)."""
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        start = i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if opening["info"].strip() == "python":
            blocks.append((start + 1, "\n".join(body) + "\n"))
    return blocks


def _params() -> list[object]:
    params = []
    for page in PAGES if DOCS.is_dir() else []:
        for line, code in python_blocks(page):
            name = f"{page.relative_to(ROOT)}:{line}"
            first = code.lstrip().splitlines()[0] if code.strip() else ""
            marks = []
            if first.startswith(NOT_RUN):
                marks.append(pytest.mark.skip(reason=first[len(NOT_RUN) :].strip()))
            params.append(pytest.param(code, id=name, marks=marks))
    return params


EXAMPLES = _params()


@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs_as_written(code: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr}"


def test_the_examples_are_found() -> None:
    """The fence parser finds the blocks: an empty list would pass above."""
    assert len(EXAMPLES) >= 10
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) == 3
    assert any("relay(open(" in code for _, code in readme), "the file -> file example"


def test_a_skipped_block_says_why() -> None:
    for page in PAGES:
        for line, code in python_blocks(page):
            first = code.lstrip().splitlines()[0] if code.strip() else ""
            if first.startswith(NOT_RUN):
                assert first[len(NOT_RUN) :].strip(), f"{page.name}:{line}: say why it is not run"


@pytest.mark.parametrize("command", ["cp", "forward", "bench"])
def test_the_cli_page_names_every_option(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastpipe", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    options = done.stdout.split("options:", 1)[1]
    names = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b", options)) - {"-h", "--help"}
    assert names, done.stdout
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    section = page.split(f"## `fastpipe {command}", 1)[1].split("\n## ", 1)[0]
    missing = sorted(name for name in names if f"`{name}" not in section)
    assert not missing, f"docs/cli.md does not describe fastpipe {command} {missing}"
