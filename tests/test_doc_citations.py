"""Every document the code cites is a file in the repo, and every citation lands somewhere.

Comments and docstrings in adapterctl/, tests/ and benchmarks/ cite design notes as
`docs/peft-format.md §2.3` or `docs/peft-format.md, Trap T1`. This test fails when a citation
names a document outside the repo (../shared/..., a bare `peft-format.md`), a docs file that does
not exist, or a § / Trap heading that the cited file does not have; and when a
`tests/path.py::test_name` reference in docs/ or CONTRIBUTING.md names a missing file or test.
Everything is read from the files at test time, so renames show up here as failures to fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("adapterctl", "tests", "benchmarks")
DOCS = ROOT / "docs"

#: a cited repo document, and the rest of its line up to a closing bracket or semicolon
CITATION = re.compile(r"(?<![\w/.-])docs/(?P<file>[\w.-]+\.md)(?P<tail>[^)\n;]*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
TRAP = re.compile(r"\bTrap (T\d+)\b")
#: documents that live outside the repo, or a docs file named without its folder
OUTSIDE = re.compile(
    r"\.\./shared|shared/docs|shared/peft-probes|house-style\.md"
    r"|(?<![\w/-])(?:peft-format|hub-protocol|architecture)\.md"
)
HEADING = re.compile(r"^#+\s+(§\d+(?:\.\d+)*|Trap T\d+)\b", re.MULTILINE)
TEST_REF = re.compile(r"\b(tests/[\w/]+\.py)((?:::\w+)+)")


def headings(doc: Path) -> set[str]:
    """The anchors a citation may name: `§2.3` and `Trap T1` headings of a markdown file."""
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def citation_problems(text: str, docs: Path, home: Path | None = None) -> list[str]:
    """What is wrong with the document citations in `text`. In a docs file (`home`), a bare §2.3
    or Trap T1 means a heading of that same file."""
    problems = [
        f"cites a document outside the repo: {m.group(0)!r}" for m in OUTSIDE.finditer(text)
    ]
    cited_spans: list[tuple[int, int]] = []
    for m in CITATION.finditer(text):
        cited_spans.append((m.start(), m.end()))
        doc = docs / m.group("file")
        if not doc.is_file():
            problems.append(f"cites docs/{m.group('file')}, which does not exist")
            continue
        known = headings(doc)
        tail = m.group("tail")
        for number in SECTION.findall(tail):
            if f"§{number}" not in known:
                problems.append(f"cites docs/{m.group('file')} §{number}: no such heading")
        for trap in TRAP.findall(tail):
            if f"Trap {trap}" not in known:
                problems.append(f"cites docs/{m.group('file')}, Trap {trap}: no such heading")
    own = headings(home) if home is not None else set()
    for pattern, anchor in ((SECTION, "§{}"), (TRAP, "Trap {}")):
        for m in pattern.finditer(text):
            name = anchor.format(m.group(1))
            if any(start <= m.start() < end for start, end in cited_spans):
                continue
            if home is None:
                problems.append(f"{name} without the docs/ file it is in")
            elif name not in own:
                problems.append(f"{name}: no such heading in {home.name}")
    return problems


def reference_problems(tests_root: Path, text: str) -> list[str]:
    """What is wrong with the `tests/x.py::name` references in `text` (a docs file)."""
    problems = []
    for m in TEST_REF.finditer(text):
        path = tests_root / m.group(1)
        if not path.is_file():
            problems.append(f"{m.group(0)}: no file {m.group(1)}")
            continue
        source = path.read_text(encoding="utf-8")
        for name in filter(None, m.group(2).split("::")):
            if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", source, re.MULTILINE):
                problems.append(f"{m.group(0)}: {m.group(1)} defines no {name}")
    return problems


def _sources() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py") if p != Path(__file__))


#: the design documents the repo must have (issue #12), and any other docs/*.md
REQUIRED = (
    "docs/architecture.md",
    "docs/peft-format.md",
    "docs/hub-protocol.md",
    "CONTRIBUTING.md",
)


def _documents() -> list[Path]:
    return sorted({ROOT / name for name in REQUIRED} | set(DOCS.glob("*.md")))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_citations_resolve(path: Path) -> None:
    assert citation_problems(path.read_text(encoding="utf-8"), DOCS) == []


@pytest.mark.parametrize("path", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_exist_and_their_references_resolve(path: Path) -> None:
    assert path.is_file()
    text = path.read_text(encoding="utf-8")
    assert citation_problems(text, DOCS, home=path) == []
    assert reference_problems(ROOT, text) == []


def test_the_code_cites_the_design_documents() -> None:
    """The check has something to check: the code does cite §s and Traps."""
    cited = "".join(p.read_text(encoding="utf-8") for p in _sources())
    assert len(CITATION.findall(cited)) >= 30


# the checker itself, on made-up text ------------------------------------------------------------


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    (tmp_path / "peft-format.md").write_text("# X\n## §2 Keys\n### §2.3 Names\n### Trap T1 Order\n")
    return tmp_path


@pytest.mark.parametrize(
    "text",
    [
        "# see docs/peft-format.md §2.3",
        '"""(docs/peft-format.md §2, §2.3; docs/peft-format.md, Trap T1)"""',
        "# no citation here, just a comment",
    ],
)
def test_good_citations_pass(docs: Path, text: str) -> None:
    assert citation_problems(text, docs) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("# (../shared/docs/hub-protocol.md)", "outside the repo"),
        ("# peft-format.md 2.3", "outside the repo"),
        ("# see docs/missing.md", "does not exist"),
        ("# docs/peft-format.md §2.4", "§2.4: no such heading"),
        ("# docs/peft-format.md, Trap T9", "Trap T9: no such heading"),
        ("# (Trap T1)", "Trap T1 without the docs/ file"),
        ("# rule in §2.3", "§2.3 without the docs/ file"),
    ],
)
def test_bad_citations_fail(docs: Path, text: str, problem: str) -> None:
    assert any(problem in p for p in citation_problems(text, docs)), citation_problems(text, docs)


def test_bare_anchors_in_a_docs_file_name_its_own_headings(docs: Path) -> None:
    home = docs / "peft-format.md"
    assert citation_problems("as in §2.3 and Trap T1", docs, home=home) == []
    assert citation_problems("as in §7", docs, home=home) == [
        "§7: no such heading in peft-format.md"
    ]


def test_test_references_must_name_real_tests(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n    pass\n")
    assert reference_problems(tmp_path, "`tests/test_a.py::test_one`") == []
    assert reference_problems(tmp_path, "`tests/test_a.py::test_two`") == [
        "tests/test_a.py::test_two: tests/test_a.py defines no test_two"
    ]
    assert reference_problems(tmp_path, "tests/test_b.py::test_one") == [
        "tests/test_b.py::test_one: no file tests/test_b.py"
    ]
