"""Every Markdown file the repository cites is in the repository.

Docstrings, comments and Markdown cite notes as ``docs/caadam.md`` §2 or as
links (``[BUILD_NOTES.md](BUILD_NOTES.md#performance)``). This scans the
``.py`` and ``.md`` files a reader sees and checks that each cited file exists
(relative to the citing file or to the repository root), that each cited
section number (``§2``, ``§2.1``, ``§2-§4``, ``section 3``) is a numbered
heading of that file, and that each ``#anchor`` is one of its headings.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("README.md", "BUILD_NOTES.md", "docs", "adaptive_moments", "tests", "benchmarks",
           "examples")

# A path ending in .md that is not part of a longer name, an f-string field or
# a path we already started; an optional #anchor follows.
_CITATION = re.compile(
    r"(?<![\w{}/.\-])(?P<path>(?:[\w.\-]+/)*[\w\-]+\.md)(?P<anchor>#[\w\-]+)?(?!\w)"
)
# Section numbers right after a citation: closing quotes/brackets, then
# "§N" or "section N", then more joined by "-", "–", "/", "," or "and".
_NUMBER = r"(?:§|section\s+)(\d+(?:\.\d+)*)"
_FIRST = re.compile(r"[`'\")\]]*\s*" + _NUMBER)
_MORE = re.compile(r"\s*(-|–|/|,|and)\s*" + _NUMBER)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_NUMBERED = re.compile(r"§?(\d+(?:\.\d+)*)\.?(?:\s|$)")


@dataclasses.dataclass(frozen=True)
class Citation:
    source: str  # "path:line"
    target: str
    anchor: str | None
    sections: tuple[str, ...]


def find_citations(text: str, source: str) -> list[Citation]:
    """The ``.md`` citations of ``text`` (``source`` names it in messages).

    A file name in quotes on both sides (``"merged.md"``) is a string the
    code writes, not a citation, and is skipped.
    """
    out = []
    for m in _CITATION.finditer(text):
        before, after = text[m.start() - 1 : m.start()], text[m.end() : m.end() + 1]
        if before in ("'", '"') and after == before:
            continue
        sections: list[str] = []
        first = _FIRST.match(text, m.end())
        if first:
            sections.append(first.group(1))
            pos = first.end()
            while more := _MORE.match(text, pos):
                start, end = sections[-1], more.group(2)
                if more.group(1) in ("-", "–") and start.isdigit() and end.isdigit():
                    # A range of top-level sections: every one must exist.
                    sections.extend(str(k) for k in range(int(start) + 1, int(end) + 1))
                else:
                    sections.append(end)
                pos = more.end()
        line = text.count("\n", 0, m.start()) + 1
        anchor = m.group("anchor")[1:] if m.group("anchor") else None
        out.append(Citation(f"{source}:{line}", m.group("path"), anchor, tuple(sections)))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> tuple[set[str], set[str]]:
    """(section numbers, anchors) of the headings of a Markdown file."""
    numbers, anchors = set(), set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else _HEADING.match(line)
        if m:
            anchors.add(_slug(m.group(1)))
            n = _NUMBERED.match(m.group(1))
            if n:
                numbers.add(n.group(1))
    return numbers, anchors


def _scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        p = ROOT / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [
                f for f in sorted(p.rglob("*")) if f.suffix in (".py", ".md") and f.is_file()
                and "__pycache__" not in f.parts
            ]
    # This file's own examples are not citations.
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def resolve(citing: Path, target: str, root: Path = ROOT) -> Path | None:
    """The cited file: relative to the citing file, else to ``root``."""
    for base in (citing.parent, root):
        p = (base / target).resolve()
        if p.is_file() and p.is_relative_to(root):
            return p
    return None


def problems_of(files: list[Path], root: Path = ROOT) -> tuple[list[str], list[Path]]:
    """(what does not resolve, the files cited) for the citations of ``files``."""
    problems, cited = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        for c in find_citations(f.read_text(encoding="utf-8"), rel):
            target = resolve(f, c.target, root)
            if target is None:
                problems.append(f"{c.source}: {c.target} is not a file of the repository")
                continue
            cited.append(target)
            numbers, anchors = headings(target)
            for s in c.sections:
                if s not in numbers:
                    problems.append(f"{c.source}: {c.target} has no section {s}")
            if c.anchor is not None and c.anchor not in anchors:
                problems.append(f"{c.source}: {c.target} has no heading #{c.anchor}")
    return problems, cited


@pytest.fixture(scope="module")
def repo_scan() -> tuple[list[str], list[Path]]:
    return problems_of(_scanned_files())


def test_every_md_citation_resolves_to_a_file_and_section(repo_scan):
    problems, cited = repo_scan
    assert cited, "no citation found: the scanner is broken"
    assert not problems, "unresolved citations:\n" + "\n".join(problems)


def test_every_doc_is_cited(repo_scan):
    _, cited = repo_scan
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs
    uncited = [d.name for d in docs if d.resolve() not in cited]
    assert not uncited, f"docs nobody cites: {uncited}"


def test_citation_forms():
    text = (
        "CaAdam (``docs/caadam.md`` §2-§4 and §6, `set_adam.md` section 2, step 1);\n"
        'out = tmp / "merged.md"; name = f"{stem}.md"\n'
        "See [notes](../BUILD_NOTES.md#performance) and exadam.md §1/§8: 141/141.\n"
    )
    got = find_citations(text, "x")
    assert [(c.target, c.anchor, c.sections) for c in got] == [
        ("docs/caadam.md", None, ("2", "3", "4", "6")),
        ("set_adam.md", None, ("2",)),
        ("../BUILD_NOTES.md", "performance", ()),
        ("exadam.md", None, ("1", "8")),
    ]
    assert got[2].source == "x:3"


def test_missing_files_sections_and_anchors_are_reported(tmp_path: Path):
    doc = tmp_path / "docs" / "a.md"
    doc.parent.mkdir()
    doc.write_text("# Title\n\n## 1. First part\n\n```\n## 9. not a heading\n```\n### 1.2 Sub\n")
    assert headings(doc) == ({"1", "1.2"}, {"title", "1-first-part", "12-sub"})
    src = tmp_path / "pkg" / "m.py"
    src.parent.mkdir()
    src.write_text(
        "# docs/a.md §1.2 and §1, ../docs/a.md §9, docs/b.md §1, a.md §1\n"
        "# [x](../docs/a.md#title) [y](../docs/a.md#nope)\n"
    )
    problems, cited = problems_of([src], root=tmp_path)
    assert problems == [
        "pkg/m.py:1: ../docs/a.md has no section 9",
        "pkg/m.py:1: docs/b.md is not a file of the repository",
        "pkg/m.py:1: a.md is not a file of the repository",
        "pkg/m.py:2: ../docs/a.md has no heading #nope",
    ]
    assert cited == [doc] * 4
    outside = tmp_path / "pkg" / "sub"
    outside.mkdir()
    assert resolve(outside / "m.py", "../../../a.md", root=tmp_path) is None
