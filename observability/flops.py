"""Model FLOPs utilisation (MFU): the one FLOP count and the one peak table that the Trainer's logged `mfu`
(`observability.training_metrics`) and the GPU training benchmark (`bench/train_throughput_gpu.py`) share.

MFU = model FLOPs per token x tokens/s per device / the device's dense bf16 peak FLOP/s, with model FLOPs per
token (PaLM, Chowdhery et al. 2022, appendix B, `6N + 12 L H Q T`, with frozen weights split out and causal
attention counted as computed):

    6 N_trainable + 4 N_frozen + 12 L H C

- A weight costs 2 FLOPs per token forward (one multiply-add); backward, the gradient of its input activation
  2 more and its own gradient 2 more: 6 for a trained weight, 4 for a frozen one (a LoRA or QLoRA base weight,
  whose activation gradient still flows down to the adapters of the layers below).
- N counts the parameters every token multiplies: each layer's, the final norm and the LM head's weight; not the
  input embedding, a row lookup with no multiply (its gradient is a scatter-add), so a head tied to it counts
  once, as the head, and an embedding trained under LoRA (`model.lora.train_embeddings`) adds nothing either.
  Norm weights and biases are counted as weights: under 0.1% of N.
- Attention: L layers, H = heads x head dim, and C the mean number of keys a token attends to: a causal token at
  position p of its own sample attends to p + 1, so samples of lengths s_i (padded rows, or samples packed into
  one row with their position ids restarting) give C = sum(s_i (s_i + 1) / 2) / sum(s_i). QK^T and AV cost
  2 H FLOPs per key each, forward; backward doubles that (both operands are activations, so whether weights are
  frozen changes nothing here): 3 x 4 H C = 12 H C per layer.

These are model FLOPs: activation checkpointing's recompute of the forward (about 2N more per token on the
hardware) is not counted, as hardware FLOPs utilisation would.

Peak: `PEAK_BF16_FLOPS`, chosen by the name and total memory torch reports. The memory tells a whole card from a
MIG slice (whose name may carry the card's, with a fraction of its memory and compute); a device that matches no
row has no known peak, and no MFU is logged for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

GIB = 2**30
# (parts of the name, all present case-insensitively; the card's memory in GB; dense bf16 tensor-core FLOP/s).
# NVIDIA's data sheets give bf16 with sparsity: these are the dense halves. First match wins, so each variant's
# row comes before the family's catch-all ("NVIDIA H100 80GB HBM3" is the SXM card, "NVIDIA H100 PCIe" the PCIe).
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], int, float], ...] = (
    (("H100", "PCIe"), 80, 756e12),
    (("H100", "NVL"), 94, 835.5e12),
    (("H200", "NVL"), 141, 835.5e12),
    (("GH200",), 96, 989.4e12),  # the H100's or H200's compute, 96 or 144 GB
    (("H200",), 141, 989.4e12),
    (("H100",), 80, 989.4e12),  # SXM
    (("A100",), 40, 312e12),  # 40 or 80 GB, the same compute
    (("L40S",), 48, 362.05e12),
)
# torch reports total memory in GiB units below the data sheet's GB (80 GB HBM3 reads 79.2 GiB) and reserves some;
# a MIG slice reports at most half of the card's.
WHOLE_CARD_MEMORY_SHARE = 0.85


def peak_bf16_flops(device_name: str, total_memory_bytes: int) -> float | None:
    """The dense bf16 peak FLOP/s of a whole card named `device_name` with `total_memory_bytes` (as
    `torch.cuda.get_device_properties(i).total_memory` reports it), or None when no row of `PEAK_BF16_FLOPS`
    matches: an unknown card, or a MIG slice of a known one."""
    name = device_name.lower()
    for parts, card_gb, flops in PEAK_BF16_FLOPS:
        if all(part.lower() in name for part in parts):
            if total_memory_bytes >= WHOLE_CARD_MEMORY_SHARE * card_gb * 1e9:
                return flops
            return None
    return None


def cuda_peak_bf16_flops(device: int | None = None) -> float | None:
    """`peak_bf16_flops` of a CUDA device (the current one by default)."""
    device = torch.cuda.current_device() if device is None else device
    return peak_bf16_flops(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory)


def flop_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters every token multiplies: all of `model`'s but the input embedding's, unless
    they are the LM head's too (tied). Full sizes under ZeRO-3 (`ds_numel`); peft models count their base."""
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    lookup_ids = {id(p) for p in model.get_input_embeddings().parameters()} - head_ids
    trainable = frozen = 0
    for parameter in model.parameters():
        if id(parameter) in lookup_ids:
            continue
        size = getattr(parameter, "ds_numel", parameter.numel())
        if parameter.requires_grad:
            trainable += size
        else:
            frozen += size
    return trainable, frozen


def attention_width(config: Any) -> int:
    """H: attention heads x head dim (the hidden size, unless the config sets a head dim of its own)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def attended_keys(sample_lengths: Iterable[int]) -> int:
    """Keys all tokens attend to under causal attention within their own sample: `sum(s (s + 1) / 2)`."""
    return sum(s * (s + 1) // 2 for s in sample_lengths)


def mean_attended_context(sample_lengths: list[int]) -> float:
    """C: the mean over tokens of the keys each attends to, `sum(s (s + 1) / 2) / sum(s)`."""
    return attended_keys(sample_lengths) / sum(sample_lengths)


def batch_sample_lengths(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """The lengths of the samples in a training micro-batch: per row from `attention_mask` (padded rows, one
    sample each), else from `position_ids` restarting at 0 (packed rows without a mask), else whole rows."""
    if batch.get("attention_mask") is not None:
        return [int(n) for n in batch["attention_mask"].sum(-1).tolist()]
    if batch.get("position_ids") is not None:
        positions = batch["position_ids"].reshape(-1)
        restarts = [i for i in (positions == 0).nonzero().reshape(-1).tolist() if i > 0]
        bounds = [0, *restarts, positions.numel()]
        return [end - start for start, end in itertools.pairwise(bounds)]
    rows, length = batch["input_ids"].shape
    return [length] * rows


def model_flops_per_token(trainable: int, frozen: int, config: Any, mean_context: float) -> float:
    """`6 N_trainable + 4 N_frozen + 12 L H C` (module docstring); `config` the text model's."""
    attention = 12 * config.num_hidden_layers * attention_width(config) * mean_context
    return 6 * trainable + 4 * frozen + attention
