"""The documents cite only what the repository holds: every file path and every section link
in ``README.md``, ``benchmarks/README.md`` and ``docs/*.md`` resolves, no file cites a design
document outside the repository, and the documents describe results, not how they were made.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
#: Top-level folders of the repository: a cited path starting with one of them is checked.
PREFIXES = ("benchmarks/", "callbacks/", "configs/", "docs/", "examples/", "sdze_lightning/",
            "tests/")
#: A path as written in a document: letters, digits and the characters of globs ``*``,
#: brace lists ``{a,b}``, optional parts ``[_x]`` and placeholders ``<a|b>`` (left out).
_STARTS = "|".join(re.escape(p) for p in (*PREFIXES, "results/"))
PATH = re.compile(r"(?<![\w./-])((?:\.\./)?(?:" + _STARTS + r")[\w./*{},\[\]<>|-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
#: Words about how or when the documents were written, which belong in git, not in them.
HISTORY = re.compile(r"\b(issues?|sessions?|rounds?|previously|re-measured|helpers?)\b", re.I)


def expand(pattern: str) -> list[str]:
    """All spellings of ``pattern``: each ``{a,b}`` one of its items, each ``[x]`` with or
    without ``x``."""
    parts = re.split(r"(\{[^{}]*\}|\[[^\[\]]*\])", pattern)
    choices = []
    for part in parts:
        if part.startswith("{"):
            choices.append(part[1:-1].split(","))
        elif part.startswith("["):
            choices.append(["", part[1:-1]])
        else:
            choices.append([part])
    return ["".join(c) for c in itertools.product(*choices)]


def resolve(doc: Path, cited: str) -> Path:
    """Where a path cited in ``doc`` lies: links relative to the document, ``results/``
    relative to ``benchmarks/``, anything else relative to the repository root."""
    if cited.startswith("results/"):
        return ROOT / "benchmarks" / cited
    if cited.startswith("../") or doc.parent != ROOT and not cited.startswith(PREFIXES):
        return (doc.parent / cited).resolve()
    return ROOT / cited


def cited_paths(doc: Path) -> list[str]:
    """Repository paths cited in ``doc`` (placeholders such as ``<dir>`` left out)."""
    text = doc.read_text()
    found = [m.rstrip(".,:;") for m in PATH.findall(text)]
    found += [link.split("#", 1)[0] for link in LINK.findall(text)
              if not link.startswith(("http://", "https://", "#"))]
    return sorted({p for p in found if p and "<" not in p and "|" not in p})


def exists(doc: Path, cited: str) -> bool:
    """``cited`` names at least one existing file or folder, in each of its spellings."""
    for spelling in expand(cited.split("::", 1)[0]):
        target = resolve(doc, spelling)
        if "*" in spelling:
            if not list(target.parent.glob(target.name)):
                return False
        elif not target.exists():
            return False
    return True


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading (``## A b`` -> ``a-b``)."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of the headings of ``doc``."""
    return {slug(line) for line in doc.read_text().splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_path_exists(doc):
    paths = cited_paths(doc)
    assert paths, f"{doc} cites no path: the pattern no longer finds them"
    missing = [p for p in paths if not exists(doc, p)]
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_link_resolves(doc):
    broken = []
    for link in LINK.findall(doc.read_text()):
        if link.startswith(("http://", "https://")) or "#" not in link:
            continue
        path, anchor = link.split("#", 1)
        target = resolve(doc, path) if path else doc
        if target.suffix == ".md" and anchor not in anchors(target):
            broken.append(link)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing sections {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_hold_no_development_history(doc):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(doc.read_text().splitlines(), 1)
            if HISTORY.search(line)]
    assert not hits, f"{doc.relative_to(ROOT)}:\n" + "\n".join(hits)


def test_no_file_cites_a_design_document_outside_the_repository():
    name = "DESIGN" + ".md"  # spelled in two parts so that this file does not cite it
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=False).stdout.split()
    except FileNotFoundError:  # no git on this machine
        files = []
    if not files:  # not a git checkout (an unpacked sdist): look at the text files
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]
    citing = []
    for rel in files:
        path = ROOT / rel
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}:
            continue
        if path.is_file() and name in path.read_text(errors="ignore"):
            citing.append(rel)
    assert not citing, f"files citing {name}, which is not in the repository: {citing}"


def test_the_path_check_fails_on_a_dangling_path(tmp_path):
    """The check itself: a missing file, a missing item of a brace list, an empty glob."""
    doc = ROOT / "benchmarks" / "README.md"
    assert exists(doc, "results/method_matrix.{json,md}")
    assert not exists(doc, "results/method_matrix.{json,nope}")
    assert not exists(doc, "benchmarks/no_such_script.py")
    assert not exists(doc, "results/no_such_run_*.json")
    assert exists(doc, "../docs/design.md") and not exists(doc, "../docs/nope.md")
    assert slug("### `scaling.py`") == "scalingpy"
    assert slug("## Method and caveats") == "method-and-caveats"
    assert "limitations" in anchors(doc) and "no-such-section" not in anchors(doc)
