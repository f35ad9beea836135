"""Verified export: the saved safetensors must be the model that was trained.

ZeRO-3 saves empty or partial weights when its 16-bit gather is off or a save is
cut short (LLaMA-Factory #253, DeepSpeed #3841), and the run still "succeeds".
After `save_model`, every parameter is compared with the saved tensor of the same
name: present, same shape, not empty, equal values. Under ZeRO-3 each parameter
is gathered in turn on all ranks (one parameter at a time, so memory stays at one
tensor even for a 70B model) and rank 0 compares; the saved files are read tensor
by tensor with `safe_open`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from modeling.adapter import adapter_saved_name

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The saved model does not match the trained one."""


def _saved_tensor_files(output_dir: Path) -> dict[str, Path]:
    files = sorted(output_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no *.safetensors in {output_dir}: the final model was not saved")
    located: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            located.update(dict.fromkeys(handle.keys(), path))
    return located


def verify_export(model: PreTrainedModel, output_dir: str | Path, is_rank_zero: bool, zero3: bool) -> int:
    """Compare every parameter with its saved tensor; returns how many were checked. Call on every rank.

    An adapter run (a peft model) saves only its trainable parameters, under peft's names: those are checked.
    """
    output_dir = Path(output_dir)
    located = _saved_tensor_files(output_dir) if is_rank_zero else {}
    adapter = hasattr(model, "peft_config")
    problems: list[str] = []
    checked = 0
    for model_name, parameter in model.named_parameters():
        if adapter and not parameter.requires_grad:
            continue
        name = adapter_saved_name(model_name) if adapter else model_name
        if zero3:
            import deepspeed

            # A collective: every rank gathers each parameter in the same order.
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                if is_rank_zero:
                    problems += _compare(name, parameter.detach(), located)
        elif is_rank_zero:
            problems += _compare(name, parameter.detach(), located)
        checked += 1
    if problems:
        shown = "\n  ".join(problems[:10])
        raise ExportError(
            f"the model saved in {output_dir} does not match the trained weights ({len(problems)} problems):\n  {shown}"
        )
    if is_rank_zero:
        what = "adapter parameters" if adapter else "parameters"
        logger.info("Verified export: %d %s saved with their names, shapes and values", checked, what)
    return checked


def _compare(name: str, trained: torch.Tensor, located: dict[str, Path]) -> list[str]:
    if name not in located:
        return [f"{name}: missing from the saved files"]
    with safe_open(str(located[name]), framework="pt") as handle:
        saved = handle.get_tensor(name)
    if saved.numel() == 0:
        return [f"{name}: saved tensor is empty (ZeRO-3 without stage3_gather_16bit_weights_on_model_save?)"]
    if saved.shape != trained.shape:
        return [f"{name}: saved shape {tuple(saved.shape)} != trained {tuple(trained.shape)}"]
    if not torch.equal(saved.to(trained.device, trained.dtype), trained):
        return [f"{name}: saved values differ from the trained ones"]
    return []
