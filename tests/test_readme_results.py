"""Every figure README quotes from a measurement sits in a results block generated from the file the measuring
command wrote (evaluation/results_docs.py): the blocks are what their files give, an edited digit is caught, and a
measured-looking figure typed into README's prose, outside the blocks, fails."""

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
# Written before benchmarks recorded a commit: its date, machine and each row's load are in it, and its section of
# docs/benchmarks.md is checked against it (tests/bench/test_docs_sections.py).
DATED_ONLY = {"bench/results/prepare_memory.json"}
ESTIMATE_FILE = REPO_ROOT / "docs" / "results" / "estimate_qwen2.5-7b.json"

# What a measured figure looks like in prose: a percentage with decimals, a ratio or speedup, a duration, an amount of
# memory, a before -> after pair of decimals, a decimal in scientific notation.
FIGURE = re.compile(
    r"\d+\.\d+\s?%"
    r"|(?<![\w.])\d+(?:\.\d+)?[x×](?!\w)"
    r"|(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|s|sec|seconds?|min|minutes?|h|hours?)\b"
    r"|(?<![\w.])\d+(?:\.\d+)?\s?[KMGT]i?B\b"
    r"|\d+\.\d+\s*->\s*[-+]?\d+\.\d+"
    r"|(?<![\w.])\d\.\d+e[-+]?\d+\b"
)
# Phrases of README's prose (whitespace as one space) whose figure is not a measurement, each with the reason.
NOT_MEASURED = {
    "parameters (16.29%)": "the LoRA banner's trainable share of the embedded model: a parameter count",
    "a log line every 30 s": "the progress log's interval, a setting",
    "24 h, partition gpu": "launch/slurm.sbatch's default time limit, a setting",
    "SIGUSR1 600 s before the time limit": "the Slurm signal's lead time, a setting",
    "`training.ddp_timeout` is 600 s": "a default setting",
    "after `SlurmdTimeout` (300 s by default)": "Slurm's default setting",
    "in at most 8 minutes": "the GPU check's time budget, not a time it took",
    "a 67 MB shared-memory buffer": "DeepSpeed's buffer size, its constant",
    "PyPI (76 MB, nothing built)": "the size of a file downloaded from PyPI",
    "wheel (92 MB)": "the size of a file downloaded from PyPI",
    "under the 64 MiB such a machine takes": "the GPU machine's limit per call",
    "(1.6e-2 relative)": "the family matrix's bound (4 bf16 spacings), which its test asserts",
}
# Measured figures still typed in prose, in the multi-node section (another session's): to come from a results file
# or go. Listed so that any other figure typed there fails.
NOT_YET_FROM_A_FILE: dict[str, str] = {}


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def prose(text: str) -> str:
    """README without its results blocks, whitespace runs as one space."""
    return " ".join(BLOCK.sub(" ", text).split())


def figures_in_prose(text: str) -> list[str]:
    """The measured-looking figures of `text`'s prose that no allowlisted phrase holds."""
    remaining = prose(text)
    for phrase in (*NOT_MEASURED, *NOT_YET_FROM_A_FILE):
        remaining = remaining.replace(phrase, " ")
    return [m.group() for m in FIGURE.finditer(remaining)]


def test_readme_results_blocks_are_generated_from_their_files() -> None:
    blocks = BLOCK.findall(readme())
    # the demo, DFT's arm of its comparison, the comparison, the released model's demo and its comparison, the
    # preparation scaling and memory, the pre-training demo and the SFT after it, the memory estimate, the reward demo
    assert len(blocks) >= 11
    for _, path, kind, _, _ in blocks:
        record = json.loads((REPO_ROOT / path).read_text())
        if kind in COMPUTED:
            continue
        if path in DATED_ONLY:
            assert "date" in record, path
            continue
        # a run's file carries its provenance; a benchmark's kept runs carry theirs each
        runs = record["runs"] if "runs" in record and not all(key in record for key in PROVENANCE) else [record]
        assert all(key in run for run in runs for key in PROVENANCE), path
    assert main(["--check"]) == 0, "README's results blocks differ from their files: python -m evaluation.results_docs"


def test_readme_prose_quotes_no_measured_figure_outside_the_results_blocks() -> None:
    found = figures_in_prose(readme())
    assert not found, (
        f"README quotes {found} in prose: a measured figure goes in a results block rendered from the file its "
        "command wrote (evaluation/results_docs.py), or the prose says it without the number; a setting or a "
        "constant goes in NOT_MEASURED with its reason"
    )
    stale = [phrase for phrase in (*NOT_MEASURED, *NOT_YET_FROM_A_FILE) if phrase not in prose(readme())]
    assert not stale, f"allowlisted phrases no longer in README: {stale}: remove them from the allowlist"


@pytest.mark.parametrize(
    "typed",
    [
        "held-out exact match reached 93.3% here",
        "2 workers prepare about 1.9x as fast as one",
        "it is 10–20× smaller",
        "about 30 s on 2 CPU cores",
        "make test took 22.2 minutes",
        "the NLL went 0.922 -> 1.302",
        "the peak was 1.4 GiB",
        "the DFT loss fell to 5.8e-05",
    ],
)
def test_a_figure_typed_into_readme_prose_is_caught(typed: str) -> None:
    text = readme()
    paragraph_end = text.index("\n\n", text.index("## Two commands"))
    edited = text[:paragraph_end] + f" Measured: {typed}." + text[paragraph_end:]
    assert figures_in_prose(edited), typed
    # The same figure inside a results block is the block's business (the other tests), not the prose's.
    block = next(BLOCK.finditer(text))
    inside = text[: block.start(4)] + f"{typed}\n" + text[block.start(4) :]
    assert not figures_in_prose(inside)


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
