"""The math the code relies on lives in docs/math.md, and the code cites it by section.

- No file of the repository refers to a document outside it: neither the old section
  references of an external design document nor a path into a sibling "shared" folder.
- Every "docs/math.md §X" citation (also "docs/math.md §X, §Y") names a section heading
  ("## §X ..." or "### §X ...") that exists in docs/math.md.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
# Folders that are not the repository's own content: VCS data, environments, caches, build and
# run outputs (all ignored by git).
SKIP_DIRS = {
    ".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
    ".benchmarks", "build", "dist", "runs", "demo", "out", "node_modules",
}
# Built from pieces so that this file does not match itself.
FORBIDDEN = ("SP" + "EC \u00a7", ".." + "/shared")
CITATION = re.compile(r"docs/math\.md((?:(?:,\s*|\s+and\s+|\s+)\u00a7\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"\u00a7(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+\u00a7(\d+(?:\.\d+)*)\s", re.MULTILINE)


def _files() -> list[Path]:
    out = []
    stack = [ROOT]
    while stack:
        folder = stack.pop()
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                continue
            if entry.is_dir():
                if entry.name not in SKIP_DIRS and not entry.name.endswith(".egg-info"):
                    stack.append(entry)
            elif entry.is_file():
                out.append(entry)
    return out


def _text(path: Path) -> str | None:
    """The file as text, or None for binary files."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def _sections() -> set[str]:
    return set(HEADING.findall(MATH.read_text(encoding="utf-8")))


def test_math_doc_exists_with_numbered_sections() -> None:
    sections = _sections()
    assert MATH.is_file()
    assert {"1", "2", "2.1", "3", "3.1"} <= sections, sorted(sections)


def test_no_reference_to_documents_outside_the_repository() -> None:
    hits = []
    for path in _files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in FORBIDDEN):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "cite docs/math.md instead:\n" + "\n".join(hits)


def test_math_citations_name_existing_sections() -> None:
    sections = _sections()
    cited = 0
    missing = []
    for path in _files():
        if path == MATH:
            continue
        text = _text(path)
        if text is None:
            continue
        for match in CITATION.finditer(text):
            number = text.count("\n", 0, match.start()) + 1
            for section in SECTION.findall(match.group(1)):
                cited += 1
                if section not in sections:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: docs/math.md \u00a7{section}")
    assert cited > 0, "no docs/math.md citation found"
    assert not missing, "citations of sections that docs/math.md does not have:\n" + "\n".join(missing)
