"""Every figure README quotes from a measurement sits in a results block generated from the file the measuring
command wrote (evaluation/results_docs.py): the blocks are what their files give, and an edited digit is caught."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evaluation.results_docs import BLOCK, main, regenerate
from evaluation.run_record import evaluation_record
from tests.helpers import REPO_ROOT

PROVENANCE = ("date", "commit", "command", "load_average_1min", "cpus")
COMPUTED = {"estimate"}  # figures computed from a config, not measured: recomputed below instead
ESTIMATE_FILE = REPO_ROOT / "docs" / "results" / "estimate_qwen2.5-7b.json"


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_results_blocks_are_generated_from_their_files() -> None:
    blocks = BLOCK.findall(readme())
    # the demo, its comparison, the released model's demo and its comparison, the pre-training demo and the SFT
    # after it, the memory estimate
    assert len(blocks) >= 7
    for _, path, kind, _, _ in blocks:
        record = json.loads((REPO_ROOT / path).read_text())
        assert kind in COMPUTED or all(key in record for key in PROVENANCE), path
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


def test_the_quoted_memory_estimate_is_what_the_estimate_computes_now(capsys: pytest.CaptureFixture[str]) -> None:
    """The estimate is computed, not measured: its file must be what `modeling.estimate --json` gives today."""
    from modeling.estimate import main as estimate_main

    recorded = json.loads(ESTIMATE_FILE.read_text())
    estimate_main(["--json", "--gpus", str(recorded["gpus"]), f"model.name_or_path={recorded['model']}"])
    assert json.loads(capsys.readouterr().out) == recorded, (
        f"{ESTIMATE_FILE.name} is stale: python -m modeling.estimate --json --gpus 8 "
        "model.name_or_path=docs/shapes/qwen2.5-7b > docs/results/estimate_qwen2.5-7b.json, then "
        "python -m evaluation.results_docs"
    )


def test_a_run_record_takes_the_first_and_last_evaluation_and_the_final_training_loss() -> None:
    metrics = [
        {"step": 0, "eval_nll": 11.0},
        {"step": 5, "loss": 7.0},
        {"step": 10, "eval_nll": 6.0},
        {"step": 20, "eval_nll": 4.5},
        {"step": 20, "train_loss": 5.9},
    ]
    assert evaluation_record(metrics, Path("metrics.jsonl")) == {
        "steps": 20,
        "eval_first": {"step": 0, "nll": 11.0},
        "eval_last": {"step": 20, "nll": 4.5},
        "train_loss": 5.9,
    }


def test_a_run_without_an_evaluation_or_an_end_is_not_recorded() -> None:
    with pytest.raises(ValueError, match="metrics.jsonl: no evaluation or no end-of-training record"):
        evaluation_record([{"step": 0, "eval_nll": 11.0}], Path("metrics.jsonl"))
