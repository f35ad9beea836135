"""python -m evaluation.compare: the same base, data and seed for every arm, each run in its own directory, and a
verdict whose numbers are the runs' own; DFT refused on an untrained base before anything trains."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from embedded.families import FamilySize, family_model
from evaluation.compare import RunResult, differences, parse_arms
from observability.artifacts import read_metrics
from tests.helpers import NO_HELDOUT, REPO_ROOT, TOKENIZER_DIR

USER_ERROR = 2
QUICK = ("debug=quick", "heldout.max_samples=6")


def compare(out: Path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "evaluation.compare", "--out", str(out), *arguments]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def samples_digests(run_dir: Path) -> list[str]:
    rows = map(json.loads, (run_dir / "logs" / "rank0_metrics.jsonl").read_text().splitlines())
    return [row["samples"] for row in rows if row["mode"] == "train"]


def prepared_dataset(run_dir: Path) -> str:
    """The prepared-dataset directory a run trained from, as its log names it."""
    match = re.search(r"(?:Wrote|Reusing) the prepared dataset (\S+)", (run_dir / "logs" / "rank0.log").read_text())
    assert match, f"{run_dir}: no prepared dataset in the log"
    return match.group(1)


def table_rows(verdict: str) -> dict[tuple[str, int], list[str]]:
    """The main table's cells by (arm, seed)."""
    rows = {}
    for line in verdict.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells[2:]
    return rows


@pytest.mark.slow
def test_two_arms_two_seeds_share_data_order_and_the_verdict_reads_their_files(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    result = compare(
        out, "--seeds", "1,2", "--arm", "ce=loss.type=ce", "--arm", "dft=loss.type=dft loss.alpha=1", *QUICK
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    verdict = (out / "verdict.md").read_text()
    assert verdict in result.stdout, "the console does not show the verdict"
    assert (out / "verdict.png").read_bytes().startswith(b"\x89PNG")
    rows = table_rows(verdict)
    assert set(rows) == {("ce", 1), ("dft", 1), ("ce", 2), ("dft", 2)}, verdict
    for (arm, seed), cells in rows.items():
        run_dir = out / arm / f"seed{seed}"
        assert (run_dir / "model.safetensors").is_file(), f"{run_dir}: no model"
        heldout = json.loads((run_dir / "heldout.json").read_text())["after"]
        records = read_metrics(run_dir)
        last_eval = [r for r in records if "eval_nll" in r][-1]
        end = [r for r in records if "train_runtime" in r][-1]
        assert cells[0] == f"{100 * heldout['exact_match']:.1f}%" and cells[1] == f"{heldout['nll']:.3f}", cells
        assert cells[2] == f"{last_eval['eval_nll']:.3f}" and cells[3] == f"{last_eval['eval_avg_p_correct']:.3f}"
        assert cells[4] == f"{end['train_loss']:.4f}" and cells[6] == f"{end['train_runtime']:.1f}", cells
        if arm == "dft":
            assert {r["dft_alpha"] for r in records if "dft_alpha" in r} == {1.0}, f"{run_dir} trained another loss"

    # The same samples in the same order for both arms of a seed (every logging interval), another order per seed,
    # from one prepared dataset (so the same token ids: the cache directory is keyed by the data and tokenizer).
    for seed in (1, 2):
        assert samples_digests(out / "ce" / f"seed{seed}") == samples_digests(out / "dft" / f"seed{seed}")
        datasets = {prepared_dataset(out / arm / f"seed{seed}") for arm in ("ce", "dft")}
        assert len(datasets) == 1, datasets
    assert samples_digests(out / "ce" / "seed1")[0] != samples_digests(out / "ce" / "seed2")[0]
    assert "every arm of a seed trained on the same samples in the same order" in verdict
    assert re.search(r"\| dft \| held-out NLL \| [+-]\d", verdict), verdict

    # --report-only rebuilds the same verdict from the directories alone (the Slurm path's second step).
    (out / "verdict.md").unlink()
    again = compare(out, "--report-only")
    assert again.returncode == 0 and (out / "verdict.md").read_text() == verdict, again.stderr[-2000:]


@pytest.mark.slow
def test_dft_on_an_untrained_base_is_refused_before_any_run(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    random_base = tmp_path / "random-qwen2"
    family_model("qwen2", FamilySize(vocab_size=len(tokenizer))).save_pretrained(random_base)
    tokenizer.save_pretrained(random_base)
    out = tmp_path / "compare"
    result = compare(out, f"model.name_or_path={random_base}", *QUICK, NO_HELDOUT)
    assert result.returncode == USER_ERROR, result.stdout[-2000:] + result.stderr[-2000:]
    assert "looks untrained" in result.stderr and "gradient is that of -p" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir()), "a run started"


def test_arms_may_not_change_what_runs_of_a_seed_share() -> None:
    assert parse_arms(["lr=loss.type=dft training.learning_rate=1e-4"]) == {
        "lr": ["loss.type=dft", "training.learning_rate=1e-4"]
    }
    for override in ("data.max_length=64", "training.seed=3", "model.name_or_path=/m", "+training.max_steps=9"):
        with pytest.raises(ValueError, match="every run of a seed must share"):
            parse_arms([f"bad=loss.type=ce {override}"])


def test_differences_are_per_seed_gaps_to_the_baseline() -> None:
    def run(arm: str, seed: int, exact: float, nll: float) -> RunResult:
        heldout = {
            "prompts": 10,
            "before": {"exact_match": 0.1, "nll": 1.0},
            "after": {"exact_match": exact, "nll": nll},
        }
        return RunResult(arm, seed, Path("."), heldout, {"eval_nll": nll}, {}, None)

    results = [run("ce", 1, 0.9, 0.2), run("dft", 1, 0.6, 0.5), run("ce", 2, 0.8, 0.3), run("dft", 2, 0.8, 0.4)]
    gaps = {name: (mean, low, high) for arm, name, mean, low, high in differences(results, "ce")}
    assert gaps["held-out exact match (points)"] == pytest.approx((-15.0, -30.0, 0.0))
    assert gaps["held-out NLL"] == pytest.approx((0.2, 0.1, 0.3))
