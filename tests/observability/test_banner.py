"""The start-up banner's tokens per step equals the mean over the steps the loader actually draws, for fixed-count
batches and for token-budget micro-batches (`data.packing_max_tokens`), where the sample count per step varies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import Dataset

from config.schema import RunConfig
from data_pipeline.loader import token_budget_sampler
from observability.banner import startup_banner
from tests.helpers import data_config, tiny_qwen2, token_budget_samples, training_args

ACCUMULATION = 2


def banner_tokens_per_step(banner: str) -> float:
    match = re.search(r"effective batch\s+(.+), ~([\d,]+) tokens per step", banner)
    assert match, banner
    return float(match.group(2).replace(",", ""))


@pytest.fixture
def train_set() -> Dataset:
    return Dataset.from_list(token_budget_samples(96, max_length=40))


def run_config() -> RunConfig:
    return RunConfig(data=data_config(["unused.jsonl"]))


def test_fixed_count_batches(train_set: Dataset, tmp_path: Path) -> None:
    args = training_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=ACCUMULATION)
    banner = startup_banner(run_config(), args, tiny_qwen2(), train_set, None, None)
    lengths = [len(ids) for ids in train_set["input_ids"]]
    per_step = 8 * ACCUMULATION
    drawn = [sum(lengths[i : i + per_step]) for i in range(0, len(lengths), per_step)]  # any order: same sums
    assert "effective batch  16 samples" in banner
    assert banner_tokens_per_step(banner) == pytest.approx(sum(drawn) / len(drawn), abs=0.5)


def test_token_budget_micro_batches(train_set: Dataset, tmp_path: Path) -> None:
    sampler = token_budget_sampler(train_set, max_tokens=400, seed=0)  # ~17 samples per micro-batch
    args = training_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=ACCUMULATION)
    banner = startup_banner(run_config(), args, tiny_qwen2(), train_set, None, None, sampler)
    lengths = [len(ids) for ids in train_set["input_ids"]]
    micro_batches = list(sampler)
    steps = [micro_batches[i : i + ACCUMULATION] for i in range(0, len(micro_batches), ACCUMULATION)]
    drawn = [sum(lengths[i] for batch in step for i in batch) for step in steps]
    # The last step may hold fewer micro-batches: the banner states the mean of full ones, the budget's rate.
    per_micro_batch = sum(lengths) / len(micro_batches)
    assert banner_tokens_per_step(banner) == pytest.approx(per_micro_batch * ACCUMULATION, abs=0.5)
    full_steps = [tokens for tokens, step in zip(drawn, steps, strict=True) if len(step) == ACCUMULATION]
    assert banner_tokens_per_step(banner) == pytest.approx(sum(full_steps) / len(full_steps), rel=0.05)
    # Far more than per_device_train_batch_size samples' worth: the old banner's ~8 x 2 x mean length.
    mean_length = sum(lengths) / len(lengths)
    assert banner_tokens_per_step(banner) > 1.5 * 8 * ACCUMULATION * mean_length
