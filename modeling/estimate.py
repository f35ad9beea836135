"""Memory a run's model states need, per training mode, from the model's config alone (no weights are loaded):

    python -m modeling.estimate model.name_or_path=/models/Qwen2.5-7B-Instruct model.lora.r=16 --gpus 8

Takes train.py's overrides. The model is built on the meta device from its `config.json` and the adapter is
added by peft itself, so the parameter counts are exact for the architecture and `model.lora.*`. The bytes follow
mixed-precision AdamW as DeepSpeed runs it (the ZeRO paper's accounting):

- full: bf16 weights (2 bytes per parameter) and gradients (2), fp32 master weights, Adam m and v (12): 16.
- lora: the frozen base in bf16 (2 per base parameter); each trainable parameter 16 (peft keeps the adapter in
  fp32: weight, gradient, m and v, 4 each).
- qlora: the base's linear layers in 4-bit NF4 with double quantization (0.5 byte, plus 1/64 byte of 8-bit block
  scale and 4/16384 of fp32 second-level scale per weight: 0.516); embeddings, norms and the LM head stay bf16;
  the adapter as for lora.

ZeRO-3 partitions all of these over the ranks, so a GPU holds about `model states / gpus`. Activations, the
fused loss's chunk, CUDA's workspace and fragmentation come on top: they depend on the tokens per micro-batch
and activation checkpointing, not on the mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from config.schema import ModelConfig, load_run_config
from modeling.adapter import add_adapter, count_parameters, meta_model
from modeling.loading import resolve_model_path

GIB = 1024**3
MIXED_PRECISION_ADAM_BYTES = 16  # bf16 weight + bf16 grad + fp32 master, m, v
BF16_BYTES = 2
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class ModeEstimate:
    mode: str
    trainable: int
    total: int
    weights_bytes: float
    """Every weight as training holds it (the frozen base included)."""
    training_state_bytes: float
    """Gradients, fp32 master weights and Adam's two moments of the trainable parameters (their bf16 copy is in
    `weights_bytes` for a full run)."""

    @property
    def model_states_bytes(self) -> float:
        return self.weights_bytes + self.training_state_bytes


def estimate(model_cfg: ModelConfig, model_path: str) -> list[ModeEstimate]:
    """Full, LoRA and QLoRA model-state bytes for this architecture and `model.lora.*`."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
    base = meta_model(config, model_cfg.trust_remote_code)
    total = sum(p.numel() for p in base.parameters())
    quantizable = sum(
        module.weight.numel()
        for module in base.modules()
        if isinstance(module, torch.nn.Linear) and module is not base.get_output_embeddings()
    )
    lora_cfg = dataclasses.replace(model_cfg, adapter="lora", merge_adapter=False)
    # The base stays whole and frozen; `modules_to_save` train a copy of theirs, counted as trainable.
    adapter_trainable, adapter_total = count_parameters(add_adapter(base, lora_cfg, seed=0))
    full_bytes = total * MIXED_PRECISION_ADAM_BYTES
    adapter_weights = adapter_trainable * 4
    adapter_state = adapter_trainable * (MIXED_PRECISION_ADAM_BYTES - 4)
    return [
        ModeEstimate("full", total, total, total * BF16_BYTES, full_bytes - total * BF16_BYTES),
        ModeEstimate("lora", adapter_trainable, adapter_total, total * BF16_BYTES + adapter_weights, adapter_state),
        ModeEstimate(
            "qlora",
            adapter_trainable,
            adapter_total,
            quantizable * NF4_DOUBLE_QUANT_BYTES + (total - quantizable) * BF16_BYTES + adapter_weights,
            adapter_state,
        ),
    ]


def human_bytes(size: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2)):
        if size >= scale / 10:
            return f"{size / scale:,.1f} {unit}"
    return f"{size / 1024:,.1f} KiB"


def format_table(rows: list[ModeEstimate], gpus: int) -> str:
    header = (
        "| mode | trainable parameters | trainable % | weights | grads + optimizer | model states "
        f"| per GPU (ZeRO-3, {gpus} GPUs) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row.mode} | {row.trainable:,} | {row.trainable / row.total:.2%} | {human_bytes(row.weights_bytes)} "
            f"| {human_bytes(row.training_state_bytes)} | {human_bytes(row.model_states_bytes)} "
            f"| {human_bytes(row.model_states_bytes / gpus)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="ranks ZeRO-3 partitions the model states over")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model.name_or_path=... model.lora.r=8")
    cli = parser.parse_args(argv)
    run = load_run_config(cli.overrides)
    model_path = resolve_model_path(run.model)
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5: not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        rows = estimate(run.model, model_path)
    if cli.json:
        records = [{**dataclasses.asdict(r), "model_states_bytes": r.model_states_bytes} for r in rows]
        sys.stdout.write(json.dumps({"model": run.model.name_or_path, "gpus": cli.gpus, "modes": records}) + "\n")
        return
    lora = run.model.lora
    sys.stdout.write(
        f"{run.model.name_or_path}: model states per training mode (LoRA r {lora.r} on "
        f"{','.join(lora.target_modules)}; activations not included)\n{format_table(rows, cli.gpus)}\n"
    )


if __name__ == "__main__":
    main()
