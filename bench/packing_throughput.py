"""Tokens per second of one training micro-batch, padded vs padding-free packed, on a length-skewed mix (CPU).

The same micro-batches of samples go through `DFTTrainer.compute_loss` (fused DFT loss) and backward, once padded
to the longest sample (`DataCollatorForSeq2Seq`, the default collator of train.py) and once packed into one row
(`data_pipeline.packing.PaddingFreeCollator`, `data.packing=true`). The mix is skewed as chat SFT data is: most
samples short, a few long, so a padded micro-batch is mostly padding. Throughput counts real (non-padding) tokens
only; the padding share is reported beside it.

Which samples share a micro-batch is measured on its own, from lengths alone, over many more samples of the same
mix (`--budget-samples`): fixed-count micro-batches (`per_device_train_batch_size` samples, packed) against
`TokenBudgetBatchSampler` (`data.packing_max_tokens`). A fixed-count packed row has no padding token, but its length
varies with the draw, and memory must be sized for the longest: the table reports the share of that worst-case
row left unused on average, beside the token budget's unused share, and the spread of row lengths.

Model: a Qwen2 of hidden 128, 4 layers, vocab 2048, sdpa, float32, one thread (2 shared cores).

Run from the repo root: `.venv/bin/python -m bench.packing_throughput` (about a minute). Prints two tables, appends
the run (with its date, commit and load) to the runs kept in `bench/results/packing_throughput.json` (`bench.runs`)
and rewrites the docs section from all of them: the speedup goal is judged on their median, the worst beside it.
`--docs-from-results` rewrites the section from the file alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
    TrainingArguments,
)

from bench.docs import replace_docs_section
from bench.runs import AT_LEAST, append_run, load_range, load_runs, verdict
from core.keys import IGNORE_INDEX
from core.provenance import provenance
from data_pipeline.packing import PaddingFreeCollator, TokenBudgetBatchSampler
from dft.trainer import DFTTrainer
from embedded.families import FamilySize, family_model

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "packing_throughput.json"
SECTION_HEADING = "## Padding-free packing vs padding (CPU)"
VOCAB, SEED = 2048, 0
GOAL_SPEEDUP = 1.5
"""Packed real tokens/s over padded, on this mix (issue 3)."""


def tiny_model() -> Qwen2ForCausalLM:
    size = FamilySize(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, max_position_embeddings=1024
    )
    return family_model("qwen2", size, SEED, attn_implementation="sdpa")


def skewed_samples(count: int, generator: torch.Generator) -> list[dict[str, list[int]]]:
    """80% of samples 16-64 tokens, 20% 256-512: the long tail sets the padded width."""
    samples = []
    for _ in range(count):
        long = torch.rand((), generator=generator) < 0.2
        low, high = (256, 512) if long else (16, 64)
        length = int(torch.randint(low, high + 1, (), generator=generator))
        input_ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        prompt = length // 3
        labels = [IGNORE_INDEX] * prompt + input_ids[prompt:]
        samples.append({"input_ids": input_ids, "attention_mask": [1] * length, "labels": labels})
    return samples


def micro_batch_shapes(lengths: list[int], batch_size: int, max_tokens: int, seed: int) -> list[dict]:
    """Tokens per micro-batch of fixed-count packing (random order, as the Trainer draws) and of the token budget."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    fixed = [sum(lengths[i] for i in order[start : start + batch_size]) for start in range(0, len(order), batch_size)]
    budget = [sum(lengths[i] for i in b) for b in TokenBudgetBatchSampler(lengths, max_tokens, seed)]
    rows = []
    for strategy, rows_tokens, reserved in (
        (f"fixed count ({batch_size} samples)", fixed, max(fixed)),
        (f"token budget ({max_tokens} tokens)", budget, max_tokens),
    ):
        mean = statistics.fmean(rows_tokens)
        rows.append(
            {
                "strategy": strategy,
                "micro_batches": len(rows_tokens),
                "min_tokens": min(rows_tokens),
                "mean_tokens": mean,
                "max_tokens": max(rows_tokens),
                "cv": statistics.pstdev(rows_tokens) / mean,
                "reserved_tokens": reserved,
                "unused_share": 1 - sum(rows_tokens) / (len(rows_tokens) * reserved),
            }
        )
    return rows


def padding_collator() -> DataCollatorForSeq2Seq:
    """train.py's collator; it only calls the tokenizer's `pad`, so a one-word tokenizer is enough."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")))
    tokenizer.pad_token = "<pad>"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def time_layout(trainer: DFTTrainer, model: torch.nn.Module, batches: list[dict], repeats: int) -> float:
    """Median seconds for forward+backward of all `batches`."""
    runs = []
    for _ in range(repeats + 1):  # the first pass warms up allocator and kernels
        start = time.perf_counter()
        for batch in batches:
            num_items = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
            trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items).backward()
            model.zero_grad(set_to_none=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs[1:])


def format_runs(runs: list[dict]) -> str:
    lines = [
        "| date | commit | 1-min load (before, after) | padded s | packed s | padded real tokens/s "
        "| packed real tokens/s | speedup |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        padded, packed = run["rows"]
        load = run.get("load_average_1min")
        load_text = "not recorded" if load is None else ", ".join(f"{x:.1f}" for x in load)
        lines.append(
            f"| {run['date']} | {run.get('commit') or 'not recorded'} | {load_text} | {padded['seconds']:.2f} "
            f"| {packed['seconds']:.2f} | {padded['real_tokens_per_second']:,.0f} "
            f"| {packed['real_tokens_per_second']:,.0f} | {run['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def format_slots(run: dict) -> str:
    lines = ["| layout | token slots | padding share |", "|---|---:|---:|"]
    lines += [f"| {r['layout']} | {r['token_slots']:,} | {r['padding_share']:.1%} |" for r in run["rows"]]
    return "\n".join(lines)


def format_shapes(shapes: list[dict]) -> str:
    lines = [
        "| strategy | micro-batches | tokens per micro-batch (min / mean / max) | CV | unused share of the "
        "reserved row |",
        "|---|---:|---|---:|---:|",
    ]
    lines += [
        f"| {r['strategy']} | {r['micro_batches']:,} | {r['min_tokens']:,} / {r['mean_tokens']:,.0f} / "
        f"{r['max_tokens']:,} | {r['cv']:.2f} | {r['unused_share']:.2%} of {r['reserved_tokens']:,} |"
        for r in shapes
    ]
    return "\n".join(lines)


def load_sentence(runs: list[dict]) -> str:
    """The load the runs recorded, and which runs recorded none (those migrated from before runs were kept)."""
    recorded = [run for run in runs if run.get("load_average_1min") is not None]
    unrecorded = [run["date"] for run in runs if run.get("load_average_1min") is None]
    cores = "/".join(str(c) for c in sorted({run["cpus"] for run in recorded if run.get("cpus")}))
    text = f"1-minute load average {load_range(recorded)} on {cores} cores around the runs" if recorded else ""
    if unrecorded:
        runs_of = f"{len(unrecorded)} run{'s' * (len(unrecorded) > 1)} ({', '.join(sorted(set(unrecorded)))})"
        text += f"; no load recorded for the {runs_of}" if text else f"No load recorded for the {runs_of}"
    return text


def docs_section(runs: list[dict]) -> list[str]:
    """This benchmark's section of docs/benchmarks.md, from every kept run."""
    last = runs[-1]
    shaped = next(run for run in reversed(runs) if "micro_batch_shapes" in run)
    speedup = verdict([run["speedup"] for run in runs], GOAL_SPEEDUP, AT_LEAST)
    return [
        SECTION_HEADING,
        "",
        f"`python -m bench.packing_throughput`, {len(runs)} runs kept (raw numbers of each: "
        "`bench/results/packing_throughput.json`): "
        f"{last['micro_batches']} micro-batches of {last['batch_size']} samples with a length-skewed mix "
        f"({last['real_tokens']:,} real tokens), tiny Qwen2, one CPU thread, forward and backward, sdpa; each "
        "time is the median of the run's passes. The goal is judged on the median of the runs, with the worst "
        "beside it.",
        load_sentence(runs)
        + ". This benchmark takes one core: a load above 1 means other jobs ran beside it, and its times are "
        "slow and noisy; the token counts do not depend on load.",
        "On CPU, sdpa applies a full per-row mask, which limits the gain; FlashAttention-2's variable-length path on "
        "a GPU is where packing pays most (not measured here).",
        "",
        format_runs(runs),
        "",
        format_slots(last),
        "",
        f"Speedup, packed over padded real tokens/s (goal >= {GOAL_SPEEDUP:g}x): {speedup.text()}.",
        "",
        f"Which samples share a packed micro-batch, over {shaped['budget_samples']:,} samples of the same mix "
        f"(lengths only, no model; the run of {shaped['date']}): fixed-count micro-batches "
        f"(`per_device_train_batch_size={shaped['batch_size']}`, random order, as the Trainer draws them) against "
        f"`data.packing_max_tokens={shaped['micro_batch_shapes'][1]['reserved_tokens']}` (`TokenBudgetBatchSampler`, "
        "best-fit decreasing). A packed fixed-count row holds no padding token, but its length follows the draw and "
        "memory must be sized for the longest row; the last column is the share of that reserved row (the budget, "
        "for the token budget) left unused on average.",
        "",
        format_shapes(shaped["micro_batch_shapes"]),
        "",
    ]


def write_docs_section(record: dict) -> None:
    """Rewrite this benchmark's section of docs/benchmarks.md from a results file's record (`{"runs": [...]}`)."""
    replace_docs_section(docs_section(record["runs"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-samples", type=int, default=20000, help="samples for the micro-batch shapes")
    parser.add_argument("--max-tokens", type=int, default=4096, help="data.packing_max_tokens for the shapes")
    parser.add_argument(
        "--docs-from-results", action="store_true", help="rewrite the docs section from the kept runs, run nothing"
    )
    args = parser.parse_args()
    if args.docs_from_results:
        replace_docs_section(docs_section(load_runs(RESULTS_PATH)))
        return
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(SEED)
    groups = [skewed_samples(args.batch_size, generator) for _ in range(args.micro_batches)]
    real_tokens = sum(len(s["input_ids"]) for group in groups for s in group)

    model = tiny_model().train()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no")
        trainer = DFTTrainer(model=model, args=training_args)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, not run here
        rows = []
        for layout, collator in (("padded", padding_collator()), ("packed", PaddingFreeCollator())):
            batches = [collator(group) for group in groups]
            slots = sum(b["input_ids"].numel() for b in batches)
            seconds = time_layout(trainer, model, batches, args.repeats)
            rows.append(
                {
                    "layout": layout,
                    "token_slots": slots,
                    "padding_share": 1 - real_tokens / slots,
                    "seconds": seconds,
                    "real_tokens_per_second": real_tokens / seconds,
                }
            )
    speedup = rows[1]["real_tokens_per_second"] / rows[0]["real_tokens_per_second"]
    header = "| layout | token slots | padding | seconds | real tokens/s |\n|---|---|---|---|---|"
    lines = [
        f"| {r['layout']} | {r['token_slots']} | {r['padding_share']:.1%} | {r['seconds']:.2f} | "
        f"{r['real_tokens_per_second']:.0f} |"
        for r in rows
    ]
    print("\n".join([header, *lines, f"\npacked / padded: {speedup:.2f}x ({real_tokens} real tokens)"]))

    mix = skewed_samples(args.budget_samples, torch.Generator().manual_seed(SEED + 1))
    shapes = micro_batch_shapes([len(s["input_ids"]) for s in mix], args.batch_size, args.max_tokens, SEED)
    print(
        "\n| strategy | micro-batches | tokens per micro-batch (min / mean / max) | CV | unused share of the "
        "reserved row |\n|---|---|---|---|---|"
    )
    for r in shapes:
        print(
            f"| {r['strategy']} | {r['micro_batches']} | {r['min_tokens']} / {r['mean_tokens']:.0f} / "
            f"{r['max_tokens']} | {r['cv']:.2f} | {r['unused_share']:.2%} of {r['reserved_tokens']} |"
        )
    measured = provenance(["python", "-m", "bench.packing_throughput"])
    run = {
        **measured,
        "load_average_1min": [round(load_before, 2), measured["load_average_1min"]],
        "device": "cpu, 1 thread",
        "micro_batches": args.micro_batches,
        "batch_size": args.batch_size,
        "real_tokens": real_tokens,
        "rows": rows,
        "speedup": speedup,
        "budget_samples": args.budget_samples,
        "micro_batch_shapes": shapes,
    }
    replace_docs_section(docs_section(append_run(RESULTS_PATH, run)))


if __name__ == "__main__":
    main()
