"""Padding-free packing: the samples of a micro-batch concatenated into one row, each attending only to itself.

`data.packing=true` swaps the padding collator for `PaddingFreeCollator`, a `DataCollatorWithFlattening`
(transformers) that writes the micro-batch as one `[1, total_tokens]` row with no padding token:

- `position_ids` restart at 0 for every sample. With no `attention_mask`, transformers' mask builder
  (`masking_utils._preprocess_mask_arguments`, 5.x) reads the restarts as sample boundaries and builds a
  block-diagonal causal mask for sdpa, eager and flex attention; FlashAttention-2 takes the same boundaries
  through its variable-length path. No token attends to another sample.
- The first label of every sample becomes `IGNORE_INDEX`: after the loss's shift, the last token of one
  sample is never trained to predict the first token of the next. The number of trainable tokens (over
  `labels[..., 1:]`) is unchanged, so the DFT normalisation by `num_items_in_batch` stays exact.
- `use_cache=False` is passed to the model: the mask builder looks for packed samples only when no KV cache
  is given, and a model whose config has `use_cache=True` (the Trainer sets it from `training.use_cache`)
  makes itself an empty cache in its forward, which silently lets each sample attend to those before it.

Which samples share a micro-batch: by default `per_device_train_batch_size` samples in the Trainer's random order,
so a row's length varies as widely as the mix's lengths. With `data.packing_max_tokens`, `TokenBudgetBatchSampler`
packs the samples into micro-batches of at most that many tokens by best-fit decreasing, over 98% full on
SFT-like length mixes (`bench/packing_throughput.py`), so every step costs about the same memory and time.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow.compute
import torch
from torch.utils.data import Sampler
from transformers import DataCollatorWithFlattening, TrainerCallback, TrainerControl, TrainerState

from core.keys import IGNORE_INDEX, INPUT_IDS_KEY

USE_CACHE_KEY = "use_cache"
logger = logging.getLogger(__name__)


class PaddingFreeCollator(DataCollatorWithFlattening):
    """`DataCollatorWithFlattening` with `IGNORE_INDEX` between samples and the model's KV cache turned off."""

    def __init__(self, return_flash_attn_kwargs: bool = False) -> None:
        """Args:
        return_flash_attn_kwargs: also give FlashAttention-2's `cu_seq_lens_*`/`max_length_*` (it derives
            them from `position_ids` otherwise).
        """
        super().__init__(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=return_flash_attn_kwargs
        )

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        # Keep only what the flattened row needs: a per-sample attention_mask would switch packing detection off.
        features = [{key: f[key] for key in ("input_ids", "labels") if key in f} for f in features]
        batch = super().__call__(features, return_tensors=return_tensors)
        batch[USE_CACHE_KEY] = False
        return batch


def sample_lengths(dataset: Any) -> list[int]:
    """Tokens per sample (`len(input_ids)`); from a `datasets.Dataset`, read off its Arrow column without decoding."""
    if hasattr(dataset, "with_format") and INPUT_IDS_KEY in getattr(dataset, "column_names", ()):
        column = dataset.with_format("arrow")[INPUT_IDS_KEY]
        return pyarrow.compute.list_value_length(column).to_pylist()
    return [len(sample[INPUT_IDS_KEY]) for sample in dataset]


def pack_best_fit_decreasing(lengths: Sequence[int], max_tokens: int, order: Sequence[int]) -> list[list[int]]:
    """Groups of indices whose lengths sum to at most `max_tokens`, by best-fit decreasing bin packing.

    Samples are placed longest first, each into the open bin it fills most tightly (a new bin when none has room);
    `order` breaks ties between samples of equal length, so it changes which samples share a bin but not the number
    of bins or their loads. Best-fit decreasing uses at most `11/9 OPT + 6/9` bins (Dosa 2007); on SFT length mixes,
    many short samples fill the gaps the long ones leave, and every bin but the last few is full to a token or two.

    Args:
        lengths: tokens of each sample.
        max_tokens: the budget of one bin; every length must fit in it.
        order: a permutation of the sample indices, the tie-break.

    Returns:
        The bins, in the order they were opened (longest first sample first), each a list of sample indices.
    """
    by_length = sorted(order, key=lambda index: -lengths[index])  # stable: ties keep `order`
    bins: list[list[int]] = []
    # (room left, bin id) of the bins that still have room, sorted: the first entry with enough room fits tightest.
    open_bins: list[tuple[int, int]] = []
    for index in by_length:
        length = lengths[index]
        position = bisect.bisect_left(open_bins, (length, -1))
        if position == len(open_bins):
            bins.append([index])
            room, bin_id = max_tokens - length, len(bins) - 1
        else:
            room, bin_id = open_bins.pop(position)
            bins[bin_id].append(index)
            room -= length
        if room > 0:
            bisect.insort(open_bins, (room, bin_id))
    return bins


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of at most `max_tokens` tokens (`data.packing_max_tokens`), packed by best-fit decreasing.

    With `data.packing=true` a micro-batch is one row of its samples' total length, so a fixed number of samples per
    micro-batch gives rows as long as the luck of the draw on a length-skewed mix: memory spikes and uneven step
    times. This sampler fills each micro-batch up to a token budget instead: every micro-batch is about the same
    number of tokens, padding-free packing wastes nothing, and the budget is the only memory knob.

    Each epoch every sample appears in exactly one micro-batch. The bins are built from the lengths with ties broken
    by a permutation drawn from `seed + epoch`, and the bins are then shuffled with the same generator: deterministic
    given the seed, a new order every epoch (`set_epoch`, which the Trainer calls), and the same number of bins in
    every epoch (bins only differ by which of several equal-length samples they hold).

    It yields indices only, so any collator works on its micro-batches. It is not rank-aware: under several
    processes accelerate's `prepare` wraps it in `BatchSamplerShard` (`batch_size=None` marks micro-batches of
    varying size), which gives rank `r` micro-batches `r, r + W, ...` of the epoch, disjoint between ranks; with
    `even_batches` (the default) the ranks left one short at the end repeat the epoch's first micro-batches, so every
    rank runs the same number of forward and backward passes.
    """

    batch_size = None  # micro-batches of varying size: accelerate's BatchSamplerShard then shards whole batches
    drop_last = False

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0) -> None:
        """Args:
        lengths: tokens of each training sample, as `sample_lengths` gives them.
        max_tokens: the token budget of a micro-batch; at least the longest sample.
        seed: the shuffling seed (`training.seed`).

        Raises:
            ValueError: if a sample is longer than `max_tokens`, or there is no sample.
        """
        if len(lengths) == 0:
            raise ValueError("data.packing_max_tokens: the training set is empty, there is nothing to pack")
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > max_tokens:
            raise ValueError(
                f"data.packing_max_tokens={max_tokens} is smaller than training sample {longest} "
                f"({lengths[longest]} tokens): set it to at least data.max_length"
            )
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.seed = seed
        self.epoch = 0
        self.num_bins = len(self._bins(epoch=0))
        logger.info(
            "Packed %d samples (%d tokens) into %d micro-batches of at most %d tokens: %.2f%% of the budget used",
            len(self.lengths),
            sum(self.lengths),
            self.num_bins,
            max_tokens,
            100 * self.fill_rate,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bins(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        bins = pack_best_fit_decreasing(self.lengths, self.max_tokens, order)
        return [bins[i] for i in torch.randperm(len(bins), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._bins(self.epoch)

    def __len__(self) -> int:
        return self.num_bins

    @property
    def fill_rate(self) -> float:
        """Tokens over budget summed over all micro-batches: `1 - fill_rate` is the budget left unused."""
        return sum(self.lengths) / (self.num_bins * self.max_tokens)


class SamplerEpochCallback(TrainerCallback):
    """Tells a batch sampler the epoch at each epoch's start, the resumed one included.

    The Trainer's own `set_epoch` reaches a batch sampler only through one wrapper: on several ranks, in the
    epoch a run resumes in, the sampler sits under accelerate's `SkipBatchSampler` and `BatchSamplerShard` and
    would keep epoch 0's order, so the skipped micro-batches would not be the ones already trained on.
    `on_epoch_begin` runs before the epoch's loader is iterated, with the state loaded from the checkpoint.
    """

    def __init__(self, sampler: TokenBudgetBatchSampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # state.epoch counts fractions of an epoch (a run resumed at 1.37 is in epoch 1), summed in floats.
        self.sampler.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))
