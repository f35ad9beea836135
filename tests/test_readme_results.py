"""Every figure README quotes from a measurement sits in a results block generated from the file the measuring
command wrote (evaluation/results_docs.py): the blocks are what their files give, and an edited digit is caught."""

from __future__ import annotations

import json
import re

from evaluation.results_docs import BLOCK, main, regenerate
from tests.helpers import REPO_ROOT

PROVENANCE = ("date", "commit", "command", "load_average_1min", "cpus")


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_results_blocks_are_generated_from_their_files() -> None:
    blocks = BLOCK.findall(readme())
    assert len(blocks) >= 4  # the demo, its comparison, the released model's demo and its comparison
    for _, path, _, _, _ in blocks:
        record = json.loads((REPO_ROOT / path).read_text())
        assert all(key in record for key in PROVENANCE), path
    assert main(["--check"]) == 0, "README's results blocks differ from their files: python -m evaluation.results_docs"


def test_a_digit_changed_by_hand_in_a_results_block_is_caught() -> None:
    text = readme()
    match = next(m for m in BLOCK.finditer(text) if re.search(r"\d", m.group(4)))
    body = match.group(4)
    digit = re.search(r"\d", body)
    edited_body = body[: digit.start()] + str((int(digit.group()) + 1) % 10) + body[digit.end() :]
    edited = text[: match.start(4)] + edited_body + text[match.end(4) :]
    assert regenerate(edited) != edited
    assert regenerate(edited) == text
