"""Comments and docs stand alone: nothing in the repository cites notes that it does not
hold, and every docs/ page a file points at exists (docs/architecture.md).

Run: `.venv/bin/python -m pytest -q tests/test_docs_references.py`
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".json", ""}
SKIP_DIRS = {".git", ".venv", ".venv-bench", ".venv-peer", "demo_out", "__pycache__", ".pytest_cache", "mlruns", "build", "dist"}
# Spelt in pieces so that this file does not match itself.
OUTSIDE_NOTES = re.compile("|".join([r"MACHINE" + r"\.md", r"CLIP" + r"\.md", r"STYLE" + r"\.md",
                                     r"the " + r"brief", r"shared/" + r"reference", r"/" + r"work/"]))
DOCS_LINK = re.compile(r"docs/([A-Za-z0-9_\-]+\.md)")


def _files() -> list[Path]:
    out = []
    for p in REPO.rglob("*"):
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(REPO).parts):
            continue
        if p.is_file() and p.suffix in TEXT_SUFFIXES and p.stat().st_size < 2_000_000:
            out.append(p)
    return out


def test_no_citation_of_notes_outside_the_repository() -> None:
    hits = []
    for p in _files():
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_NOTES.search(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "cite a docs/ page, a test, a paper or an upstream issue instead:\n" + "\n".join(hits)


def test_every_cited_docs_page_exists() -> None:
    missing = []
    for p in _files():
        for name in DOCS_LINK.findall(p.read_text(encoding="utf-8", errors="replace")):
            if not (REPO / "docs" / name).is_file():
                missing.append(f"{p.relative_to(REPO)} -> docs/{name}")
    assert not missing, "\n".join(missing)
    assert (REPO / "docs" / "architecture.md").is_file()
