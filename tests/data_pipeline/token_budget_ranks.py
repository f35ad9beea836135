"""Run under `torchrun --nproc_per_node 2`: which samples each rank's token-budget micro-batches hold, per epoch.

Builds the DFT Trainer with token-budget micro-batches (`tests.helpers.PackedTrainer`) on CPU ranks (gloo) with a
`TokenBudgetBatchSampler`, takes its training loader as `Trainer.train` does (`get_train_dataloader`, then
`set_epoch` on the loader and on the sampler inside accelerate's `BatchSamplerShard`), and writes
`<out>/rank<N>.json`: per epoch, the list of micro-batches, each the sample ids read back from the packed row
(every sample's first token is its id) and its token count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from data_pipeline.packing import PaddingFreeCollator, TokenBudgetBatchSampler, sample_lengths
from tests.helpers import TOKEN_BUDGET_EPOCHS, PackedTrainer, tiny_qwen2, token_budget_samples, training_args


def main(out_dir: Path, count: int, max_tokens: int, max_length: int) -> None:
    args = training_args(out_dir, seed=7)
    dataset = token_budget_samples(count, max_length)
    trainer = PackedTrainer(
        model=tiny_qwen2(),
        args=args,
        train_dataset=dataset,
        data_collator=PaddingFreeCollator(),
        train_batch_sampler=TokenBudgetBatchSampler(sample_lengths(dataset), max_tokens, seed=args.seed),
    )
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(TOKEN_BUDGET_EPOCHS):
        # As Trainer._inner_training_loop does before each epoch.
        loader.set_epoch(epoch)
        loader.batch_sampler.batch_sampler.set_epoch(epoch)
        batches = []
        for batch in loader:
            starts = batch["position_ids"][0] == 0
            batches.append({"ids": batch["input_ids"][0][starts].tolist(), "tokens": batch["input_ids"].numel()})
        epochs.append(batches)
    rank = dist.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"world": dist.get_world_size(), "epochs": epochs}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
