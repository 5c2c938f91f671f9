"""The documentation site: it builds with warnings as errors, and its examples run.

* ``test_site_builds_strictly`` runs ``sphinx -W --keep-going`` on ``docs/`` into a
  temporary directory (a subprocess, about 10-30 s); any warning fails it.
  Deselect with ``-m "not slow"``.
* ``test_page_examples`` runs the ``pycon`` code blocks (``>>>`` sessions) of the
  pages as doctests, one namespace per page, in page order. Blocks that import a
  library that is not installed are skipped. Plain ``python`` blocks (e.g. the
  CuPy examples, which need a GPU) are not run.

Docstring examples are run separately, by pytest's ``--doctest-modules``.
"""

from __future__ import annotations

import doctest
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PYCON = re.compile(r"^```pycon[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
IMPORT = re.compile(r"^>>> (?:import|from) ([A-Za-z_][\w]*)", re.MULTILINE)
PAGES = sorted(
    p for p in DOCS.rglob("*.md") if "_build" not in p.parts and PYCON.search(p.read_text())
)


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    for mod in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(mod)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"sphinx -W failed:\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    assert not out.stderr.strip(), f"sphinx wrote warnings:\n{out.stderr[-8000:]}"
    assert (tmp_path / "html" / "index.html").exists()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_examples(page):
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    globs: dict = {"__name__": "__docs__"}
    skipped = []
    text = page.read_text()
    for i, match in enumerate(PYCON.finditer(text)):
        block, line = match.group(1), text.count("\n", 0, match.start(1))
        missing = [m for m in IMPORT.findall(block) if importlib.util.find_spec(m) is None]
        if missing:
            skipped.append((i, missing))
            continue
        test = parser.get_doctest(block, globs, f"{page.name}[block {i}]", str(page), line)
        runner.run(test, clear_globs=False)
        globs = test.globs  # DocTest copies its globals; carry them to the next block
    failures, tried = runner.summarize(verbose=False)
    assert failures == 0, f"{failures} of {tried} examples in {page.name} failed (output above)"
    if skipped and not tried:
        pytest.skip(f"every example needs a missing library: {skipped}")


def test_guarantee_table_names_real_tests():
    """Every ``test_*`` name cited on the guarantees page is defined in ``tests/``."""
    page = (DOCS / "guarantees.md").read_text()
    cited = set(re.findall(r"`(test_\w+)`", page))
    defined = set()
    for f in (DOCS.parent / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", f.read_text(), re.MULTILINE))
    assert cited, "no test names found on docs/guarantees.md"
    assert cited <= defined, (
        f"docs/guarantees.md cites tests that do not exist: {sorted(cited - defined)}"
    )
