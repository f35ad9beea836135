"""Training throughput on CPU: this project's Trainer against TRL's `SFTTrainer`, same model, data and settings
(issue 17, item 3).

Model: a Qwen2 (`embedded.families`, random init, built locally) with Qwen2.5's vocabulary of 151,936 entries and
a tied head, hidden 256, 4 layers (4 heads, 2 KV heads), MLP 1024: 43M parameters, 39M of them the embedding, so
the LM head and its loss are most of the work, as in a small model of a real family.

Data: synthetic samples of token ids drawn uniformly from the whole vocabulary, built here rather than tokenized:
the bundled tokenizer has 320 entries, and a tokenizer's ids only pick embedding rows, while every logit row spans
the whole vocabulary either way. Lengths follow a chat-like skew (80% of 32-96 tokens, 20% of 160-320), the first
third of each sample is prompt (label -100), the rest is trained. One `datasets.Dataset` of `input_ids`,
`attention_mask` and `labels` feeds both sides; TRL keeps a given `labels` column as it is. The bundled tokenizer
only gives the pad token.

Both sides: the same float32 random init (seed 0), `per_device_train_batch_size` samples a step in the Trainer's
seeded random order (the same order on both: both are `transformers.Trainer`s with the same seed and dataset), one
pass over the data, AdamW at a constant learning rate of 1e-4, no gradient accumulation, no checkpoint saving,
logging every step, torch's default threads. Rows:

- precision: `fp32`, or `bf16+ckpt`: `bf16=True` (autocast; float32 master weights) and activation checkpointing
  (`gradient_checkpointing=True`, non-reentrant) on both sides.
- layout: `padded` (the padding collators: `DataCollatorForSeq2Seq` in train.py, TRL's own) or `packed`
  (padding-free, one row per micro-batch with position ids restarting per sample: `data.packing=true`, TRL's
  `padding_free=True`).
- loss: `dft` (the project's fused DFT, `loss.type=dft`; TRL `loss_type="dft"`), `ce` (the project's cross-entropy
  on full logits, `loss.type=ce loss.implementation=reference`; TRL `loss_type="nll"`), and `fused ce`: the project's
  `loss.type=ce` on its default fused head, cross-entropy without full logits (rows measured before 2026-12-06 ran
  it as `loss.type=dft loss.alpha=0`, the same computation: every weight 1), so that DFT and CE can be compared
  without also comparing a full-logits head with a fused one. TRL has no full-logits path in its SFTTrainer: both its
  losses go through its chunked log-prob head (`add_fused_lm_head`), which on CPU (no Triton) scores every position,
  padding and prompt included.

The project side is train.py's `SFTTrainer` (`trainer.sft_trainer`: `DFTTrainer` with the run's mixins), built
with the collators and loss config `fine_tune` gives it; TRL's side is `trl.SFTTrainer` with an `SFTConfig` of
the same settings.

Measures, each row in a fresh Python process: tokens/s = the samples' real (non-padding) tokens, all of which one
pass trains on, over the wall time of `trainer.train()` read by this script's clock (`time.perf_counter` around the
call: data loading, every optimizer step and the first step's warm-up included, on both sides alike); peak RSS of
the whole process (`VmHWM`: imports, model, optimizer state and training) and the peak during `train()` over the RSS
just before it; and the logged loss of every step.

Run: `.venv/bin/python -m bench.train_throughput` (about 15-25 minutes on 2 cores; needs the `bench` extra) prints
the table, appends the run (with its date, commit and load) to the runs kept in `bench/results/train_throughput.json`
(`bench.runs`) and rewrites the section of `docs/benchmarks.md` from all of them: each goal is judged on the median
of the runs, the worst beside it. Project and TRL rows alternate, so load from other jobs falls on both. `--smoke`
runs every row at a tiny size for 2 steps, all in one child process, and writes nothing unless `--json` names a
file (tests/bench/test_train_throughput.py); it keeps no run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.docs import replace_docs_section
from bench.loss_head import peak_rss_bytes, reset_peak_rss, rss_bytes
from bench.runs import AT_LEAST, AT_MOST, append_run, load_range, verdict
from core.provenance import provenance

if TYPE_CHECKING:
    from embedded.families import FamilySize

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "train_throughput.json"
SECTION_HEADING = "## Training throughput: project vs TRL (CPU)"
MIB = 2**20
RESULT_PREFIX = "train_throughput row: "  # the Trainers print their logs to stdout too
SEED = 0
LEARNING_RATE = 1e-4
PROJECT, TRL = "project", "TRL"
DFT, CE, FUSED_CE = "dft", "ce", "fused ce"
PRECISIONS = {"fp32": (False, False), "bf16+ckpt": (True, True)}  # (bf16 autocast, activation checkpointing)
LAYOUTS = ("padded", "packed")
# Per cell, project and TRL alternate, each loss next to its TRL counterpart.
ARMS = ((PROJECT, DFT), (TRL, DFT), (PROJECT, CE), (TRL, CE), (PROJECT, FUSED_CE))
# The goals of issue 17 item 3, for each project row against the TRL row of the same loss.
GOAL_SPEEDUP, GOAL_RSS = 3.0, 0.6
# Which TRL row a project loss is compared with.
TRL_COUNTERPART = {DFT: DFT, CE: CE, FUSED_CE: CE}


@dataclass(frozen=True)
class Scale:
    """The model's and the data's sizes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    steps: int
    batch_size: int
    short_lengths: tuple[int, int]
    long_lengths: tuple[int, int]
    long_share: float = 0.2


FULL = Scale(151936, 256, 1024, 4, steps=8, batch_size=8, short_lengths=(32, 96), long_lengths=(160, 320))
SMOKE = Scale(512, 32, 64, 2, steps=2, batch_size=2, short_lengths=(4, 8), long_lengths=(12, 16))


def random_sample(
    generator: Any, vocab_size: int, short_lengths: tuple[int, int], long_lengths: tuple[int, int], long_share: float
) -> dict[str, list[int]]:
    """One sample: uniform token ids, a length from `long_lengths` with probability `long_share` (else
    `short_lengths`), the first third prompt (label -100)."""
    import torch

    from core.keys import IGNORE_INDEX

    low, high = long_lengths if torch.rand((), generator=generator) < long_share else short_lengths
    length = int(torch.randint(low, high + 1, (), generator=generator))
    input_ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
    prompt = length // 3
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * length,
        "labels": [IGNORE_INDEX] * prompt + input_ids[prompt:],
    }


def samples(scale: Scale) -> list[dict[str, list[int]]]:
    """`steps * batch_size` samples (`random_sample`), seeded."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return [
        random_sample(generator, scale.vocab_size, scale.short_lengths, scale.long_lengths, scale.long_share)
        for _ in range(scale.steps * scale.batch_size)
    ]


def qwen2_model(
    size: FamilySize, attn_implementation: str = "sdpa", rope_theta: float | None = None, device: str = "cpu"
) -> Any:
    """A float32 Qwen2 of `size`, random init (seed `SEED`), built on `device`
    (initialising on the GPU takes seconds where a 1.5B model takes minutes on a few CPU cores)."""
    import torch

    from embedded.families import family_config, random_init

    config = family_config("qwen2", size)
    config._attn_implementation = attn_implementation
    if rope_theta is not None:
        config.rope_parameters = {**config.rope_parameters, "rope_theta": rope_theta}
    with torch.device(device):
        return random_init(config, SEED)


def build_model(scale: Scale) -> Any:
    from embedded.families import FamilySize

    size = FamilySize(
        vocab_size=scale.vocab_size,
        hidden_size=scale.hidden_size,
        intermediate_size=scale.intermediate_size,
        num_hidden_layers=scale.num_hidden_layers,
        max_position_embeddings=1024,
    )
    return qwen2_model(size)


def training_settings(
    steps: int, batch_size: int, precision: str, output_dir: str, use_cpu: bool = True
) -> dict[str, Any]:
    """The `TrainingArguments` fields both sides set alike (TRL's `SFTConfig` takes them too)."""
    bf16, checkpointing = PRECISIONS[precision]
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": use_cpu,
        "seed": SEED,
        "bf16": bf16,
        "gradient_checkpointing": checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def project_trainer(
    spec: dict,
    settings: dict[str, Any],
    model: Any,
    dataset: Any,
    tokenizer: Any,
    train_batch_sampler: Any = None,
) -> Any:
    """train.py's `SFTTrainer` with the collator and loss config `fine_tune` would give it for these settings
    (`train_batch_sampler`: `data.packing_max_tokens`'s `TokenBudgetBatchSampler`, as `fine_tune` passes it)."""
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from config.schema import LossConfig
    from core.keys import IGNORE_INDEX
    from data_pipeline.collate import SampleIdCollator
    from data_pipeline.packing import PaddingFreeCollator
    from trainer.sft_trainer import SFTTrainer

    loss = {
        DFT: LossConfig(type="dft", alpha=1.0),  # the paper's DFT, as TRL's loss_type="dft"
        CE: LossConfig(type="ce", implementation="reference"),
        FUSED_CE: LossConfig(type="ce"),
    }[spec["loss"]]
    collator = (
        PaddingFreeCollator()
        if spec["layout"] == "packed"
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    )
    return SFTTrainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=SampleIdCollator(collator),
        loss=loss,
        train_batch_sampler=train_batch_sampler,
    )


def trl_trainer(
    spec: dict, settings: dict[str, Any], model: Any, dataset: Any, tokenizer: Any, **config_fields: Any
) -> Any:
    """TRL's `SFTTrainer` with the same settings; `config_fields` are further `SFTConfig` fields."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **settings,
        loss_type="dft" if spec["loss"] == DFT else "nll",
        padding_free=spec["layout"] == "packed",
        max_length=None,  # the samples are shorter than any limit; padding_free without packing refuses one
        **config_fields,
    )
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def loss_recorder(losses: list[float]) -> Any:
    """A `TrainerCallback` that appends each logged training loss to `losses`."""
    from transformers import TrainerCallback

    class LossRecorder(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return LossRecorder()


def measure_row(spec: dict, scale: Scale) -> dict:
    """One row, in this process: build, train one pass, and read the clock, the RSS and the logged losses."""
    import datasets
    import torch
    from transformers import AutoTokenizer

    from embedded.paths import TOKENIZER_DIR

    datasets.disable_progress_bars()
    rows = samples(scale)
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    losses: list[float] = []
    model = build_model(scale)
    with tempfile.TemporaryDirectory() as output_dir:
        build = project_trainer if spec["side"] == PROJECT else trl_trainer
        settings = training_settings(scale.steps, scale.batch_size, spec["precision"], output_dir)
        trainer = build(spec, settings, model, dataset, tokenizer)
        trainer.add_callback(loss_recorder(losses))
        peak_reset = reset_peak_rss()
        before_train = rss_bytes()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        train_peak = peak_rss_bytes() - before_train if peak_reset else None
    tokens = sum(len(row["input_ids"]) for row in rows)
    trained = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)
    return {
        **spec,
        "tokens": tokens,
        "trained_tokens": trained,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "train_peak_over_start_mib": None if train_peak is None else train_peak / MIB,
        "losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
    }


def run_children(specs: list[dict], smoke: bool, module: str = "bench.train_throughput") -> list[dict]:
    """`specs` measured in one fresh process of `module --child` (a JSON line each on its stdout)."""
    command = [sys.executable, "-m", module, "--child", json.dumps({"specs": specs, "smoke": smoke})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{specs} failed:\n{completed.stderr[-4000:]}")
    results = [
        json.loads(line[len(RESULT_PREFIX) :])
        for line in completed.stdout.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]
    return [{**row, "load_average_1min": [load_before, os.getloadavg()[0]]} for row in results]


def all_specs() -> list[dict]:
    return [
        {"precision": precision, "layout": layout, "side": side, "loss": loss}
        for precision in PRECISIONS
        for layout in LAYOUTS
        for side, loss in ARMS
    ]


def first_loss_bound(precision: str, vocab_size: int) -> float:
    """Relative bound on the first-step loss difference between the two sides: the same model, data and loss in
    float32 differ only by summation order, `4 * eps * sqrt(vocab)` over the log-softmax; under bf16 autocast TRL's
    head multiplies in bf16 and ours in float32 (autocast off in the fused loss), so the logits differ by about one
    bf16 rounding (eps 2**-8), and the losses by that order."""
    eps = 2.0**-23 if precision == "fp32" else 2.0**-8
    return 4 * eps * (math.sqrt(vocab_size) if precision == "fp32" else 1.0)


def comparisons(rows: list[dict]) -> list[dict]:
    """Each project row against the TRL row of the same precision, layout and loss (CE for the fused CE)."""
    by_key = {(r["precision"], r["layout"], r["side"], r["loss"]): r for r in rows}
    out = []
    for row in rows:
        if row["side"] != PROJECT:
            continue
        trl = by_key.get((row["precision"], row["layout"], TRL, TRL_COUNTERPART[row["loss"]]))
        if trl is None:
            continue
        first, trl_first = row["losses"][0], trl["losses"][0]
        out.append(
            {
                "precision": row["precision"],
                "layout": row["layout"],
                "loss": row["loss"],
                "speedup": row["tokens_per_s"] / trl["tokens_per_s"],
                "rss_ratio": row["peak_rss_mib"] / trl["peak_rss_mib"],
                "first_loss_relative_difference": abs(first - trl_first) / abs(trl_first),
                # fused CE against TRL's CE: the same loss value; the full-logits CE too.
                "first_loss_bound": first_loss_bound(row["precision"], row["vocab_size"]),
            }
        )
    return out


def format_table(rows: list[dict]) -> str:
    lines = [
        "| precision | layout | loss | side | tokens/s | train() s | peak RSS MiB | peak in train() over start MiB "
        "| first loss | last loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        train_peak = row["train_peak_over_start_mib"]
        lines.append(
            f"| {row['precision']} | {row['layout']} | {row['loss']} | {row['side']} | {row['tokens_per_s']:,.0f} "
            f"| {row['seconds']:.1f} | {row['peak_rss_mib']:,.0f} "
            f"| {'-' if train_peak is None else f'{train_peak:,.0f}'} | {row['losses'][0]:.6g} "
            f"| {row['losses'][-1]:.6g} |"
        )
    return "\n".join(lines)


def goal_key(compared: dict) -> tuple[str, str, str]:
    return compared["precision"], compared["layout"], compared["loss"]


def format_goals(runs: list[dict]) -> str:
    """Each comparison's goals over the kept runs: the median of the runs, the worst beside it; the first-loss check
    on the largest difference any run gave."""
    lines = [
        f"| precision | layout | project loss vs TRL | tokens/s ratio (goal >= {GOAL_SPEEDUP:g}) "
        f"| peak RSS ratio (goal <= {GOAL_RSS:g}) | first loss, relative difference (bound) |",
        "|---|---|---|---:|---:|---:|",
    ]
    keys = list(dict.fromkeys(goal_key(c) for run in runs for c in run["comparisons"]))
    for key in keys:
        kept = [c for run in runs for c in run["comparisons"] if goal_key(c) == key]
        precision, layout, loss = key
        speed = verdict([c["speedup"] for c in kept], GOAL_SPEEDUP, AT_LEAST).text()
        rss = verdict([c["rss_ratio"] for c in kept], GOAL_RSS, AT_MOST).text()
        worst = max(kept, key=lambda c: c["first_loss_relative_difference"] / c["first_loss_bound"])
        difference, bound = worst["first_loss_relative_difference"], worst["first_loss_bound"]
        first = f"{difference:.1e} ({bound:.0e}) {'same' if difference <= bound else 'DIFFERENT'}"
        lines.append(f"| {precision} | {layout} | {loss} vs {TRL_COUNTERPART[loss]} | {speed} | {rss} | {first} |")
    return "\n".join(lines)


def format_runs(runs: list[dict]) -> str:
    lines = ["| run | date | commit | versions | 1-min load around its rows |", "|---:|---|---|---|---|"]
    for number, run in enumerate(runs, 1):
        lines.append(
            f"| {number} | {run['date']} | {run['commit'] or 'not recorded'} | {run['versions']} "
            f"| {load_range(run['rows'])} |"
        )
    return "\n".join(lines)


def format_curves(rows: list[dict]) -> str:
    lines = ["| precision | layout | loss | side | loss at each step |", "|---|---|---|---|---|"]
    for row in rows:
        curve = ", ".join(f"{value:.5g}" for value in row["losses"])
        lines.append(f"| {row['precision']} | {row['layout']} | {row['loss']} | {row['side']} | {curve} |")
    return "\n".join(lines)


def docs_section(runs: list[dict]) -> list[str]:
    """This benchmark's section of docs/benchmarks.md, from every kept run: the goals over all of them, the rows
    and loss curves of the latest."""
    last = runs[-1]
    rows = last["rows"]
    scale = last["scale"]
    return [
        SECTION_HEADING,
        "",
        f"`{last['command']}`, {len(runs)} runs kept, on {last['machine']}, torch's default {rows[0]['threads']} "
        f"threads. Model: Qwen2, vocabulary {scale['vocab_size']:,} (tied head), hidden {scale['hidden_size']}, "
        f"{scale['num_hidden_layers']} layers, MLP {scale['intermediate_size']}, {rows[0]['parameters'] / 1e6:.1f}M "
        f"parameters, random init; {scale['steps']} steps of {scale['batch_size']} samples ({rows[0]['tokens']:,} "
        f"tokens, {rows[0]['trained_tokens']:,} trained), synthetic token ids over the whole vocabulary (see the "
        "script's docstring for why, and for every setting both sides share). Each row ran in a fresh process, "
        "project and TRL rows alternating. tokens/s: the samples' real tokens over the wall time of "
        "`trainer.train()` on the script's clock; peak RSS: the process's `VmHWM` (imports, model, optimizer and "
        "training). Raw numbers and loss curves of every run: `bench/results/train_throughput.json`.",
        "",
        format_runs(runs),
        "",
        f"1-minute load average {load_range([r for run in runs for r in run['rows']])} on {last['cpus']} cores "
        "around the rows: about 2 is this benchmark alone; above that other jobs ran, and tokens/s can be off by "
        "tens of percent (alternating the sides spreads such load over both). Memory does not depend on load.",
        "",
        "The `ce` rows are cross-entropy on full logits (`loss.type=ce loss.implementation=reference`; until "
        "2026-12-06 `loss.type=ce` itself, the stock Trainer's loss), so they build the `[tokens, vocab]` logits and "
        "miss the goals; the fused CE rows (now the default `loss.type=ce`; rows measured before 2026-12-06 ran it as "
        "`loss.type=dft loss.alpha=0`, the same computation with every weight 1) are the same loss through the fused "
        "head, the comparison to make against DFT.",
        "",
        f"Issue 17's goals over the {len(runs)} runs, each project row against TRL's row of the same precision, "
        "layout and loss (the fused CE and the full-logits CE both against TRL's `nll`): a goal is judged on the "
        "median of the runs, the worst run beside it; the first-loss check on the largest difference of any run.",
        "",
        format_goals(runs),
        "",
        f"The rows of the latest run ({last['date']}, run {len(runs)}):",
        "",
        format_table(rows),
        "",
        "Its loss curves (the logged loss of each step):",
        "",
        format_curves(rows),
        "",
    ]


def write_docs_section(record: dict) -> None:
    """Rewrite this benchmark's section of docs/benchmarks.md from a results file's record (`{"runs": [...]}`)."""
    replace_docs_section(docs_section(record["runs"]))


def versions() -> str:
    import torch
    import transformers
    import trl

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        + (f"TRL {trl.__version__}")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps, one child; writes only --json")
    parser.add_argument(
        "--json", type=Path, help="the results file to append the run to (default: bench/results/; smoke: its output)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        scale = SMOKE if job["smoke"] else FULL
        for spec in job["specs"]:
            print(RESULT_PREFIX + json.dumps({**measure_row(spec, scale), **dataclasses.asdict(scale)}), flush=True)
        return

    scale = SMOKE if args.smoke else FULL
    specs = all_specs()
    if args.smoke:
        rows = run_children(specs, smoke=True)
    else:
        rows = []
        for spec in specs:
            rows += run_children([spec], smoke=False)
            row = rows[-1]
            print(
                f"{spec}: {row['tokens_per_s']:,.0f} tokens/s, {row['peak_rss_mib']:,.0f} MiB, "
                f"losses {row['losses'][0]:.6g} -> {row['losses'][-1]:.6g}",
                file=sys.stderr,
                flush=True,
            )
    compared = comparisons(rows)
    print(format_table(rows))
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    command = ["python", "-m", "bench.train_throughput", *(["--smoke"] if args.smoke else [])]
    result = {
        **provenance(command),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} cores, {memory_gib:.0f} GiB",
        "versions": versions(),
        "scale": dataclasses.asdict(scale),
        "rows": rows,
        "comparisons": compared,
    }
    if args.smoke:  # a smoke run's numbers mean nothing: its JSON only, no kept run, no docs
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
    runs = append_run(args.json or RESULTS_PATH, result)
    print(format_goals(runs))
    replace_docs_section(docs_section(runs))


def save_result(
    result: dict, json_path: Path | None, smoke: bool, results_path: Path, write_docs: Callable[[dict], None]
) -> None:
    """The JSON to `json_path` (else, outside smoke mode, to `results_path`), and the docs section outside smoke
    mode: a smoke run's numbers mean nothing."""
    path = json_path or (None if smoke else results_path)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    if not smoke:
        write_docs(result)


if __name__ == "__main__":
    main()
