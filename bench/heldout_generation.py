"""The held-out before/after table's time: one prompt at a time against left-padded batches, on a released model.

`embedded:smollm2-135m` (SmolLM2-135M-Instruct, float32, sdpa), the 60 held-out prompts of the addition demo
(data/addition/heldout.jsonl), 12 new tokens at most, greedy: what `python train.py experiment=smollm2_addition`
runs twice (before and after training). Each row is one whole held-out pass (`evaluate_heldout`: generation and
the reference replies' NLL) at a batch size; batch 1 is how the pass ran before batching (one `generate` and one
forward per prompt). The rows alternate over the repeats so load from other jobs falls on all of them, and the
table gives each row's fastest and median pass with the 1-minute load average around it. Every row must give the
same replies as batch 1 (counted in the table) and the same NLL within float32 rounding.

Run from the repo root: `.venv/bin/python -m bench.heldout_generation [--repeats 3]`. Prints the table, writes
`bench/results/heldout_generation.json` and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.docs import replace_docs_section
from core.files import write_atomic
from core.provenance import provenance
from data_pipeline.tokenize import TokenizeOptions
from embedded.addition import ADDITION_DIR
from embedded.released import resolve_released_model
from evaluation.heldout import evaluate_heldout, load_heldout

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "heldout_generation.json"
BATCH_SIZES = (1, 4, 16)
MAX_NEW_TOKENS = 12
HEADING = "## Held-out table: batched generation (released model, CPU)"


def measure(repeats: int, prompts: int) -> dict:
    directory = resolve_released_model("smollm2-135m", REPO_ROOT / ".cache" / "models")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dialogues = load_heldout(ADDITION_DIR / "heldout.jsonl", prompts)
    options = TokenizeOptions(max_length=96)
    passes: dict[int, list[dict]] = {size: [] for size in BATCH_SIZES}
    for _ in range(repeats):
        for size in BATCH_SIZES:
            load_before = os.getloadavg()[0]
            result = evaluate_heldout(model, tokenizer, dialogues, MAX_NEW_TOKENS, options, size)
            passes[size].append(
                {
                    "seconds": result.seconds,
                    "load_average_1min": [load_before, os.getloadavg()[0]],
                    "replies": [g.generated for g in result.generations],
                    "nll": result.nll,
                }
            )
    reference = passes[1][0]
    rows = []
    for size in BATCH_SIZES:
        seconds = [p["seconds"] for p in passes[size]]
        rows.append(
            {
                "batch_size": size,
                "fastest_seconds": min(seconds),
                "median_seconds": statistics.median(seconds),
                "all_seconds": seconds,
                "speedup_vs_batch_1_median": statistics.median(p["seconds"] for p in passes[1])
                / statistics.median(seconds),
                "same_replies_as_batch_1": sum(
                    a == b for p in passes[size] for a, b in zip(p["replies"], reference["replies"], strict=True)
                ),
                "replies_compared": len(reference["replies"]) * len(passes[size]),
                "max_nll_difference": max(abs(p["nll"] - reference["nll"]) for p in passes[size]),
                "load_average_1min": [x for p in passes[size] for x in p["load_average_1min"]],
            }
        )
    return {
        "prompts": len(dialogues),
        "max_new_tokens": MAX_NEW_TOKENS,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def table(result: dict) -> list[str]:
    lines = [
        "| batch size | fastest pass (s) | median pass (s) | median speed-up vs batch 1 | same replies as batch 1 "
        "| max NLL difference | 1-min load |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        loads = row["load_average_1min"]
        lines.append(
            f"| {row['batch_size']} | {row['fastest_seconds']:.1f} | {row['median_seconds']:.1f} "
            f"| {row['speedup_vs_batch_1_median']:.2f}x | {row['same_replies_as_batch_1']}/{row['replies_compared']} "
            f"| {row['max_nll_difference']:.1e} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return lines


def docs_section(result: dict) -> list[str]:
    return [
        HEADING,
        "",
        f"`{result['command']}` (measured {result['date']}, commit {result['commit']}, {result['cpus']} cores, "
        f"{result['threads']} threads). One held-out pass of `python train.py experiment=smollm2_addition`: "
        f"{result['prompts']} prompts, greedy, at most {result['max_new_tokens']} new tokens, generation and the "
        "reference replies' NLL, on SmolLM2-135M-Instruct in float32. Batch 1 is the pass as it ran before batching.",
        "",
        *table(result),
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heldout_generation", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=60)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    result = {**provenance(["python", "-m", "bench.heldout_generation", *argv]), **measure(args.repeats, args.prompts)}
    print("\n".join(table(result)))
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS_PATH, json.dumps(result, indent=2) + "\n")
    replace_docs_section(docs_section(result))


if __name__ == "__main__":
    main()
