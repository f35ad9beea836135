"""dft_loss against an independent float64 reference, HF's cross-entropy, and a hand-worked case."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from core.keys import IGNORE_INDEX
from dft.loss import dft_loss


def reference_dft(logits: torch.Tensor, labels: torch.Tensor, alpha: float, denominator: float | None = None):
    """Token by token in float64, written from the definition, sharing no code with dft.loss."""
    logits = logits.double()
    total, count = logits.new_zeros(()), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            log_probs = torch.log_softmax(logits[b, t], dim=-1)
            p = log_probs[target].exp().detach()
            total = total - (alpha * p + 1 - alpha) * log_probs[target]
            count += 1
    return total / (denominator if denominator is not None else max(count, 1))


def random_batch(seed: int, batch: int = 3, seq: int = 7, vocab: int = 11, ignore_share: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignore_share] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference_values_and_gradients(alpha: float, seed: int) -> None:
    logits, labels = random_batch(seed)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.double().clone().requires_grad_()
    loss, stats = dft_loss(ours_in, labels, alpha)
    expected = reference_dft(ref_in, labels, alpha)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-7)
    assert int(stats.num_tokens) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_alpha_zero_is_hf_cross_entropy_with_gradients() -> None:
    logits, labels = random_batch(3)
    ours_in, hf_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    num_items = int((labels[:, 1:] != IGNORE_INDEX).sum())
    ours, _ = dft_loss(ours_in, labels, alpha=0.0, num_items_in_batch=torch.tensor(num_items))
    hf = ForCausalLMLoss(hf_in, labels, vocab_size=logits.shape[-1], num_items_in_batch=torch.tensor(num_items))
    ours.backward()
    hf.backward()
    torch.testing.assert_close(ours, hf)
    torch.testing.assert_close(ours_in.grad, hf_in.grad)


def test_hand_worked_uniform_logits() -> None:
    # Uniform logits over 2 classes: p = 1/2, CE = log 2, so DFT (alpha=1) = p * CE = log(2) / 2 per token.
    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss, stats = dft_loss(logits, labels, alpha=1.0)
    assert loss.item() == pytest.approx(math.log(2) / 2)
    assert stats.sum_nll.item() == pytest.approx(2 * math.log(2))
    assert stats.sum_p_correct.item() == pytest.approx(1.0)


def test_weight_is_not_differentiated() -> None:
    # If p were differentiated the gradient would be that of -p*log(p), which is zero at p = 1/e.
    # With a detached weight it is p * d(CE): at p = 1/e it is (1/e) * (softmax - onehot) != 0.
    logits = torch.tensor([[[0.0, math.log(math.e - 1)]]]).repeat(1, 2, 1)
    logits.requires_grad_()
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    loss, stats = dft_loss(logits, labels, alpha=1.0)
    assert stats.sum_p_correct.item() == pytest.approx(1 / math.e, rel=1e-3)
    loss.backward()
    probs = torch.softmax(logits[0, 0].detach(), -1)
    expected = (1 / math.e) * (probs - torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(logits.grad[0, 0], expected, rtol=1e-3, atol=1e-6)


def test_empty_micro_batch_gives_connected_zero() -> None:
    logits, labels = random_batch(4)
    labels[:] = IGNORE_INDEX
    logits.requires_grad_()
    loss, stats = dft_loss(logits, labels, alpha=1.0, num_items_in_batch=torch.tensor(5))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0
    assert int(stats.num_tokens) == 0


def test_gradient_accumulation_split_does_not_change_the_update() -> None:
    # One batch of 4 = four micro-batches of 1 when every micro-batch divides by the step's token count.
    logits, labels = random_batch(5, batch=4, seq=9)
    num_items = (labels[:, 1:] != IGNORE_INDEX).sum()
    whole = logits.clone().requires_grad_()
    loss, _ = dft_loss(whole, labels, 1.0, num_items_in_batch=num_items)
    loss.backward()
    split = logits.clone().requires_grad_()
    accumulated = sum(
        dft_loss(split[i : i + 1], labels[i : i + 1], 1.0, num_items_in_batch=num_items)[0] for i in range(4)
    )
    accumulated.backward()
    torch.testing.assert_close(accumulated, loss)
    torch.testing.assert_close(split.grad, whole.grad)


def test_bf16_logits_accumulate_in_float32() -> None:
    logits, labels = random_batch(6)
    loss_bf16, _ = dft_loss(logits.bfloat16(), labels, 1.0)
    loss_fp32, _ = dft_loss(logits.bfloat16().float(), labels, 1.0)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss_fp32)
