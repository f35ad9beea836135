"""The start-up banner and the end-of-run summary: what a `tail -f` reader needs to know at a glance."""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, TrainingArguments

from config.deepspeed import zero_stage
from config.schema import RunConfig
from core.keys import CHOSEN_INPUT_IDS_KEY, INPUT_IDS_KEY, REJECTED_INPUT_IDS_KEY
from modeling.adapter import count_parameters
from observability.artifacts import read_metrics
from observability.drift_guard import drift_summary


def startup_banner(
    run: RunConfig,
    args: TrainingArguments,
    model: PreTrainedModel,
    train_set: Dataset,
    validation_set: Dataset | None,
    resume_from: str | None,
    train_batch_sampler: Sized | None = None,
    loss_line: str | None = None,
) -> str:
    """The run's settings, one per line; `loss_line` describes the objective (`dft.objectives.describe_objective`:
    this package does not import the loss), `loss.type` alone when None."""
    micro_batches_per_step = args.gradient_accumulation_steps * args.world_size
    # A pair row is two sequences, both run through the model.
    sequences = (INPUT_IDS_KEY, CHOSEN_INPUT_IDS_KEY, REJECTED_INPUT_IDS_KEY)
    token_columns = [column for column in sequences if column in train_set.column_names]
    total_tokens = sum(len(ids) for column in token_columns for ids in train_set[column])
    if train_batch_sampler is None:
        effective_batch = f"{args.per_device_train_batch_size * micro_batches_per_step} samples"
        micro_batches = len(train_set) / args.per_device_train_batch_size
    else:  # token-budget micro-batches (data.packing_max_tokens): as many samples as fill the budget
        micro_batches = len(train_batch_sampler)
        effective_batch = f"~{len(train_set) / micro_batches * micro_batches_per_step:,.1f} samples"
    tokens_per_step = total_tokens / max(micro_batches, 1e-9) * micro_batches_per_step
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    stage = zero_stage(args.deepspeed)
    trainable, total = count_parameters(model)
    lora, adapter = run.model.lora, run.model.adapter
    trained = "full" if adapter == "none" else f"{adapter} r {lora.r} on {','.join(lora.target_modules)}"
    rows = [
        ("world size", f"{args.world_size} ({device})"),
        ("model", f"{run.model.name_or_path} ({model.config.model_type})"),
        ("attention", str(model.config._attn_implementation)),
        ("ZeRO stage", "none (DDP or single process)" if stage is None else str(stage)),
        ("precision", f"{precision} (weights {next(model.parameters()).dtype})".replace("torch.", "")),
        ("trainable", f"{trainable:,} of {total:,} parameters ({trainable / max(total, 1):.2%}), {trained}"),
        ("activation ckpt", "on" if args.activation_checkpointing else "off"),
        ("loss", loss_line or run.loss.type),
        ("samples", f"train {len(train_set)}, validation {len(validation_set) if validation_set is not None else 0}"),
        ("effective batch", f"{effective_batch}, ~{tokens_per_step:,.0f} tokens per step"),
        ("output dir", str(Path(run.output_dir).resolve())),
        ("resume from", resume_from or "start"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def end_summary(output_dir: str | Path, train_metrics: dict[str, float]) -> str:
    records = read_metrics(output_dir)
    # The evaluation's headline: the lowest NLL of a per-token objective, the highest pairwise accuracy of a
    # preference run (preference/trainer.py logs no NLL).
    key, pick = ("eval_accuracy", max) if any("eval_accuracy" in r for r in records) else ("eval_nll", min)
    evals = [r for r in records if key in r]
    best = pick(evals, key=lambda r: r[key]) if evals else None
    lines = [
        f"  time             {train_metrics.get('train_runtime', 0.0):.1f} s",
        f"  train loss       {train_metrics.get('train_loss', float('nan')):.4f}",
        f"  best {key:<11} {best[key]:.4f} at step {best['step']}" if best else "  best eval_nll    (no eval)",
        f"  model            {Path(output_dir).resolve()}",
    ]
    if (drift := drift_summary(output_dir)) is not None:
        lines.append(f"  drift guard      {drift}")
    return "\n".join(lines)
