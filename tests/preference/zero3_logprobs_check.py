"""The chunked sequence log-probabilities inside a ZeRO-3 model on 2 CPU ranks: one SGD step against one process.

Run by tests/preference/test_zero3_logprobs.py under the DeepSpeed launcher:

    python -m deepspeed.launcher.runner --num_gpus 2 tests/preference/zero3_logprobs_check.py --out result.json

Each rank scores its own rows through `summed_label_logprobs` (the tiny Qwen2's head weight is partitioned and tied
to the embeddings, so it exists only inside the head's forward and again before the backward, which recomputes the
logits) and steps on `sum_r upstream_r * logprob_r`; with SGD at lr 1 and no clipping the update is minus the gradient
averaged over the ranks, compared with the float64 full-logits gradient of one process. A frozen reference model, a
ZeRO-3 engine of its own (`dft.reference.FrozenCopy`), gives its no-gradient sums through `reference_label_logprobs`.
Rank 0 writes the comparison as JSON; the test judges it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from cluster.distributed import init_deepspeed_distributed
from core.keys import IGNORE_INDEX
from dft.reference import FrozenCopy, zero3_inference_config
from preference.logprobs import reference_label_logprobs, summed_label_logprobs
from tests.helpers import VOCAB, float32_bound, relative_error, tiny_qwen2, update_tolerance_ratio

SEED, REFERENCE_SEED, ROWS, SEQ = 0, 5, 2, 10
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "zero_allow_untested_optimizer": True,
    # DeepSpeed clips the gradient norm to 1.0 unless told otherwise (GRADIENT_CLIPPING_DEFAULT, 0.19.8): left on, it
    # scaled every parameter's update by 1 / 14.4 here (the gradient's norm), 0.93 relative error everywhere.
    "gradient_clipping": 0.0,
    "train_micro_batch_size_per_gpu": ROWS,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 1000000,
}


def batch(rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A rank's rows: inputs, labels on the part after a 3-token prompt (rank 1's second row has none), upstream."""
    generator = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    if rank == 1:
        labels[1] = IGNORE_INDEX  # a row with nothing to score
    upstream = torch.randn(ROWS, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, labels, upstream


def full_logits_logprobs(model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(model(**inputs).logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    return (log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != IGNORE_INDEX)).sum(1)


def expected(world: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """float64, one process: the rank-averaged gradient, and each rank's policy and reference sums."""
    model, reference = tiny_qwen2(SEED).double(), tiny_qwen2(REFERENCE_SEED).double()
    policy_sums, reference_sums = [], []
    for rank in range(world):
        inputs, labels, upstream = batch(rank)
        logprobs = full_logits_logprobs(model, inputs, labels)
        ((logprobs * upstream.double()).sum() / world).backward()
        policy_sums.append(logprobs.detach())
        with torch.no_grad():
            reference_sums.append(full_logits_logprobs(reference, inputs, labels))
    return {name: p.grad for name, p in model.named_parameters()}, policy_sums, reference_sums


# The float32 gradient, reduced over 2 ranks, against the float64 one: relative in norm within 4 * eps * sqrt(300)
# (float32 rounding over the longest reduction, the softmax over the 300-entry vocabulary).
GRADIENT_BOUND = float32_bound(VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the DeepSpeed launcher
    cli = parser.parse_args()
    torch.set_num_threads(1)
    init_deepspeed_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    gradients, policy_sums, reference_sums = expected(world)

    model = tiny_qwen2(SEED)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=ZERO3)
    assert engine.gradient_clipping() == 0.0, engine.gradient_clipping()
    reference_model = tiny_qwen2(REFERENCE_SEED)
    reference_engine, *_ = deepspeed.initialize(
        model=reference_model, config=zero3_inference_config(ZERO3, reference_model.config.hidden_size)
    )
    reference = FrozenCopy(reference_model, reference_engine)

    inputs, labels, upstream = batch(rank)
    reference_logprobs = reference_label_logprobs(reference, inputs, labels, chunk_size=3)
    with summed_label_logprobs(model, labels, chunk_size=3) as head:
        engine(**inputs)
    logprobs = head.logprobs
    engine.backward((logprobs * upstream).sum())
    engine.step()
    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        update = {name: (p.detach() - before[name]).clone() for name, p in params}
    # SGD with lr 1: update = -gradient.
    ratios = {
        name: update_tolerance_ratio(update[name], gradients[name], before[name], GRADIENT_BOUND) for name in update
    }
    errors = {name: relative_error(-update[name], gradients[name]) for name in update}
    report = {
        "world_size": world,
        "rank_logprobs_error": relative_error(logprobs.detach(), policy_sums[rank]),
        "rank_reference_error": relative_error(reference_logprobs, reference_sums[rank]),
        "reference_requires_grad": reference_logprobs.requires_grad,
        "max_tolerance_ratio": max(ratios.values()),
        "worst_parameter": max(ratios, key=ratios.get),
        "max_update_relative_error": max(errors.values()),
        "worst_relative_parameter": max(errors, key=errors.get),
        "update_norm": float(torch.stack([u.double().norm() for u in update.values()]).norm()),
        "gradient_norm": float(torch.stack([g.norm() for g in gradients.values()]).norm()),
        "num_parameters": len(ratios),
        "all_moved": all(bool(u.abs().sum() > 0) for u in update.values()),
    }
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        cli.out.write_text(json.dumps(reports, indent=2))
    # Without the barrier about 1 run in 12 aborted at exit (FACTS.md).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
