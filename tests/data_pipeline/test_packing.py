"""Padding-free packing: a packed micro-batch trains exactly as the same samples padded.

Loss and every parameter gradient through DFTTrainer.compute_loss, fused and reference, with the step's token
count (`num_items_in_batch`) taken from each layout's own labels, as the Trainer counts it; and the parameters after
two optimizer steps of `Trainer.train` with gradient accumulation. Each float32 layout is held to float32 rounding
of the float64 computation of the same layout, and the two layouts are compared in float64.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from datasets import Dataset
from transformers import TrainerControl, TrainerState, TrainingArguments

from config.schema import LossConfig
from core.keys import IGNORE_INDEX
from data_pipeline.packing import (
    PaddingFreeCollator,
    SamplerEpochCallback,
    TokenBudgetBatchSampler,
    pack_best_fit_decreasing,
    sample_lengths,
)
from dft.trainer import DFTTrainer
from observability.artifacts import read_metrics
from tests.helpers import (
    DISTRIBUTED_TIMEOUT_S,
    FLOAT32_EPS,
    REPO_ROOT,
    TOKEN_BUDGET_EPOCHS,
    VOCAB,
    PackedTrainer,
    float32_bound,
    float64_model_loss_and_grads,
    float64_sgd_steps,
    free_port,
    loss_and_grads,
    make_trainer,
    relative_error,
    run_script,
    tiny_qwen2,
    token_budget_samples,
    training_args,
)

LENGTHS = (5, 11, 8)

# Each layout's float32 loss and gradients against the float64 computation of the same layout, never against the other
# layout: float32 rounding grows about as eps * sqrt(n) over a reduction of n terms, the longest here being the
# softmax over the vocabulary (VOCAB = 300), chained a few times through 2 layers forward and backward, so
# 4 * eps * sqrt(300) = 8.3e-6 relative in norm. Measured at most 1.2e-6 with 1 or 2 threads; a sample that sees its
# neighbour (attention across a boundary), a position that does not restart, or a lost token is 1e-3 or more.
FLOAT32_BOUND = float32_bound(VOCAB)
# Two layouts in float64 agree to float64 rounding, the same 4 * eps * sqrt(300) with float64's eps (1.5e-14; measured
# 3.5e-16): float32 rounding cannot blur this comparison.
FLOAT64_BOUND = 4 * torch.finfo(torch.float64).eps * VOCAB**0.5


def features() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for length in LENGTHS:
        input_ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 2 + input_ids[2:]  # a two-token prompt
        out.append({"input_ids": input_ids, "attention_mask": [1] * length, "labels": labels})
    return out


def padded(samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    pad = [width - len(s["input_ids"]) for s in samples]
    return {
        "input_ids": torch.tensor([s["input_ids"] + [0] * p for s, p in zip(samples, pad, strict=True)]),
        "attention_mask": torch.tensor([s["attention_mask"] + [0] * p for s, p in zip(samples, pad, strict=True)]),
        "labels": torch.tensor([s["labels"] + [IGNORE_INDEX] * p for s, p in zip(samples, pad, strict=True)]),
    }


def trainable_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def test_collator_restarts_positions_and_separates_labels() -> None:
    batch = PaddingFreeCollator()(features())
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    assert batch["use_cache"] is False
    starts = [0, LENGTHS[0], LENGTHS[0] + LENGTHS[1]]
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert batch["labels"][0, starts].tolist() == [IGNORE_INDEX] * 3


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_packed_batch_gives_the_padded_loss_and_gradients(tmp_path: Path, implementation: str) -> None:
    model = tiny_qwen2()
    samples = features()
    packed_inputs, padded_inputs = PaddingFreeCollator()(samples), padded(samples)
    assert trainable_tokens(packed_inputs["labels"]) == trainable_tokens(padded_inputs["labels"])
    trainer = make_trainer(model, tmp_path, alpha=0.6, implementation=implementation)
    # As with training.use_cache=true: the collator must still keep the samples apart.
    model.config.use_cache = True
    truths = {}
    for layout, inputs in (("padded", padded_inputs), ("packed", packed_inputs)):
        count = trainable_tokens(inputs["labels"])
        truths[layout] = truth_loss, truth_grads = float64_model_loss_and_grads(model, inputs, 0.6, count)
        loss, grads = loss_and_grads(trainer, model, inputs, count)
        error = relative_error(loss, truth_loss)
        assert error <= FLOAT32_BOUND, f"{layout}: loss relative error {error:.2e}"
        assert grads.keys() == truth_grads.keys()
        for name, truth in truth_grads.items():
            error = relative_error(grads[name], truth)
            assert error <= FLOAT32_BOUND, f"{layout}: {name}: relative error in norm {error:.2e}"
    # The layouts themselves agree in float64 (FLOAT64_BOUND).
    (padded_loss, padded_grads), (packed_loss, packed_grads) = truths["padded"], truths["packed"]
    assert relative_error(packed_loss, padded_loss) <= FLOAT64_BOUND
    for name, grad in padded_grads.items():
        assert relative_error(packed_grads[name], grad) <= FLOAT64_BOUND, name


class RecordingTrainer(DFTTrainer):
    """The DFT Trainer that keeps every training micro-batch it computes a loss on, with its `num_items_in_batch`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batches: list[tuple[dict[str, torch.Tensor], torch.Tensor | int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        if model.training:
            copied = {key: value.clone() if torch.is_tensor(value) else value for key, value in inputs.items()}
            self.micro_batches.append((copied, num_items_in_batch))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def sgd_args(output_dir: Path, **overrides: object) -> TrainingArguments:
    """Plain SGD at a constant rate on CPU, nothing saved or reported: updates that are easy to compare."""
    return training_args(output_dir, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", **overrides)


def test_training_steps_with_packing_match_padding(tmp_path: Path) -> None:
    """Through `Trainer.train`: the Trainer's own token count, gradient accumulation and optimizer steps."""
    samples = features() * 4  # 12 samples: 2 optimizer steps of 2 micro-batches of 3 samples
    start = tiny_qwen2()
    start_params = {key: p.detach().clone() for key, p in start.named_parameters()}
    truths = {}
    for name, collator in (("padded", padded), ("packed", PaddingFreeCollator())):
        model = tiny_qwen2()
        args = sgd_args(tmp_path / name, per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=2)
        loss = LossConfig(alpha=0.6, implementation="fused")
        trainer = RecordingTrainer(model=model, args=args, train_dataset=samples, data_collator=collator, loss=loss)
        trainer.train()
        # The loss divided by num_items_in_batch is taken as scaled for accumulation (no extra division by 2).
        assert trainer.model_accepts_loss_kwargs and len(trainer.micro_batches) == 4
        # The float64 truth of this layout: the same micro-batches, in the same steps, replayed on a float64 copy.
        steps = [trainer.micro_batches[:2], trainer.micro_batches[2:]]
        truths[name] = truth = float64_sgd_steps(start, steps, 0.6, args.learning_rate, args.max_grad_norm)
        for key, p in model.named_parameters():
            update, true_update = p.detach().double() - start_params[key].double(), truth[key] - start_params[key]
            assert true_update.norm() > 0, f"{key} did not train"
            # Two sources of float32 error: the gradients, FLOAT32_BOUND relative to the update (in norm), and the
            # parameter itself rounded to float32 after each of the 2 steps, at most eps / 2 of it per element (a
            # strict worst case). Measured at most 0.35 of this bound with 1 or 2 threads, on layer-norm weights of
            # about 1 whose small update the parameter's rounding dominates; a lost or repeated micro-batch, or a
            # wrong token count, moves an update by 10 % or more.
            bound = FLOAT32_BOUND * true_update.norm() + 2 * FLOAT32_EPS / 2 * truth[key].norm()
            error = (update - true_update).norm()
            assert error <= bound, (
                f"{name}: {key}: error {error:.2e} > {bound:.2e} (update norm {true_update.norm():.2e})"
            )
    # The layouts agree in float64, up to float64 rounding: the same 4 * eps * sqrt(VOCAB) with float64's eps.
    for key, value in truths["padded"].items():
        change = truths["packed"][key] - value
        assert change.norm() <= FLOAT64_BOUND * (value - start_params[key]).norm(), key


def skewed_lengths(count: int, max_length: int, seed: int = 0) -> list[int]:
    """Chat-SFT-like: log-normal lengths (median ~150 tokens, a long tail), truncated to `max_length`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(5.0 + 1.0 * torch.randn(count, generator=generator)).clamp(8, max_length)
    return lengths.long().tolist()


def epoch_bins(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_token_budget_bins_are_over_98_percent_full_and_hold_every_sample_once() -> None:
    lengths = skewed_lengths(3000, max_length=1024)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=4096, seed=1)
    # Not rounding: the packing's quality. Best-fit decreasing fills these bins to 99.7 %; 98 % leaves room for another
    # seed's lengths, and filling one bin at a time in random order (next-fit: 94.6 % here) fails it.
    assert sampler.fill_rate > 0.98
    for epoch in range(2):
        bins = epoch_bins(sampler, epoch)
        assert len(bins) == len(sampler)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert max(loads) <= 4096
        # Integer sums and one float64 division, the same as the sampler's: equal exactly.
        assert sum(lengths) / (len(bins) * 4096) == sampler.fill_rate
        assert sum(load < 0.98 * 4096 for load in loads) <= 2  # only the last bins opened can be short


def test_token_budget_bins_are_deterministic_per_seed_and_reshuffled_per_epoch() -> None:
    lengths = skewed_lengths(500, max_length=256)
    first, again = TokenBudgetBatchSampler(lengths, 1024, seed=3), TokenBudgetBatchSampler(lengths, 1024, seed=3)
    assert epoch_bins(first, 0) == epoch_bins(again, 0)
    assert epoch_bins(first, 1) == epoch_bins(again, 1)
    assert epoch_bins(first, 0) != epoch_bins(first, 1)
    assert epoch_bins(TokenBudgetBatchSampler(lengths, 1024, seed=4), 0) != epoch_bins(first, 0)


def test_best_fit_decreasing_on_a_hand_worked_case() -> None:
    # Longest first: 6 opens bin A (room 4), 5 opens B (room 5), 4 fits A exactly (tightest), 3 fits B (room 2),
    # 2 fits B exactly: two full bins of 10.
    lengths = [3, 6, 2, 5, 4]
    assert pack_best_fit_decreasing(lengths, 10, order=range(5)) == [[1, 4], [3, 0, 2]]


def test_a_sample_longer_than_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data.packing_max_tokens=100 is smaller than training sample 2 \(101 tokens"):
        TokenBudgetBatchSampler([10, 20, 101], max_tokens=100)


def test_sample_lengths_reads_the_arrow_column() -> None:
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (3, 7, 5)]
    dataset = Dataset.from_list(rows).select([2, 0, 1])  # an indices mapping, as a shuffle or split leaves
    assert sample_lengths(dataset) == [5, 3, 7]
    assert sample_lengths(rows) == [3, 7, 5]


def test_trainer_trains_on_token_budget_micro_batches_as_on_the_same_batches_given_in_order(tmp_path: Path) -> None:
    """`Trainer.train` with gradient accumulation through `get_train_dataloader`'s token-budget loader gives the
    update of the stock loader fed the same micro-batches in the same order: nothing dropped, reordered or counted
    differently in `num_items_in_batch` (so the DFT normalisation stays exact)."""
    samples = features() * 6  # 18 samples of 5, 11 and 8 tokens
    sampler = TokenBudgetBatchSampler(sample_lengths(samples), max_tokens=24, seed=0)
    bins = list(sampler)  # epoch 0, as the Trainer draws it
    assert len(bins) == 7  # 3 x (11+11), 2 x (8+8+8), 5+5+5+5, 5+5: 144 tokens
    params, steps = {}, math.ceil(len(bins) / 3)
    for name in ("budget", "stock"):
        model = tiny_qwen2()
        args = sgd_args(
            tmp_path / name,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=3,
            num_train_epochs=1,
            train_sampling_strategy="sequential",
            remove_unused_columns=False,
        )
        if name == "budget":
            dataset, collator = samples, PaddingFreeCollator()
        else:  # one item per micro-batch: the list of its samples, flattened by the same collator
            dataset = [[samples[i] for i in b] for b in bins]
            collator = lambda items: PaddingFreeCollator()(items[0])  # noqa: E731
        trainer = PackedTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            loss=LossConfig(alpha=0.6),
            train_batch_sampler=sampler if name == "budget" else None,
        )
        result = trainer.train()
        assert trainer.state.global_step == steps and math.isfinite(result.training_loss)
        params[name] = {key: p.detach().clone() for key, p in model.named_parameters()}
    # The same micro-batches in the same order through the same float32 operations in one process: the same update
    # bit for bit, with no tolerance to hide a micro-batch that differs by one sample or one token.
    for key, value in params["stock"].items():
        assert torch.equal(params["budget"][key], value), key


@pytest.mark.distributed
def test_two_ranks_get_disjoint_token_budget_micro_batches_of_equal_count(tmp_path: Path) -> None:
    """Two CPU ranks (torchrun, gloo) through `TokenBudgetLoaderMixin.get_train_dataloader` and accelerate's
    sharding."""
    count, max_tokens, max_length = 99, 64, 32
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "tests.data_pipeline.token_budget_ranks", str(tmp_path), str(count), str(max_tokens), str(max_length),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_script(command, env=env, timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[tmp_path])
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    lengths = sample_lengths(token_budget_samples(count, max_length))
    sampler = TokenBudgetBatchSampler(lengths, max_tokens, seed=7)
    assert len(sampler) % 2 == 1, "pick sizes with an odd number of micro-batches, to exercise the uneven tail"
    for epoch in range(TOKEN_BUDGET_EPOCHS):
        expected = epoch_bins(sampler, epoch)
        got = [[batch["ids"] for batch in rank["epochs"][epoch]] for rank in ranks]
        assert len(got[0]) == len(got[1]) == (len(expected) + 1) // 2
        assert all(batch["tokens"] <= max_tokens for rank in ranks for batch in rank["epochs"][epoch])
        # Rank r takes micro-batches r, r + 2, ...; the rank one short repeats the epoch's first micro-batch.
        assert got[0] == expected[0::2]
        assert got[1] == expected[1::2] + [expected[0]]
        seen = [i for batch in got[0] + got[1][:-1] for i in batch]
        assert sorted(seen) == list(range(count))


@pytest.mark.slow
def test_train_py_with_a_token_budget_trains_one_epoch_of_packed_micro_batches(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable, "train.py", f"output_dir={out}",
        "data.sources=[{path:data/sample/chat_letters.jsonl,max_samples:240}]",
        "data.packing=true", "data.packing_max_tokens=512", "training.gradient_accumulation_steps=2",
        "training.num_train_epochs=1", "training.max_steps=-1", "training.logging_steps=1",
        "training.eval_strategy=no", "heldout.file=null",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    log = (out / "logs" / "rank0.log").read_text()
    packed = re.search(r"into (\d+) micro-batches of at most 512 tokens: ([\d.]+)% of the budget used", log)
    assert packed, log[-3000:]
    num_bins, fill_percent = int(packed.group(1)), float(packed.group(2))
    # Best-fit decreasing on ~20-token samples leaves less than one micro-batch's budget unused in all (the last
    # micro-batch takes what is left): no fewer micro-batches could hold the epoch.
    assert (1 - fill_percent / 100) * num_bins * 512 < 512, (num_bins, fill_percent)
    losses = [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]
    assert [step for step, _ in losses] == list(range(1, math.ceil(num_bins / 2) + 1))
    assert all(math.isfinite(loss) for _, loss in losses)


def test_a_resumed_epoch_on_several_ranks_skips_that_epochs_micro_batches() -> None:
    # The loader of rank 0 of 2 in the epoch a run resumes in, wrapped as accelerate and the Trainer wrap it:
    # SkipBatchSampler(BatchSamplerShard(ours)). The Trainer's set_epoch looks one level down only.
    lengths = [int(n) for n in torch.randint(8, 200, (300,), generator=torch.Generator().manual_seed(5))]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=512, seed=2)
    skipped = 3
    resumed = SkipBatchSampler(BatchSamplerShard(sampler, num_processes=2, process_index=0), skip_batches=skipped)
    assert not hasattr(resumed.batch_sampler, "set_epoch")  # so only the callback can reach the sampler
    expected = epoch_bins(TokenBudgetBatchSampler(lengths, max_tokens=512, seed=2), 1)[0::2][skipped:]
    assert list(resumed) != expected  # still epoch 0's order: the bug the callback fixes
    state = TrainerState()
    state.epoch = 1.37  # loaded from the checkpoint, before the epoch's loader is iterated
    SamplerEpochCallback(sampler).on_epoch_begin(None, state, TrainerControl())
    assert list(resumed) == expected
