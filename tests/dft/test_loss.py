"""dft_loss against an independent float64 reference, HF's cross-entropy, and a hand-worked case."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from core.keys import IGNORE_INDEX
from dft.loss import dft_loss
from tests.helpers import float32_bound, relative_error

VOCAB = 11

# float32 rounding, relative in norm, of the loss and of the logits' gradient: it grows about as eps * sqrt(n) over a
# reduction of n terms, and the longest here is the loss's sum over the batch's 3 * 6 = 18 targets (each token's
# log-softmax reduces VOCAB = 11 terms). 4 * eps * sqrt(18) = 2.0e-6; measured at most 1.1e-7 with 1 or 2 threads. A
# wrong weight (alpha off by 0.001), a token dropped, or a gradient through the weight moves them by 1e-4 or more.
FLOAT32_BOUND = float32_bound(3 * 6)


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


def random_batch(seed: int, batch: int = 3, seq: int = 7, vocab: int = VOCAB, ignore_share: float = 0.3):
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
    assert relative_error(loss, expected) <= FLOAT32_BOUND, relative_error(loss, expected)
    assert relative_error(ours_in.grad, ref_in.grad) <= FLOAT32_BOUND, relative_error(ours_in.grad, ref_in.grad)
    assert int(stats.num_tokens) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_alpha_zero_is_hf_cross_entropy_with_gradients() -> None:
    logits, labels = random_batch(3)
    ours_in, hf_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    f64_in = logits.double().requires_grad_()
    num_items = int((labels[:, 1:] != IGNORE_INDEX).sum())
    ours, _ = dft_loss(ours_in, labels, alpha=0.0, num_items_in_batch=torch.tensor(num_items))
    hf = ForCausalLMLoss(hf_in, labels, vocab_size=logits.shape[-1], num_items_in_batch=torch.tensor(num_items))
    expected = reference_dft(f64_in, labels, alpha=0.0, denominator=num_items)
    for value in (ours, hf, expected):
        value.backward()
    # Both float32 paths within float32 rounding of the float64 cross-entropy (FLOAT32_BOUND), so of each other.
    for name, loss, grad in (("dft_loss", ours, ours_in.grad), ("HF", hf, hf_in.grad)):
        assert relative_error(loss, expected) <= FLOAT32_BOUND, (name, relative_error(loss, expected))
        assert relative_error(grad, f64_in.grad) <= FLOAT32_BOUND, (name, relative_error(grad, f64_in.grad))


def test_hand_worked_uniform_logits() -> None:
    # Uniform logits over 2 classes: p = 1/2, CE = log 2, so DFT (alpha=1) = p * CE = log(2) / 2 per token.
    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss, stats = dft_loss(logits, labels, alpha=1.0)
    # A few float32 roundings each (a 2-term log-sum-exp, a product, a 2-term sum, a division): 4 * eps * sqrt(2).
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=float32_bound(2), abs=0)
    assert stats.sum_nll.item() == pytest.approx(2 * math.log(2), rel=float32_bound(2), abs=0)
    assert stats.sum_p_correct.item() == pytest.approx(1.0, rel=float32_bound(2), abs=0)


def test_weight_is_not_differentiated() -> None:
    # If p were differentiated the gradient would be that of -p*log(p), which is zero at p = 1/e.
    # With a detached weight it is p * d(CE): at p = 1/e it is (1/e) * (softmax - onehot) != 0.
    logits = torch.tensor([[[0.0, math.log(math.e - 1)]]]).repeat(1, 2, 1)
    logits.requires_grad_()
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    loss, stats = dft_loss(logits, labels, alpha=1.0)
    # float32 rounding of log(e - 1) and of a 2-term softmax: 4 * eps * sqrt(2) = 6.7e-7 relative. The gradient of
    # -p*log(p) would be zero here: an error of 100 %, not of 1e-6.
    assert stats.sum_p_correct.item() == pytest.approx(1 / math.e, rel=float32_bound(2), abs=0)
    loss.backward()
    probs = torch.softmax(logits[0, 0].detach().double(), -1)
    expected = (1 / math.e) * (probs - torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert relative_error(logits.grad[0, 0], expected) <= float32_bound(2), relative_error(logits.grad[0, 0], expected)


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
    f64_in = logits.double().requires_grad_()
    expected = reference_dft(f64_in, labels, 1.0, denominator=int(num_items))
    expected.backward()
    whole = logits.clone().requires_grad_()
    loss, _ = dft_loss(whole, labels, 1.0, num_items_in_batch=num_items)
    loss.backward()
    split = logits.clone().requires_grad_()
    accumulated = sum(
        dft_loss(split[i : i + 1], labels[i : i + 1], 1.0, num_items_in_batch=num_items)[0] for i in range(4)
    )
    accumulated.backward()
    # The whole batch and its split, each within float32 rounding of the float64 loss: n = 4 * 8 = 32 targets,
    # 4 * eps * sqrt(32) = 2.7e-6 (measured at most 1.2e-7). A split that divided each micro-batch by its own token
    # count instead would be off by 10 % or more.
    bound = float32_bound(4 * 8)
    for name, value, grad in (("whole", loss, whole.grad), ("split", accumulated, split.grad)):
        assert relative_error(value, expected) <= bound, (name, relative_error(value, expected))
        assert relative_error(grad, f64_in.grad) <= bound, (name, relative_error(grad, f64_in.grad))


def test_bf16_logits_accumulate_in_float32() -> None:
    logits, labels = random_batch(6)
    loss_bf16, _ = dft_loss(logits.bfloat16(), labels, 1.0)
    loss_fp32, _ = dft_loss(logits.bfloat16().float(), labels, 1.0)
    assert loss_bf16.dtype == torch.float32
    # The same float32 values through the same float32 operations in the same process: equal bit for bit.
    assert torch.equal(loss_bf16, loss_fp32)
