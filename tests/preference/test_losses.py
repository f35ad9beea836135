"""The pairwise losses (`preference.losses`) against hand-worked cases, float64 and TRL 1.16's own code.

TRL's `RewardTrainer.compute_loss` and `DPOTrainer._compute_loss` are called unbound on the same batch, with the
minimal stand-ins they read (the trainer's attributes, the model outputs): the comparison runs TRL's formula, not a
copy of it, so a wrong sign, beta or margin here fails. Also: the step-level divisor (`num_pairs`) makes the update
independent of how a step's pairs are split.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.reward_trainer import RewardTrainer

from preference.losses import dpo_sigmoid_loss, pairwise_reward_loss
from tests.helpers import float32_bound, relative_error

PAIRS = 6
# float32 against float64 on a sum over 6 pairs of a few-flop term: 4 * eps * sqrt(6) = 1.2e-6 relative. A wrong
# beta (0.1 vs 0.2), sign or margin moves the loss by 5 % or more.
FLOAT32_BOUND = float32_bound(PAIRS)


def scores(seed: int, pairs: int = PAIRS, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(pairs, generator=generator) * scale for _ in range(4)]


class _Accelerator:
    """What TRL's loss code asks of the accelerator on one process: gathers are the identity."""

    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model: object) -> object:
        return model


def trainer_stand_in(**attributes: object) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def trl_reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, coefficient: float | None
) -> torch.Tensor:
    """TRL 1.16 `RewardTrainer.compute_loss` on a batch `[chosen; rejected]` whose model scores are given."""
    stand_in = trainer_stand_in(args=SimpleNamespace(center_rewards_coefficient=coefficient))
    rewards = torch.cat([chosen, rejected])[:, None]
    inputs = {"attention_mask": torch.ones(rewards.numel(), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(stand_in, lambda **_: SimpleNamespace(logits=rewards), inputs)


def trl_dpo_loss(policy_c, policy_r, reference_c, reference_r, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL 1.16 `DPOTrainer._compute_loss` (`loss_type="sigmoid"`, its default) on the four summed log-probabilities.

    The model output gives each sequence's summed log-probability as one token (a completion of one label token:
    `completion_mask[:, 1:]` is all ones), and the reference's come precomputed, as TRL's `precompute_ref_log_probs`
    passes them."""
    pairs = policy_c.numel()
    stand_in = trainer_stand_in(
        beta=beta,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        use_weighting=False,
    )
    sequences = torch.cat([policy_c, policy_r])[:, None]
    outputs = SimpleNamespace(
        log_probs=sequences,
        entropy=torch.zeros_like(sequences),
        mean_logits=torch.zeros_like(sequences),
        is_top1=torch.zeros_like(sequences, dtype=torch.bool),
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, 2, dtype=torch.long),
        "completion_mask": torch.ones(2 * pairs, 2, dtype=torch.long),
        "ref_chosen_logps": reference_c,
        "ref_rejected_logps": reference_r,
    }
    loss = DPOTrainer._compute_loss(stand_in, lambda **_: outputs, inputs, return_outputs=False)
    return loss, stand_in._metrics["train"]


# --- Reward model ---------------------------------------------------------------------------------------------------


def test_reward_loss_hand_worked() -> None:
    # Equal scores: -log sigmoid(0) = log 2 per pair. A chosen score ahead by log 3: sigmoid = 3/4, loss log(4/3).
    # With margin log 3 the second pair is back at log 2. Centring with coefficient 0.5: + 0.5 * mean((c + r)^2).
    chosen, rejected = torch.tensor([1.0, math.log(3.0)]), torch.tensor([1.0, 0.0])
    assert pairwise_reward_loss(chosen, rejected).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert pairwise_reward_loss(chosen, rejected, margin=math.log(3.0)).item() == pytest.approx(
        (-math.log(1 / (1 + 3.0)) + math.log(2)) / 2  # first pair: sigmoid(-log 3) = 1/4
    )
    centred = pairwise_reward_loss(chosen, rejected, center_rewards_coefficient=0.5).item()
    assert centred == pytest.approx((math.log(2) + math.log(4 / 3)) / 2 + 0.5 * (4.0 + math.log(3.0) ** 2) / 2)


@pytest.mark.parametrize("margin", [None, "per_pair", 0.3])
@pytest.mark.parametrize("coefficient", [None, 0.01])
def test_reward_loss_is_trls(margin: str | float | None, coefficient: float | None) -> None:
    chosen, rejected, margins, _ = scores(1, scale=2.0)
    margin_value = margins.abs() if margin == "per_pair" else margin
    ours = pairwise_reward_loss(chosen, rejected, 0.0 if margin_value is None else margin_value, coefficient)
    margin_tensor = torch.full_like(chosen, margin_value) if isinstance(margin_value, float) else margin_value
    theirs = trl_reward_loss(chosen, rejected, margin_tensor, coefficient)
    assert relative_error(ours, theirs) <= FLOAT32_BOUND
    # float64 from the definition
    c, r = chosen.double(), rejected.double()
    m = torch.zeros_like(c) if margin_tensor is None else margin_tensor.double()
    expected = -F.logsigmoid(c - r - m).mean() + (coefficient or 0.0) * ((c + r) ** 2).mean()
    assert relative_error(ours, expected) <= FLOAT32_BOUND


def test_reward_loss_gradient() -> None:
    chosen, rejected, _, _ = scores(2)
    c, r = chosen.double().requires_grad_(), rejected.double().requires_grad_()
    pairwise_reward_loss(c, r, center_rewards_coefficient=0.1).backward()
    # d/dc [-log sigmoid(c - r)] = -(1 - sigmoid(c - r)); d/dc 0.1 (c + r)^2 = 0.2 (c + r); both over N pairs.
    sigma = torch.sigmoid(chosen.double() - rejected.double())
    centre = 0.2 * (chosen.double() + rejected.double())
    torch.testing.assert_close(c.grad, (-(1 - sigma) + centre) / PAIRS)
    torch.testing.assert_close(r.grad, ((1 - sigma) + centre) / PAIRS)


# --- DPO ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_rewards_are_trls(beta: float) -> None:
    policy_c, policy_r, reference_c, reference_r = scores(3, scale=5.0)
    loss, chosen_rewards, rejected_rewards = dpo_sigmoid_loss(policy_c, policy_r, reference_c, reference_r, beta)
    theirs, metrics = trl_dpo_loss(policy_c, policy_r, reference_c, reference_r, beta)
    assert relative_error(loss, theirs) <= FLOAT32_BOUND
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=FLOAT32_BOUND)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=FLOAT32_BOUND)
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    assert accuracy == metrics["rewards/accuracies"][0]
    # A wrong beta is seen: the other beta's loss differs by far more than the bound.
    other, _ = trl_dpo_loss(policy_c, policy_r, reference_c, reference_r, 0.3)
    assert relative_error(loss, other) > 0.05


def test_dpo_loss_float64_and_gradient() -> None:
    policy_c, policy_r, reference_c, reference_r = (s.double() for s in scores(4, scale=3.0))
    beta = 0.2
    pc, pr = policy_c.clone().requires_grad_(), policy_r.clone().requires_grad_()
    rc, rr = reference_c.clone().requires_grad_(), reference_r.clone().requires_grad_()
    loss, chosen_rewards, rejected_rewards = dpo_sigmoid_loss(pc, pr, rc, rr, beta)
    loss.backward()
    z = beta * ((policy_c - reference_c) - (policy_r - reference_r))
    torch.testing.assert_close(loss, -F.logsigmoid(z).mean())
    torch.testing.assert_close(chosen_rewards, beta * (policy_c - reference_c))
    torch.testing.assert_close(rejected_rewards, beta * (policy_r - reference_r))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    # d loss / d pc = -beta (1 - sigmoid(z)) / N: the policy is pushed up on chosen, down on rejected.
    torch.testing.assert_close(pc.grad, -beta * (1 - torch.sigmoid(z)) / PAIRS)
    torch.testing.assert_close(pr.grad, beta * (1 - torch.sigmoid(z)) / PAIRS)
    assert rc.grad is None and rr.grad is None  # the reference is frozen


def test_hand_worked_dpo() -> None:
    # Policy equal to the reference: every log-ratio 0, loss log 2, rewards 0.
    zeros = torch.zeros(2)
    loss, chosen_rewards, _ = dpo_sigmoid_loss(zeros, zeros, zeros, zeros, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and chosen_rewards.abs().max() == 0
    # Chosen log-ratio ahead by 10 nats at beta 0.1: -log sigmoid(1).
    loss, _, _ = dpo_sigmoid_loss(
        torch.tensor([-5.0]), torch.tensor([-20.0]), torch.tensor([-10.0]), torch.tensor([-15.0]), 0.1
    )
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))


@pytest.mark.parametrize("loss_name", ["reward", "dpo"])
def test_split_into_micro_batches_gives_the_same_update(loss_name: str) -> None:
    """Gradient accumulation: with `num_pairs` the step's pair count, the micro-batches' losses add up to the
    whole batch's, and so do their gradients (1 x 6 = 2 + 4 pairs)."""
    policy_c, policy_r, reference_c, reference_r = scores(5)

    def loss_of(index: slice, num_pairs: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = policy_c[index].double().requires_grad_()
        if loss_name == "reward":
            loss = pairwise_reward_loss(c, policy_r[index].double(), 0.1, 0.05, num_pairs=num_pairs)
        else:
            parts = (c, policy_r[index].double(), reference_c[index].double(), reference_r[index].double())
            loss = dpo_sigmoid_loss(*parts, beta=0.1, num_pairs=num_pairs)[0]
        loss.backward()
        return loss.detach(), c.grad

    whole, whole_grad = loss_of(slice(None), None)
    first, first_grad = loss_of(slice(0, 2), PAIRS)
    second, second_grad = loss_of(slice(2, None), torch.tensor(PAIRS))
    torch.testing.assert_close(first + second, whole)
    torch.testing.assert_close(torch.cat([first_grad, second_grad]), whole_grad)


def test_scores_must_be_one_per_pair() -> None:
    with pytest.raises(ValueError, match="one score per pair"):
        pairwise_reward_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="one score per pair"):
        dpo_sigmoid_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), 0.1)
    # An empty batch (every pair of this rank truncated away) is a zero, not 0/0.
    assert pairwise_reward_loss(torch.zeros(0), torch.zeros(0)).item() == 0.0
