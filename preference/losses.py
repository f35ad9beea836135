"""The pairwise losses of preference training, as pure functions of per-pair scores.

- `pairwise_reward_loss`: a reward model's Bradley-Terry loss `-log sigmoid(r_chosen - r_rejected - margin)`, with
  TRL `RewardTrainer`'s optional `center_rewards_coefficient * (r_chosen + r_rejected)^2` term.
- `dpo_sigmoid_loss`: DPO's sigmoid loss on the summed log-probabilities of the policy and the frozen reference
  (`preference.logprobs`), and the implicit rewards `beta * (log pi - log pi_ref)`.

Normalisation: both are a sum over the pairs divided by `num_pairs`, the number of pairs of the whole optimizer step
(over gradient-accumulation micro-batches and ranks, as the SFT loss divides by `num_items_in_batch`), so an update
does not depend on how the step is split. Without `num_pairs` the divisor is this batch's own pair count: TRL's
per-batch mean, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_denominator(num_batch_pairs: int, num_pairs: torch.Tensor | int | None) -> torch.Tensor | int:
    """The step's pair count when given, else the batch's own (at least 1, so an empty batch gives 0, not 0/0)."""
    if num_pairs is None:
        return max(num_batch_pairs, 1)
    return num_pairs


def _check_pairs(**scores: torch.Tensor) -> None:
    shapes = {name: tuple(score.shape) for name, score in scores.items()}
    if len(set(shapes.values())) != 1 or any(len(shape) != 1 for shape in shapes.values()):
        raise ValueError(f"expected one score per pair, [pairs] each: got {shapes}")


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    center_rewards_coefficient: float | None = None,
    num_pairs: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """A reward model's pairwise loss: `sum_i [-log sigmoid(r_c,i - r_r,i - m_i) + coef * (r_c,i + r_r,i)^2] / N`.

    With `num_pairs=None` this is TRL 1.16 `RewardTrainer.compute_loss` exactly: `-logsigmoid(r_c - r_r - margin)
    .mean()` plus `center_rewards_coefficient * mean((r_c + r_r)^2)` when the coefficient is set (Eisenstein et al.,
    2023: it keeps the rewards centred on 0 without changing their differences).

    Args:
        chosen_rewards: `[pairs]`, the scalar head's score of each chosen response.
        rejected_rewards: `[pairs]`, the score of the rejected response of the same pair.
        margin: the margin by which chosen must beat rejected: one number, or `[pairs]` (TRL's per-pair `margin`
            column, e.g. the difference of the two ratings).
        center_rewards_coefficient: weight of the centring term; None (or 0) for none.
        num_pairs: the divisor `N`: the pairs of the whole optimizer step; the batch's own count when None.

    Returns:
        The scalar loss, in the rewards' dtype.

    Raises:
        ValueError: when the rewards (or a per-pair margin) are not one score per pair.
    """
    _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if torch.is_tensor(margin) and margin.dim() > 0:
        _check_pairs(chosen_rewards=chosen_rewards, margin=margin)
    per_pair = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return per_pair.sum() / _pair_denominator(chosen_rewards.numel(), num_pairs)


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    num_pairs: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss (Rafailov et al., 2023): `sum_i -log sigmoid(beta * (log-ratio_c,i - log-ratio_r,i)) / N`.

    A log-ratio is `log pi(y | x) - log pi_ref(y | x)`, each the sum over the response's tokens. With `num_pairs=None`
    this is TRL 1.16 `DPOTrainer`'s `loss_type="sigmoid"` (its default, `f_divergence_type="reverse_kl"`, no label
    smoothing): the mean over the batch's pairs.

    Args:
        policy_chosen_logps, policy_rejected_logps: `[pairs]`, the trained model's summed log-probabilities of the
            chosen and rejected responses (`preference.logprobs.summed_label_logprobs`), with gradient.
        reference_chosen_logps, reference_rejected_logps: `[pairs]`, the frozen reference's (no gradient is taken).
        beta: the inverse temperature: how far from the reference the policy may move (TRL's default 0.1).
        num_pairs: the divisor `N`: the pairs of the whole optimizer step; the batch's own count when None.

    Returns:
        The scalar loss, and the detached implicit rewards `beta * (log pi - log pi_ref)` of the chosen and the
        rejected responses (`[pairs]` each: accuracy is `chosen > rejected`, the margin their difference).

    Raises:
        ValueError: when the four log-probabilities are not one per pair each.
    """
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - reference_rejected_logps.detach()
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    loss = losses.sum() / _pair_denominator(policy_chosen_logps.numel(), num_pairs)
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
