"""The training loader for token-budget micro-batches (`data.packing_max_tokens`), as a Trainer mixin.

`TokenBudgetLoaderMixin` goes before `transformers.Trainer` in a Trainer's bases. Given a
`train_batch_sampler` (a `TokenBudgetBatchSampler`), the training micro-batches are the sampler's lists of sample
indices instead of `per_device_train_batch_size` random samples, and the sampler is told each epoch's number
(`SamplerEpochCallback`). Without one the stock loader runs.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import datasets
import torch
from transformers.trainer_utils import seed_worker

from data_pipeline.packing import SamplerEpochCallback, TokenBudgetBatchSampler, sample_lengths

logger = logging.getLogger(__name__)


def token_budget_sampler(
    train_set: datasets.Dataset, max_tokens: int | None, seed: int
) -> TokenBudgetBatchSampler | None:
    """The sampler for `data.packing_max_tokens` (None when it is off), shuffled by `seed`."""
    if max_tokens is None:
        return None
    return TokenBudgetBatchSampler(sample_lengths(train_set), max_tokens, seed)


class TokenBudgetLoaderMixin:
    """Trainer mixin: training micro-batches from `train_batch_sampler` when one is given (keyword argument)."""

    def __init__(
        self, *args: Any, train_batch_sampler: torch.utils.data.Sampler[list[int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_batch_sampler = train_batch_sampler
        if train_batch_sampler is not None:
            self.add_callback(SamplerEpochCallback(train_batch_sampler))

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The stock training loader, or one whose micro-batches come from `train_batch_sampler` when it is set.

        The sampler is not rank-aware: `accelerator.prepare` wraps it in accelerate's `BatchSamplerShard`, which
        gives rank `r` micro-batches `r, r + W, ...` of each epoch, and with `even_batches` (the default) lets the
        ranks left one short at the end repeat the epoch's first micro-batches, so every rank runs as many forward
        and backward passes as the others. The Trainer counts `num_items_in_batch` from the labels of the micro-batches
        it actually draws, so the loss normalisation stays exact whatever their sizes.
        """
        sampler = self.train_batch_sampler
        if sampler is None:
            return super().get_train_dataloader()
        world = self.accelerator.num_processes
        if world > 1 and not self.accelerator.even_batches:
            raise ValueError(
                "data.packing_max_tokens needs accelerate's even_batches=true (training.accelerator_config): "
                "otherwise ranks run different numbers of micro-batches and the collectives hang"
            )
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        num_batches = len(sampler)
        repeated = -num_batches % world
        logger.info(
            "Training micro-batches from %s: %d per epoch, %d per rank over %d rank(s)%s",
            type(sampler).__name__,
            num_batches,
            -(-num_batches // world),
            world,
            f"; {repeated} rank(s) repeat one of the epoch's first micro-batches to match the others"
            if repeated
            else "",
        )
        return self.accelerator.prepare(loader)
