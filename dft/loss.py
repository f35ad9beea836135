"""DFT loss as pure functions.

Dynamic Fine-Tuning re-weights each trainable token's cross-entropy by the
model's own detached probability of the correct token:

    loss = sum_t CE_t * w_t / N,   w_t = alpha * p_t + (1 - alpha),   p_t = exp(-CE_t)

with a stop-gradient on `w_t`. `alpha=1` is the paper's DFT, `alpha=0` is
plain SFT cross-entropy. `p_t = exp(-CE_t)` needs no second softmax over the
vocabulary. `N` is the number of trainable tokens of the whole optimizer step
(`num_items_in_batch`, summed over gradient-accumulation micro-batches and
ranks by the Trainer) so that the update does not depend on how a step is
split; without it, the micro-batch's own count is used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class DFTStats(NamedTuple):
    """Detached sums over the valid tokens of one micro-batch: reduce sums and counts, then divide."""

    sum_p_correct: torch.Tensor
    sum_nll: torch.Tensor
    num_tokens: torch.Tensor


def dft_token_weights(nll: torch.Tensor, alpha: float) -> torch.Tensor:
    """`alpha * p + (1 - alpha)` with `p = exp(-nll)`, detached: the weight is not differentiated."""
    return (alpha * torch.exp(-nll) + (1.0 - alpha)).detach()


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned with input ids (HF convention) -> the target of each position's logits."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def dft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, DFTStats]:
    """Reference DFT loss on full logits.

    Args:
        logits: `[batch, seq, vocab]` in any float dtype; computed in float32.
        labels: `[batch, seq]`, aligned with the input ids; shifted here.
        alpha: weight of the probability term; 0 gives cross-entropy.
        ignore_index: label value of tokens that are not trained.
        num_items_in_batch: denominator; the count of valid tokens when None.

    Returns:
        The scalar loss and the micro-batch's `DFTStats`. With no valid token the
        loss is a zero still connected to the graph, so every parameter gets a
        (zero) gradient and sharded optimizers stay in step.
    """
    targets = shift_labels(labels, ignore_index).reshape(-1)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets, ignore_index=ignore_index, reduction="none"
    )
    valid = targets != ignore_index
    weighted_sum = (nll * dft_token_weights(nll, alpha) * valid).sum()
    num_valid = valid.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else num_valid.clamp(min=1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(weighted_sum.device)
    stats = DFTStats(
        sum_p_correct=(torch.exp(-nll.detach()) * valid).sum(),
        sum_nll=(nll.detach() * valid).sum(),
        num_tokens=num_valid,
    )
    return weighted_sum / denominator, stats
