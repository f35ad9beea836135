"""Memory a run's model states need, per training mode, from the model's config alone (no weights are loaded):

    python -m modeling.estimate model.name_or_path=/models/Qwen2.5-7B-Instruct model.lora.r=16 --gpus 8

Takes train.py's overrides. Each mode's model is built on the meta device from its `config.json` and prepared
by the code a run uses (`modeling.adapter.add_adapter`, so peft itself), and the bytes are read from the dtypes
the prepared parameters are left in:

- full: the model in bf16, as DeepSpeed loads it.
- lora: the frozen base in bf16 under peft's adapter, which peft keeps in fp32 (`autocast_adapter_dtype`).
- qlora: the base in bf16 with the linear layers transformers' bitsandbytes integration quantises (its own
  rule: every `nn.Linear` but the output embedding and what the model keeps in fp32) marked 4-bit, then
  `add_adapter` with `model.adapter=qlora`: peft's `prepare_model_for_kbit_training` casts every bf16 parameter
  that is not 4-bit (embeddings, norms, biases, an untied LM head) to fp32, so those cost 4 bytes, not 2. A
  4-bit weight is NF4 with double quantization: 0.5 byte, plus 1/64 byte of 8-bit block scale and 4/16384 of
  fp32 second-level scale per weight, 0.516.

Training state, per trainable parameter, as mixed-precision AdamW keeps it under DeepSpeed (the ZeRO paper's
accounting): a gradient in the parameter's dtype, an fp32 master copy when the parameter is not fp32, and Adam's
two fp32 moments: 2 + 4 + 8 = 14 bytes for a bf16 weight (16 with the weight itself), 4 + 8 = 12 for an fp32
adapter weight.

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
from transformers import AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from config.schema import ModelConfig, load_run_config
from modeling.adapter import add_adapter, count_parameters, meta_model
from modeling.loading import resolve_model_path

GIB = 1024**3
FP32_BYTES = 4
ADAM_MOMENTS_BYTES = 8  # m and v, fp32
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


class Params4bit(torch.nn.Parameter):
    """A weight bitsandbytes would hold in 4 bits, on the meta device. Named as bitsandbytes' class because that
    name is what `peft.prepare_model_for_kbit_training` checks to leave a weight alone (peft/utils/other.py)."""


@dataclass
class ModeEstimate:
    mode: str
    trainable: int
    total: int
    weights_bytes: float
    """Every weight as training holds it (the frozen base included)."""
    training_state_bytes: float
    """Gradients, fp32 master weights and Adam's two moments of the trainable parameters (their own copy is in
    `weights_bytes`)."""

    @property
    def model_states_bytes(self) -> float:
        return self.weights_bytes + self.training_state_bytes


def mark_4bit_linears(model: PreTrainedModel) -> None:
    """Mark, in place, the weights `from_pretrained` with a bitsandbytes 4-bit config quantises: the modules
    transformers' `replace_with_bnb_linear` swaps (`nn.Linear` or `Conv1D`, not in `get_keys_to_not_convert` or
    `_keep_in_fp32_modules`), biases excluded."""
    skip = get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules or ())
    for name, module in model.named_modules():
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
            module.weight = Params4bit(module.weight.data, requires_grad=False)


def mode_estimate(mode: str, model: torch.nn.Module) -> ModeEstimate:
    """The bytes of `model`'s parameters as prepared for training, by their dtypes (module docstring)."""
    weights = state = 0.0
    for parameter in model.parameters():
        size, element = parameter.numel(), parameter.element_size()
        weights += size * (NF4_DOUBLE_QUANT_BYTES if isinstance(parameter, Params4bit) else element)
        if parameter.requires_grad:
            master = FP32_BYTES if element < FP32_BYTES else 0
            state += size * (element + master + ADAM_MOMENTS_BYTES)
    trainable, total = count_parameters(model)
    return ModeEstimate(mode, trainable, total, weights, state)


def estimate(model_cfg: ModelConfig, model_path: str) -> list[ModeEstimate]:
    """Full, LoRA and QLoRA model-state bytes for this architecture and `model.lora.*`."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)

    def bf16_base() -> PreTrainedModel:
        return meta_model(config, model_cfg.trust_remote_code).to(torch.bfloat16)

    rows = [mode_estimate("full", bf16_base())]
    for adapter in ("lora", "qlora"):
        base = bf16_base()
        if adapter == "qlora":
            mark_4bit_linears(base)
        # `modules_to_save` train a copy of theirs, counted as trainable.
        adapter_cfg = dataclasses.replace(model_cfg, adapter=adapter, merge_adapter=False)
        rows.append(mode_estimate(adapter, add_adapter(base, adapter_cfg, seed=0)))
    return rows


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
