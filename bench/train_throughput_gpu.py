"""Training throughput on one GPU: this project's Trainer against TRL's `SFTTrainer` on a Qwen2.5-1.5B-shaped model,
in bf16 with activation checkpointing and packed 4k-token micro-batches: tokens/s, MFU and peak memory (issue 17,
item 4). The CPU benchmark of item 3 is `bench/train_throughput.py`; this module reuses its model builder, samples,
trainers and child-process runner.

Model: a Qwen2 built here with random init (seed 0) in Qwen2.5-1.5B's shape: hidden 1536, 28 layers, 12 attention
heads and 2 KV heads (head dim 128), MLP 8960, vocabulary 151,936, tied embeddings, biases on q/k/v, rope theta 1e6,
1.54B parameters (1.31B without the embedding). The weights are float32 and `bf16=True` runs the forward under bf16
autocast: the Trainer's own mixed precision, which is what train.py does on one GPU without DeepSpeed
(`modeling.loading.choose_dtype` loads bf16 weights only under DeepSpeed, whose optimizer keeps a float32 master
copy; without one, AdamW updates on bf16 weights would round away). TRL gets the same float32 model. Activation
checkpointing is on (non-reentrant) on both sides. Attention: `flash_attention_2` when `flash_attn` imports and the
GPU is Ampere or newer, else `sdpa`; each row records which.

Data: synthetic token ids over the whole vocabulary (why: `bench/train_throughput.py`), a chat-like length mix (80%
of 64-1024 tokens, 20% of 1024-4096), the first third of each sample prompt (label -100), enough samples for
`steps + 2` micro-batches. The micro-batches are the project's packing path, `data.packing=true` with
`data.packing_max_tokens=4096`: `TokenBudgetBatchSampler` packs the samples by best-fit decreasing into micro-batches
of at most 4096 tokens, and `PaddingFreeCollator` writes each as one row with position ids restarting per sample.
TRL trains on the very same micro-batches in the same order: each is given as one pre-packed row with its
`seq_lengths` (what TRL's own `packing=True` produces), one row per step (`train_sampling_strategy="sequential"`),
through its padding-free collator (`padding_free=True`), which restarts the position ids per sample and masks each
sample's first label as ours does. So both sides see the same tokens at every step, and the first losses must agree.

Rows, each in a fresh Python process: the project's fused DFT (`loss.type=dft`) and fused CE (`loss.alpha=0`); TRL's
`loss_type="dft"` and `"nll"`, each also with `use_liger_kernel=True` (Liger's RMSNorm, RoPE and SwiGLU kernels;
TRL keeps its own fused LM head, so Liger's fused linear cross-entropy is off) when `liger_kernel` imports, and
recorded as skipped otherwise. A row whose side misses a module is recorded as skipped with the module's name.

Measures:
- tokens/s: the tokens of steps `warmup_steps + 1 .. steps` over the time between the end of step `warmup_steps`
  and the end of the last step, read by `time.perf_counter` after `torch.cuda.synchronize()` in a `TrainerCallback`
  (`on_step_end`, after the optimizer step). The first steps (allocator growth, kernel selection) are excluded.
- MFU: model FLOPs per token x tokens/s / the GPU's peak dense bf16 FLOP/s, both from `observability/flops.py`,
  which the Trainer's logged `mfu` uses too: `6 N_trainable + 4 N_frozen + 12 L H C` per token (PaLM's appendix
  B count, frozen weights at 4N, the input embedding left out as a lookup, C the mean attended context of these
  packed samples: `sum(s_i (s_i + 1) / 2) / sum(s_i)`). Every weight trains here, so it is `6N + 12 L H C`.
  Activation checkpointing's recompute of the forward is not counted (model FLOPs, not hardware FLOPs).
- Peak memory: `torch.cuda.max_memory_allocated()` and `max_memory_reserved()` of the row's process (model,
  optimizer state, activations), and the process's peak RSS.
- The logged loss of every step.

Peak FLOP/s come from `observability.flops.PEAK_BF16_FLOPS` by the device's name and memory (H100 SXM, H200:
989.4e12; H100 PCIe: 756e12; H100 NVL, H200 NVL: 835.5e12; A100: 312e12, dense); `--peak-tflops` overrides it,
and an unknown GPU or a MIG slice without it is refused.

Run, on a machine with one CUDA GPU: `python -m bench.train_throughput_gpu` (a few minutes on an H100: six rows of
45 steps, start-up is most of each row's time) prints the table, writes `bench/results/train_throughput_gpu.json`
and the section "Training throughput on a GPU: project vs TRL" of `docs/benchmarks.md`, with the goals of issue 17:
project DFT at least 1.0x TRL+Liger's tokens/s, MFU at least 35%. `--smoke` runs every row on CPU at a tiny size
(3 steps, bf16 autocast on CPU, sdpa, a nominal peak of 1 TFLOP/s or `--peak-tflops`, so the MFU arithmetic runs),
all in one child process, and writes nothing unless `--json` names a file (tests/bench/test_train_throughput_gpu.py).
`--steps N` shortens every row and `--loss dft` keeps only the DFT rows (scripts/gpu_check.sh runs
`--steps 12 --loss dft`); a shortened run writes only `--json`, never the docs section.

GPU image: the GPU machines have Python 3.12, torch (CUDA), transformers, accelerate and peft, but no TRL, datasets,
hydra-core, omegaconf or liger-kernel, and no network. The project's rows need datasets (with pyarrow and pandas),
hydra-core (with antlr4-python3-runtime) and omegaconf, which `config.schema` imports; TRL's rows need trl and
datasets; the Liger rows need liger-kernel. `requirements-gpu-carry.txt` lists their wheels and the command that
downloads them, and `scripts/gpu_check.sh` installs them on the machine before the run. This module imports only
torch and transformers at the top; the rest is imported per row, in the row's process, and a row whose side misses
a module is recorded as skipped with the module's name while the others run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.docs import replace_docs_section
from bench.loss_head import peak_rss_bytes
from bench.train_throughput import (
    CE,
    DFT,
    FUSED_CE,
    MIB,
    PROJECT,
    RESULT_PREFIX,
    SEED,
    TRL,
    TRL_COUNTERPART,
    first_loss_bound,
    loss_recorder,
    project_trainer,
    qwen2_model,
    random_sample,
    run_children,
    save_result,
    training_settings,
    trl_trainer,
)
from embedded.families import FamilySize
from observability.flops import cuda_peak_bf16_flops, flop_parameters, mean_attended_context, model_flops_per_token

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "train_throughput_gpu.json"
SECTION_HEADING = "## Training throughput on a GPU: project vs TRL"
MODULE = "bench.train_throughput_gpu"
COMMAND = f"python -m {MODULE}"
GIB = 2**30
PRECISION, LAYOUT = "bf16+ckpt", "packed"
# (side, loss, Liger kernels): project and TRL alternate, each loss next to its TRL counterparts.
ARMS = (
    (PROJECT, DFT, False),
    (TRL, DFT, False),
    (TRL, DFT, True),
    (PROJECT, FUSED_CE, False),
    (TRL, CE, False),
    (TRL, CE, True),
)
# Issue 17 item 4: the project's DFT against TRL+Liger's tokens/s, and the project rows' MFU.
GOAL_SPEEDUP_VS_LIGER, GOAL_MFU = 1.0, 0.35
SMOKE_PEAK_TFLOPS = 1.0  # nominal, so that the MFU arithmetic runs on CPU; the MFU it gives means nothing


@dataclass(frozen=True)
class GpuScale:
    """The model's shape and the data's sizes."""

    size: FamilySize
    rope_theta: float
    max_tokens: int
    """Token budget of a micro-batch (`data.packing_max_tokens`)."""
    warmup_steps: int
    """Steps before the clock starts."""
    steps: int
    short_lengths: tuple[int, int]
    long_lengths: tuple[int, int]
    long_share: float = 0.2


QWEN25_15B = FamilySize(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)
FULL = GpuScale(QWEN25_15B, 1e6, 4096, warmup_steps=5, steps=45, short_lengths=(64, 1024), long_lengths=(1025, 4096))
SMOKE = GpuScale(
    FamilySize(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256),
    1e6,
    64,
    warmup_steps=1,
    steps=3,
    short_lengths=(4, 16),
    long_lengths=(17, 48),
)


def gpu_samples(scale: GpuScale) -> list[dict[str, list[int]]]:
    """Samples (`random_sample`, seeded) until they hold `steps + 2` micro-batches' worth of tokens."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    rows: list[dict[str, list[int]]] = []
    tokens = 0
    while tokens < (scale.steps + 2) * scale.max_tokens:
        rows.append(
            random_sample(generator, scale.size.vocab_size, scale.short_lengths, scale.long_lengths, scale.long_share)
        )
        tokens += len(rows[-1]["input_ids"])
    return rows


def attention_backend(device: str) -> str:
    """`flash_attention_2` on an Ampere or newer GPU with `flash_attn` installed, else `sdpa`."""
    import torch

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        if torch.cuda.get_device_capability() >= (8, 0):
            return "flash_attention_2"
    return "sdpa"


def step_clock(warmup_steps: int, steps: int, times: dict[int, float], synchronize: Any) -> Any:
    """A `TrainerCallback` that records, in `times`, the clock at the end of step `warmup_steps` and of step
    `steps`, after `synchronize()` (the GPU's queued work done)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (warmup_steps, steps):
                synchronize()
                times[state.global_step] = time.perf_counter()

    return StepClock()


def measure_row(spec: dict, scale: GpuScale, device: str) -> dict:
    """One row, in this process: pack, build, train `scale.steps` micro-batches, read the clock and the memory."""
    import datasets
    import torch
    from transformers import AutoTokenizer

    from data_pipeline.packing import TokenBudgetBatchSampler, sample_lengths
    from embedded.paths import TOKENIZER_DIR

    datasets.disable_progress_bars()
    samples = datasets.Dataset.from_list(gpu_samples(scale))
    lengths = sample_lengths(samples)
    sampler = TokenBudgetBatchSampler(lengths, scale.max_tokens, SEED)
    micro_batches = list(sampler)  # epoch 0's, the ones the project's loader yields
    if len(micro_batches) < scale.steps:
        raise RuntimeError(f"{len(micro_batches)} micro-batches packed, fewer than the {scale.steps} steps")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    attention = attention_backend(device)
    model = qwen2_model(scale.size, attention, scale.rope_theta, device)
    losses: list[float] = []
    times: dict[int, float] = {}
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as output_dir:
        settings = {
            **training_settings(scale.steps, 1, PRECISION, output_dir, use_cpu=device == "cpu"),
            "train_sampling_strategy": "sequential",
        }
        if spec["side"] == PROJECT:
            trainer = project_trainer(spec, settings, model, samples, tokenizer, train_batch_sampler=sampler)
        else:
            packed = datasets.Dataset.from_list([packed_row(samples, indices) for indices in micro_batches])
            trainer = trl_trainer(spec, settings, model, packed, tokenizer, use_liger_kernel=spec["liger"])
        trainer.add_callback(loss_recorder(losses))
        trainer.add_callback(step_clock(scale.warmup_steps, scale.steps, times, synchronize))
        trainer.train()
    timed = [lengths[i] for indices in micro_batches[scale.warmup_steps : scale.steps] for i in indices]
    seconds = times[scale.steps] - times[scale.warmup_steps]
    trainable, frozen = flop_parameters(model)
    context = mean_attended_context(timed)
    cuda = device == "cuda"
    return {
        **spec,
        "attn_implementation": attention,
        "timed_steps": scale.steps - scale.warmup_steps,
        "timed_tokens": sum(timed),
        "timed_samples": len(timed),
        "seconds": seconds,
        "tokens_per_s": sum(timed) / seconds,
        "trainable_flop_parameters": trainable,
        "frozen_flop_parameters": frozen,
        "mean_attended_context": context,
        "model_flops_per_token": model_flops_per_token(trainable, frozen, model.config, context),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def packed_row(samples: Any, indices: list[int]) -> dict[str, list]:
    """The samples at `indices` as one row with their lengths, the form TRL's packing gives its collator."""
    rows = [samples[i] for i in indices]
    return {
        "input_ids": [token for row in rows for token in row["input_ids"]],
        "labels": [label for row in rows for label in row["labels"]],
        "seq_lengths": [len(row["input_ids"]) for row in rows],
    }


def all_specs() -> list[dict]:
    return [
        {"precision": PRECISION, "layout": LAYOUT, "side": side, "loss": loss, "liger": liger}
        for side, loss, liger in ARMS
    ]


def skip_reason(spec: dict, device: str) -> str | None:
    if not spec["liger"]:
        return None
    if device != "cuda":
        return "liger-kernel's Triton kernels need a CUDA GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    return None


def run_row_child(spec: dict, scale: GpuScale, device: str) -> dict:
    """`measure_row`, or the row marked skipped when its side misses a module."""
    try:
        return measure_row(spec, scale, device)
    except ModuleNotFoundError as e:
        return {
            **spec,
            "skipped": f"needs the module '{e.name}', which is not installed: carry its wheel to this machine "
            "(see the docstring of bench/train_throughput_gpu.py)",
            "missing_module": e.name,
        }


def trained(row: dict) -> bool:
    """Whether the row ran: neither skipped (a missing module, no CUDA for Liger) nor failed."""
    return "skipped" not in row and "failed" not in row


def side_name(row: dict) -> str:
    return row["side"] + ("+Liger" if row["liger"] else "")


def with_mfu(rows: list[dict], peak_flops: float) -> list[dict]:
    return [
        {**row, "mfu": row["model_flops_per_token"] * row["tokens_per_s"] / peak_flops} if trained(row) else row
        for row in rows
    ]


def comparisons(rows: list[dict]) -> list[dict]:
    """Each project row against each trained TRL row (with and without Liger) of its counterpart loss."""
    out = []
    for row in rows:
        if row["side"] != PROJECT or not trained(row):
            continue
        for trl in rows:
            if trl["side"] != TRL or trl["loss"] != TRL_COUNTERPART[row["loss"]] or not trained(trl):
                continue
            first, trl_first = row["losses"][0], trl["losses"][0]
            out.append(
                {
                    "loss": row["loss"],
                    "versus": f"{side_name(trl)} {trl['loss']}",
                    "liger": trl["liger"],
                    "speedup": row["tokens_per_s"] / trl["tokens_per_s"],
                    "first_loss_relative_difference": abs(first - trl_first) / abs(trl_first),
                    "first_loss_bound": first_loss_bound(PRECISION, row["vocab_size"]),
                }
            )
    return out


def goal(met: bool) -> str:
    return "met" if met else "NOT met"


def format_table(rows: list[dict]) -> str:
    lines = [
        f"| loss | side | attention | tokens/s | MFU (goal >= {GOAL_MFU:.0%} for the project) | timed s "
        "| peak allocated GiB | peak reserved GiB | peak RSS MiB | first loss | last loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not trained(row):
            state = f"skipped: {row['skipped']}" if "skipped" in row else f"FAILED: {row['failed']}"
            lines.append(f"| {row['loss']} | {side_name(row)} | {state} |" + " - |" * 8)
            continue
        mfu = f"{row['mfu']:.1%}" + (f" {goal(row['mfu'] >= GOAL_MFU)}" if row["side"] == PROJECT else "")
        memory = [row["peak_allocated_gib"], row["peak_reserved_gib"]]
        lines.append(
            f"| {row['loss']} | {side_name(row)} | {row['attn_implementation']} | {row['tokens_per_s']:,.0f} "
            f"| {mfu} | {row['seconds']:.2f} | "
            + " | ".join("-" if value is None else f"{value:.1f}" for value in memory)
            + f" | {row['peak_rss_mib']:,.0f} | {row['losses'][0]:.6g} | {row['losses'][-1]:.6g} |"
        )
    return "\n".join(lines)


def format_goals(compared: list[dict]) -> str:
    lines = [
        f"| project loss | vs | tokens/s ratio (goal >= {GOAL_SPEEDUP_VS_LIGER:.1f} vs TRL+Liger) "
        "| first loss, relative difference (bound) |",
        "|---|---|---:|---:|",
    ]
    for c in compared:
        speed = f"{c['speedup']:.2f}x" + (f" {goal(c['speedup'] >= GOAL_SPEEDUP_VS_LIGER)}" if c["liger"] else "")
        same = "same" if c["first_loss_relative_difference"] <= c["first_loss_bound"] else "DIFFERENT"
        first = f"{c['first_loss_relative_difference']:.1e} ({c['first_loss_bound']:.0e}) {same}"
        lines.append(f"| {c['loss']} | {c['versus']} | {speed} | {first} |")
    return "\n".join(lines)


NOT_MEASURED = (
    "Not measured yet: no GPU has been lent to this work so far. On a machine with one H100 or H200 (and TRL, "
    "datasets, hydra-core and omegaconf installed; liger-kernel and flash-attn when available), run "
    "`python -m bench.train_throughput_gpu`: it trains a Qwen2.5-1.5B-shaped model in bf16 with activation "
    "checkpointing on packed micro-batches of at most 4,096 tokens, with this project's Trainer (DFT and fused CE) "
    "and with TRL's `SFTTrainer` (DFT and NLL, with and without Liger's kernels), and replaces this section with "
    "tokens/s, MFU, peak memory and issue 17's goals (project DFT >= 1.0x TRL+Liger's tokens/s, MFU >= 35%). The "
    "script's docstring defines each measure and lists the wheels a machine without network needs. `--smoke` runs "
    "every row on CPU at a tiny size (tests/bench/test_train_throughput_gpu.py)."
)


def write_docs_section(result: dict | None) -> None:
    """This benchmark's section of docs/benchmarks.md, from a GPU run; without one (`None`: no results file), what
    running it will measure."""
    if result is None:
        replace_docs_section([SECTION_HEADING, "", NOT_MEASURED, ""])
        return
    rows = result["rows"]
    first = next(row for row in rows if trained(row))
    scale = result["scale"]
    size = scale["size"]
    liger = next((c for c in result["comparisons"] if c["liger"] and c["loss"] == DFT), None)
    speed = "not measured (no TRL+Liger DFT row)"
    if liger is not None:
        speed = f"{liger['speedup']:.2f}x, {goal(liger['speedup'] >= GOAL_SPEEDUP_VS_LIGER)}"
    project_mfu = ", ".join(
        f"{row['loss']} {row['mfu']:.1%} {goal(row['mfu'] >= GOAL_MFU)}"
        for row in rows
        if row["side"] == PROJECT and trained(row)
    )
    section = [
        SECTION_HEADING,
        "",
        f"Measured {result['date']} with `{result['command']}` on {result['device']} ({result['versions']}); peak "
        f"{result['peak_flops'] / 1e12:g} TFLOP/s dense bf16 ({result['peak_flops_source']}). Model: Qwen2 in "
        f"Qwen2.5-1.5B's shape (hidden {size['hidden_size']}, {size['num_hidden_layers']} layers, "
        f"{size['num_attention_heads']} heads, {size['num_key_value_heads']} KV heads, "
        f"MLP {size['intermediate_size']}, "
        f"vocabulary {size['vocab_size']:,}, tied head), {first['parameters'] / 1e9:.2f}B parameters, random init, "
        "float32 weights under bf16 autocast, activation checkpointing. Data: micro-batches packed to at most "
        f"{scale['max_tokens']:,} tokens (`data.packing=true data.packing_max_tokens={scale['max_tokens']}`), the same "
        f"ones in the same order on both sides; {scale['steps']} steps, the clock running over the last "
        f"{first['timed_steps']} ({first['timed_tokens']:,} tokens, {first['timed_samples']} samples, mean "
        f"attended context {first['mean_attended_context']:.0f} tokens). Each row ran in a fresh process. "
        "tokens/s, MFU (model FLOPs `6 N_trainable + 4 N_frozen + 12 L H C` per token, `observability/flops.py`, "
        "not the checkpointing recompute) and memory are defined in `bench/train_throughput_gpu.py`'s docstring. "
        "Raw numbers and loss curves: "
        "`bench/results/train_throughput_gpu.json`.",
        "",
        f"Issue 17's goals: project DFT >= {GOAL_SPEEDUP_VS_LIGER:.1f}x TRL+Liger DFT's tokens/s: {speed}; MFU >= "
        f"{GOAL_MFU:.0%}: {project_mfu}.",
        "",
        format_table(rows),
        "",
        "Each project row against TRL's rows of the same loss (the fused CE against `nll`):",
        "",
        format_goals(result["comparisons"]),
        "",
    ]
    replace_docs_section(section)


def versions() -> str:
    import torch

    installed = []
    for name in ("transformers", "trl", "accelerate", "flash-attn", "liger-kernel"):
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            installed.append(f"no {name}")
    return f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), " + ", ".join(
        installed
    )


def peak_flops_for(args: argparse.Namespace, device_name: str) -> tuple[float, str]:
    """The peak FLOP/s to divide by, and where it came from; exits when the GPU is unknown and none is given."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if args.smoke:
        return SMOKE_PEAK_TFLOPS * 1e12, "nominal, smoke run on CPU"
    flops = cuda_peak_bf16_flops()
    if flops is None:
        sys.exit(
            f"bench.train_throughput_gpu: no peak bf16 FLOP/s known for the GPU {device_name!r} (PEAK_BF16_FLOPS in "
            "observability/flops.py; a MIG slice has none): give its dense bf16 peak with --peak-tflops, e.g. "
            "--peak-tflops 989.4"
        )
    return flops, "data sheet, by device name and memory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every row on CPU at a tiny size; writes only --json")
    parser.add_argument("--json", type=Path, help="where to write the results (default: bench/results/, not in smoke)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, TFLOP/s (default: by its name)")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"steps per row, the first {FULL.warmup_steps} untimed (default {FULL.steps}); a shorter run, as the GPU "
        "check's, writes only --json, not the docs section",
    )
    parser.add_argument("--loss", choices=[DFT, FUSED_CE], help="only the rows of this project loss and its TRL ones")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        base, device = (SMOKE, "cpu") if job["smoke"] else (FULL, "cuda")
        for spec in job["specs"]:
            scale = dataclasses.replace(base, steps=spec["steps"])
            row = {**run_row_child(spec, scale, device), "vocab_size": scale.size.vocab_size}
            print(RESULT_PREFIX + json.dumps(row), flush=True)
        return

    import torch

    if args.smoke:
        device, device_name = "cpu", "cpu"
    elif torch.cuda.is_available():
        device, device_name = "cuda", torch.cuda.get_device_name()
    else:
        sys.exit("bench.train_throughput_gpu: no CUDA GPU here; --smoke runs the rows on CPU at a tiny size")
    peak_flops, peak_source = peak_flops_for(args, device_name)
    scale = SMOKE if args.smoke else FULL
    short = args.steps is not None and args.steps != scale.steps
    if args.steps is not None:
        if args.steps <= scale.warmup_steps:
            sys.exit(
                f"bench.train_throughput_gpu: --steps {args.steps} leaves no timed step after the warm-up's "
                f"{scale.warmup_steps}"
            )
        scale = dataclasses.replace(scale, steps=args.steps)
    losses = {args.loss, TRL_COUNTERPART[args.loss]} if args.loss else {DFT, FUSED_CE, CE}
    specs = [{**spec, "steps": scale.steps} for spec in all_specs() if spec["loss"] in losses]
    runnable = [spec for spec in specs if skip_reason(spec, device) is None]
    if args.smoke:
        measured = run_children(runnable, smoke=True, module=MODULE)
    else:
        measured = []
        for spec in runnable:
            try:
                measured += run_children([spec], smoke=False, module=MODULE)
            except RuntimeError as error:  # one row's crash (a Liger release at odds with transformers, say)
                measured.append({**spec, "failed": str(error).splitlines()[-1]})  # must not lose the other rows
            row = measured[-1]
            state = row.get("skipped") or row.get("failed")
            state = state or f"{row['tokens_per_s']:,.0f} tokens/s, {row['peak_allocated_gib']:.1f} GiB"
            print(f"{spec}: {state}", file=sys.stderr, flush=True)
    by_spec = iter(measured)
    rows = with_mfu(
        [{**spec, "skipped": reason} if (reason := skip_reason(spec, device)) else next(by_spec) for spec in specs],
        peak_flops,
    )
    compared = comparisons(rows)
    print(format_table(rows))
    print(format_goals(compared))
    result = {
        "date": datetime.date.today().isoformat(),
        "command": COMMAND
        + (" --smoke" if args.smoke else "")
        + (f" --steps {args.steps}" if args.steps is not None else "")
        + (f" --loss {args.loss}" if args.loss else "")
        + (f" --peak-tflops {args.peak_tflops:g}" if args.peak_tflops else ""),
        "device": device_name,
        "versions": versions(),
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
        "scale": dataclasses.asdict(scale),
        "rows": rows,
        "comparisons": compared,
    }
    save_result(result, args.json, args.smoke or short, RESULTS_PATH, write_docs_section)


if __name__ == "__main__":
    main()
