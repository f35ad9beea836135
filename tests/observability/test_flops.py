"""MFU (`observability/flops.py`, `ThroughputMetricsMixin`): the peak table by device name and memory, the FLOP
count against hand counts (a frozen weight at 4 FLOPs per token, the input embedding left out, the attended
context of padded and packed samples), and the CUDA branch of the logged memory and MFU with torch.cuda faked,
since CI has no GPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from config.schema import LoraConfig, ModelConfig
from core.keys import IGNORE_INDEX
from data_pipeline.packing import PaddingFreeCollator, TokenBudgetBatchSampler, sample_lengths
from dft.trainer import DFTTrainer
from embedded.families import family_model
from modeling.adapter import add_adapter
from observability.flops import (
    attended_keys,
    batch_sample_lengths,
    flop_parameters,
    mean_attended_context,
    model_flops_per_token,
    peak_bf16_flops,
)
from observability.training_metrics import ThroughputMetricsMixin
from tests.helpers import TINY_SIZE, TOKENIZER_DIR, PackedTrainer, token_budget_samples, training_args

GB = 10**9
GIB = 2**30


@pytest.mark.parametrize(
    ("name", "memory", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 79.1 * GIB, 989.4e12),  # SXM
        ("NVIDIA H100 PCIe", 79.1 * GIB, 756e12),
        ("NVIDIA H100 NVL", 93.1 * GIB, 835.5e12),
        ("NVIDIA H200", 139.8 * GIB, 989.4e12),
        ("NVIDIA H200 NVL", 139.8 * GIB, 835.5e12),
        ("NVIDIA GH200 480GB", 94.5 * GIB, 989.4e12),
        ("NVIDIA A100-SXM4-40GB", 39.4 * GIB, 312e12),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 39.4 * GIB, None),  # a slice: a fraction of the card's compute
        ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9.5 * GIB, None),
        ("NVIDIA L4", 22 * GIB, None),  # not in the table
    ],
)
def test_peak_by_device_name_and_memory(name: str, memory: float, peak: float | None) -> None:
    assert peak_bf16_flops(name, int(memory)) == peak


def test_attended_context_of_two_packed_samples_is_the_hand_count() -> None:
    # Samples of 3 and 5 tokens: their tokens attend to 1, 2, 3 and 1, 2, 3, 4, 5 keys, 21 over 8 tokens.
    assert attended_keys([3, 5]) == 21 and mean_attended_context([3, 5]) == 21 / 8
    config = SimpleNamespace(num_hidden_layers=28, hidden_size=1536, num_attention_heads=12)
    assert model_flops_per_token(10, 7, config, 21 / 8) == 6 * 10 + 4 * 7 + 12 * 28 * 1536 * 21 / 8


def test_sample_lengths_of_padded_packed_and_bare_batches() -> None:
    padded = {"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert batch_sample_lengths(padded) == [3, 5]
    packed = {"input_ids": torch.zeros(1, 9), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])}
    assert batch_sample_lengths(packed) == [3, 2, 4]
    assert batch_sample_lengths({"input_ids": torch.zeros(3, 4)}) == [4, 4, 4]


def lora_model(tie: bool) -> torch.nn.Module:
    base = family_model("qwen2", TINY_SIZE, tie_word_embeddings=tie)
    model_cfg = ModelConfig(adapter="lora", lora=LoraConfig(r=4, target_modules=["all-linear"]))
    return add_adapter(base, model_cfg, seed=0)


@pytest.mark.parametrize("tie", [True, False])
def test_flop_parameters_of_a_lora_model(tie: bool) -> None:
    """Trainable: the adapter; frozen: the base's layers, final norm and LM head (the tied embedding counted once,
    as the head); the input embedding's lookup not at all."""
    model = lora_model(tie)
    base = model.get_base_model()
    layers = [p for name, p in base.model.layers.named_parameters() if "lora_" not in name]
    frozen = sum(p.numel() for p in layers) + base.model.norm.weight.numel() + base.lm_head.weight.numel()
    adapter = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert adapter > 0 and flop_parameters(model) == (adapter, frozen)
    total = sum(p.numel() for p in model.parameters())
    assert total - adapter - frozen == (0 if tie else base.model.embed_tokens.weight.numel())


class ThroughputTrainer(ThroughputMetricsMixin, DFTTrainer):
    pass


class ThroughputPackedTrainer(ThroughputMetricsMixin, PackedTrainer):
    pass


def fake_cuda(monkeypatch: pytest.MonkeyPatch, name: str, total_memory: int, allocated: int) -> None:
    """torch.cuda as `_throughput` and `_mfu` read it, on a machine without one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=total_memory)
    )
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_logged_mfu_and_memory_on_a_faked_cuda_device(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trains a LoRA model on CPU (the intervals' sample lengths come from the real micro-batches), then computes
    one interval's metrics with torch.cuda faked as an H100 PCIe: `peak_memory_gb` is the device's allocated
    peak, `mfu` the hand formula over the PCIe card's peak; a MIG slice or an unknown card logs no `mfu`."""
    samples = [{**s, "labels": s["input_ids"]} for s in token_budget_samples(12, max_length=24)]
    args = training_args(tmp_path, per_device_train_batch_size=3, max_steps=4, logging_steps=100)
    model = lora_model(tie=True)
    if layout == "padded":
        pad = DataCollatorForSeq2Seq(
            AutoTokenizer.from_pretrained(TOKENIZER_DIR), padding=True, label_pad_token_id=IGNORE_INDEX
        )
        trainer: Any = ThroughputTrainer(model=model, args=args, train_dataset=samples, data_collator=pad)
    else:
        sampler = TokenBudgetBatchSampler(sample_lengths(samples), max_tokens=48, seed=0)
        trainer = ThroughputPackedTrainer(
            model=model,
            args=args,
            train_dataset=samples,
            data_collator=PaddingFreeCollator(),
            train_batch_sampler=sampler,
        )
    trainer.train()
    # Every sample was trained once (4 steps of 3 padded rows, or the sampler's micro-batches, cover all 12).
    lengths = [len(s["input_ids"]) for s in samples]
    assert (trainer._attended_keys, trainer._attended_tokens) == (attended_keys(lengths), sum(lengths))

    fake_cuda(monkeypatch, "NVIDIA H100 PCIe", 80 * GB, allocated=3 * GIB)
    keys, tokens = trainer._attended_keys, trainer._attended_tokens
    trainer._interval_start = 0.0  # an interval of perf_counter() seconds: any positive time will do
    metrics = trainer._throughput(trainable_tokens=float(tokens), input_tokens=float(tokens))
    assert metrics["peak_memory_gb"] == 3.0
    trainable, frozen = flop_parameters(model)
    flops = 6 * trainable + 4 * frozen + 12 * TINY_SIZE.num_hidden_layers * TINY_SIZE.hidden_size * keys / tokens
    assert metrics["mfu"] == pytest.approx(flops * metrics["tokens_per_second_per_device"] / 756e12, rel=1e-12)
    assert (trainer._attended_keys, trainer._attended_tokens) == (0, 0)  # the next interval starts afresh

    for name, memory in (("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 10 * GB), ("NVIDIA L4", 24 * GB)):
        fake_cuda(monkeypatch, name, memory, allocated=GIB)
        trainer._interval_start = 0.0
        assert "mfu" not in trainer._throughput(1.0, 1.0)


def test_attention_width_follows_a_head_dim_of_its_own() -> None:
    """Qwen3 projects q/o to a width other than the hidden size: H is heads x head dim."""
    model = family_model("qwen3", TINY_SIZE)
    width = model.config.num_attention_heads * model.config.head_dim
    assert width != model.config.hidden_size
    flops = model_flops_per_token(0, 0, model.config, 1.0)
    assert flops == 12 * TINY_SIZE.num_hidden_layers * width
