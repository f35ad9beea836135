"""docs/benchmarks.md: each benchmark rewrites its own section there and leaves the others as they are."""

from __future__ import annotations

from pathlib import Path

from embedded.paths import REPO_ROOT

DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"


def replace_docs_section(section: list[str], old_headings: tuple[str, ...] = (), docs_path: Path | None = None) -> None:
    """Put `section` (its lines, its `## ` heading first, a blank line last) in place of the section under that
    heading (or under one of `old_headings`, names it had before), or at the end of the file when there is none;
    in `docs_path` instead of docs/benchmarks.md when given."""
    path = docs_path or DOCS_PATH
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    headings = (section[0], *old_headings)
    start = next((i for i, line in enumerate(lines) if line in headings), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
        text = "\n".join(lines) + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
