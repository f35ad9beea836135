"""Run `train.py` and record what it measured: a results file for the figures README quotes from a run that has no
held-out prompts (continued pre-training: its validation loss is the figure).

    python -m evaluation.run_record docs/results/pretrain_demo.json experiment=pretrain_demo \
        output_dir=outputs/pretrain_demo

runs `python train.py <overrides>` and writes, beside the run's provenance (`core.provenance`: date, commit, the
train.py command, the 1-minute load average before and after, cores) and its wall time, the validation NLL of its
first and last evaluation and the final training loss, read from the run's `metrics.jsonl`.
`evaluation.results_docs` renders the file (`eval`). A run with held-out prompts records its own figures instead
(`heldout.results_file`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.files import write_atomic
from core.provenance import provenance
from embedded.paths import REPO_ROOT
from observability.artifacts import read_json_lines


def output_dir_of(overrides: list[str]) -> Path:
    """The run's `output_dir=` override (relative to the repo root, where train.py runs).

    Raises:
        ValueError: no `output_dir=` override.
    """
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")]
    if not given:
        raise ValueError("evaluation.run_record: give output_dir=DIR among the overrides (the metrics are read there)")
    return REPO_ROOT / given[-1]


def evaluation_record(metrics: list[dict[str, Any]], source: Path) -> dict[str, Any]:
    """The first and last evaluation's validation NLL and the final training loss of a run's metrics.jsonl.

    Raises:
        ValueError: the run logged no evaluation, or did not finish.
    """
    evals = [r for r in metrics if "eval_nll" in r]
    end = next((r for r in reversed(metrics) if "train_loss" in r), None)
    if not evals or end is None:
        raise ValueError(
            f"{source}: no evaluation or no end-of-training record: the run needs training.eval_strategy and "
            "training.eval_on_start, and must finish"
        )
    first, last = evals[0], evals[-1]
    return {
        "steps": end["step"],
        "eval_first": {"step": first["step"], "nll": first["eval_nll"]},
        "eval_last": {"step": last["step"], "nll": last["eval_nll"]},
        "train_loss": end["train_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.run_record", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the results file to write (docs/results/NAME.json)")
    parser.add_argument("overrides", nargs="+", help="train.py's Hydra overrides, output_dir= among them")
    args = parser.parse_args(argv)
    output_dir = output_dir_of(args.overrides)
    command = ["python", "train.py", *args.overrides]
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    returncode = subprocess.run([sys.executable, "train.py", *args.overrides], cwd=REPO_ROOT).returncode
    if returncode != 0:
        sys.stderr.write(f"evaluation.run_record: {' '.join(command)} exited with {returncode}; nothing recorded\n")
        return returncode
    wall = round(time.monotonic() - started, 1)
    measured = provenance(command)
    metrics_path = output_dir / "metrics.jsonl"
    record = {
        **measured,
        "load_average_1min": [round(load_before, 2), measured["load_average_1min"]],
        "wall_seconds": wall,
        **evaluation_record(read_json_lines(metrics_path), metrics_path),
    }
    write_atomic(args.results, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
