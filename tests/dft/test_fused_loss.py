"""fused_dft_loss against the full-logits reference `dft_loss` and an independent float64 computation.

Values and gradients (hidden states, LM-head weight, bias), chunking, ignored tokens, soft-cap, bf16, the empty
micro-batch, gradient-accumulation invariance, and that no full `[tokens, vocab]` block is ever allocated.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from core.keys import IGNORE_INDEX
from dft.loss import dft_loss, fused_dft_loss
from tests.helpers import leaves, num_valid, random_inputs


def float64_dft(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    denominator: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss from its definition in float64, sharing no code with dft.loss."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    log_p = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[valid]
    weights = alpha * log_p.detach().exp() + (1 - alpha)
    return -(weights * log_p).sum() / (denominator if denominator is not None else max(int(valid.sum()), 1))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_matches_reference_and_float64_values_and_gradients(alpha: float, chunk_size: int) -> None:
    hidden, weight, _, labels = random_inputs(0)
    tokens = num_valid(labels)
    # The chunk sizes must cover: smaller and not dividing the token count, and larger than it.
    assert tokens % 3 != 0 and tokens % 4 != 0 and tokens < 64, tokens
    fused_h, fused_w = leaves(hidden, weight)
    ref_h, ref_w = leaves(hidden, weight)
    f64_h, f64_w = leaves(hidden.double(), weight.double())

    loss, stats = fused_dft_loss(fused_h, fused_w, labels, alpha, chunk_size=chunk_size)
    ref_loss, ref_stats = dft_loss(ref_h @ ref_w.T, labels, alpha)
    f64_loss = float64_dft(f64_h, f64_w, labels, alpha)
    for value in (loss, ref_loss, f64_loss):
        value.backward()

    assert loss.dtype == torch.float32 and loss.item() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), f64_loss, rtol=1e-5, atol=1e-6)
    for ours, ref, f64 in ((fused_h, ref_h, f64_h), (fused_w, ref_w, f64_w)):
        assert ours.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)
    assert stats.group_sums is None and ref_stats.group_sums is None  # no token_groups given
    for field in ("sum_p_correct", "sum_nll", "num_tokens"):
        ours, ref = getattr(stats, field), getattr(ref_stats, field)
        assert not ours.requires_grad
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ignored_tokens_are_skipped_and_get_zero_gradient() -> None:
    hidden, weight, _, labels = random_inputs(1, ignore_share=0.5)
    hidden.requires_grad_()
    loss, stats = fused_dft_loss(hidden, weight, labels, 1.0, chunk_size=3)
    loss.backward()
    # Position t predicts labels[t + 1]; the last position predicts nothing.
    trained = torch.zeros_like(labels, dtype=torch.bool)
    trained[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert 0 < int(trained.sum()) < trained.numel()
    assert torch.count_nonzero(hidden.grad[~trained]) == 0
    assert bool((hidden.grad[trained].abs().sum(-1) > 0).all())
    assert int(stats.num_tokens) == int(trained.sum())


@pytest.mark.parametrize("num_items", [torch.tensor(50), 50])
def test_num_items_in_batch_is_the_denominator(num_items: torch.Tensor | int) -> None:
    hidden, weight, _, labels = random_inputs(2)
    fused_h, fused_w = leaves(hidden, weight)
    f64_h, f64_w = leaves(hidden.double(), weight.double())
    loss, _ = fused_dft_loss(fused_h, fused_w, labels, 1.0, num_items_in_batch=num_items, chunk_size=4)
    expected = float64_dft(f64_h, f64_w, labels, 1.0, denominator=50)
    loss.backward()
    expected.backward()
    own_count, _ = fused_dft_loss(hidden, weight, labels, 1.0)
    assert loss.item() == pytest.approx(own_count.item() * num_valid(labels) / 50, rel=1e-5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused_h.grad.double(), f64_h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused_w.grad.double(), f64_w.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_softcap_and_bias(softcap: float | None, alpha: float) -> None:
    # Large weights so that the cap of 2 actually bends the logits.
    hidden, weight, bias, labels = random_inputs(3, scale=2.0)
    fused_h, fused_w, fused_b = leaves(hidden, weight, bias)
    ref_h, ref_w, ref_b = leaves(hidden, weight, bias)
    f64_h, f64_w, f64_b = leaves(hidden.double(), weight.double(), bias.double())

    loss, _ = fused_dft_loss(fused_h, fused_w, labels, alpha, chunk_size=4, logit_softcap=softcap, lm_head_bias=fused_b)
    ref_logits = ref_h @ ref_w.T + ref_b
    if softcap is not None:
        ref_logits = softcap * torch.tanh(ref_logits / softcap)
    ref_loss, _ = dft_loss(ref_logits, labels, alpha)
    f64_loss = float64_dft(f64_h, f64_w, labels, alpha, softcap=softcap, bias=f64_b)
    for value in (loss, ref_loss, f64_loss):
        value.backward()

    uncapped, _ = fused_dft_loss(hidden, weight, labels, alpha, lm_head_bias=bias)
    if softcap is not None:
        # The cap is exercised, not a no-op at this scale.
        assert abs(loss.item() - uncapped.item()) > 0.1 * uncapped.item()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), f64_loss, rtol=1e-5, atol=1e-6)
    for ours, ref, f64 in ((fused_h, ref_h, f64_h), (fused_w, ref_w, f64_w), (fused_b, ref_b, f64_b)):
        assert ours.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)


def test_bf16_inputs_accumulate_in_float32() -> None:
    hidden, weight, bias, labels = random_inputs(4, batch=4, seq=16)
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    fused_h, fused_w, fused_b = leaves(hidden, weight, bias)
    # Reference: the same bf16 values, everything else in float32.
    ref_h, ref_w, ref_b = leaves(hidden.float(), weight.float(), bias.float())
    loss, stats = fused_dft_loss(fused_h, fused_w, labels, 1.0, chunk_size=5, lm_head_bias=fused_b)
    ref_loss, ref_stats = dft_loss(ref_h @ ref_w.T + ref_b, labels, 1.0)
    loss.backward()
    ref_loss.backward()

    assert loss.dtype == torch.float32 and stats.sum_nll.dtype == torch.float32
    assert (fused_h.grad.dtype, fused_w.grad.dtype, fused_b.grad.dtype) == (torch.bfloat16,) * 3
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(stats.sum_nll, ref_stats.sum_nll, rtol=2e-2, atol=1e-2)
    for ours, ref in ((fused_h, ref_h), (fused_w, ref_w), (fused_b, ref_b)):
        assert torch.isfinite(ours.grad).all()
        torch.testing.assert_close(ours.grad.float(), ref.grad, rtol=3e-2, atol=2e-3)


def test_autocast_does_not_change_the_result() -> None:
    # Logits and their gradients are computed with autocast off, in the weight's dtype.
    hidden, weight, _, labels = random_inputs(5)
    plain_h, plain_w = leaves(hidden, weight)
    cast_h, cast_w = leaves(hidden, weight)
    plain, _ = fused_dft_loss(plain_h, plain_w, labels, 1.0, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = fused_dft_loss(cast_h, cast_w, labels, 1.0, chunk_size=4)
    plain.backward()
    under_autocast.backward()
    torch.testing.assert_close(under_autocast, plain)
    torch.testing.assert_close(cast_h.grad, plain_h.grad)
    torch.testing.assert_close(cast_w.grad, plain_w.grad)


@pytest.mark.parametrize("num_items", [None, torch.tensor(7)])
def test_empty_micro_batch_gives_connected_zero(num_items: torch.Tensor | None) -> None:
    hidden, weight, bias, labels = random_inputs(6)
    labels[:] = IGNORE_INDEX
    hidden, weight, bias = leaves(hidden, weight, bias)
    loss, stats = fused_dft_loss(hidden, weight, labels, 1.0, num_items_in_batch=num_items, lm_head_bias=bias)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for tensor in (hidden, weight, bias):
        assert tensor.grad is not None and tensor.grad.shape == tensor.shape
        assert torch.count_nonzero(tensor.grad) == 0
    assert int(stats.num_tokens) == 0 and stats.sum_nll.item() == 0.0 and stats.sum_p_correct.item() == 0.0


def test_gradient_accumulation_split_does_not_change_the_update() -> None:
    # One batch of 4 = four micro-batches of 1 when every micro-batch divides by the step's token count.
    hidden, weight, _, labels = random_inputs(7, batch=4, seq=11)
    num_items = torch.tensor(num_valid(labels))
    whole_h, whole_w = leaves(hidden, weight)
    loss, _ = fused_dft_loss(whole_h, whole_w, labels, 1.0, num_items_in_batch=num_items, chunk_size=6)
    loss.backward()
    split_h, split_w = leaves(hidden, weight)
    accumulated = torch.zeros(())
    for i in range(4):
        micro, _ = fused_dft_loss(
            split_h[i : i + 1], split_w, labels[i : i + 1], 1.0, num_items_in_batch=num_items, chunk_size=6
        )
        micro.backward()  # gradients add up in .grad, as under gradient accumulation
        accumulated += micro.detach()
    torch.testing.assert_close(accumulated, loss.detach())
    torch.testing.assert_close(split_h.grad, whole_h.grad)
    torch.testing.assert_close(split_w.grad, whole_w.grad, rtol=1e-5, atol=1e-6)


def test_hand_worked_uniform_logits() -> None:
    # A zero weight gives uniform logits over 2 classes: p = 1/2, CE = log 2, DFT (alpha=1) = log(2) / 2 per token.
    hidden = torch.randn(1, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss, stats = fused_dft_loss(hidden, torch.zeros(2, 4), labels, alpha=1.0, chunk_size=1)
    assert loss.item() == pytest.approx(math.log(2) / 2)
    assert stats.sum_nll.item() == pytest.approx(2 * math.log(2))
    assert stats.sum_p_correct.item() == pytest.approx(1.0)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("with_groups", [False, True], ids=["plain", "token_groups"])
def test_never_allocates_full_logits(with_groups: bool) -> None:
    batch, seq, hidden_size, vocab, chunk = 2, 64, 8, 301, 16
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    # Per-group statistics come from the per-token CE the chunk loop has anyway: no extra block either.
    groups = {"token_groups": torch.randint(0, 5, (batch, seq), generator=generator), "num_groups": 5}
    # Bound: one chunk of logits, the weight's gradient, or the hidden states' - far below tokens * vocab.
    bound = max(chunk * vocab, vocab * hidden_size, batch * seq * hidden_size)
    assert bound * 4 < num_valid(labels) * vocab
    with _LargestAllocation() as tracker:
        loss, stats = fused_dft_loss(hidden, weight, labels, 1.0, chunk_size=chunk, **(groups if with_groups else {}))
        loss.backward()
    assert 0 < tracker.largest <= bound
    if with_groups:
        assert stats.group_sums[:, -1].sum().item() == num_valid(labels)
    with _LargestAllocation() as naive:
        dft_loss(hidden @ weight.T, labels, 1.0)[0].backward()
    assert naive.largest >= num_valid(labels) * vocab  # the tracker sees a full-logits allocation when there is one


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"chunk_size": 0}, "chunk_size=0"), ({"logit_softcap": 0.0}, "logit_softcap=0.0")],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    hidden, weight, _, labels = random_inputs(9)
    with pytest.raises(ValueError, match=message):
        fused_dft_loss(hidden, weight, labels, 1.0, **kwargs)


def test_shape_mismatch_is_reported() -> None:
    hidden, weight, _, labels = random_inputs(9)
    with pytest.raises(ValueError, match="do not match"):
        fused_dft_loss(hidden, weight[:, :-1], labels, 1.0)


def test_no_gradient_work_without_autograd_and_one_backward_only() -> None:
    hidden, weight, _, labels = random_inputs(11)
    h, w = leaves(hidden, weight)
    with torch.no_grad():
        loss, _ = fused_dft_loss(h, w, labels, 1.0, chunk_size=4)
    assert not loss.requires_grad  # evaluation builds no graph and no gradient buffers
    loss, _ = fused_dft_loss(h, w, labels, 1.0, chunk_size=4)
    loss.backward(retain_graph=True)
    # The gradients are computed in the forward and scaled in place by the backward: a second pass would
    # scale them twice, so it must fail loudly rather than return wrong gradients.
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_large_logits_stay_finite_and_exact() -> None:
    # Logits in the hundreds: exp() of them overflows float32 unless the row maximum is taken out first.
    hidden, weight, _, labels = random_inputs(12, scale=60.0)
    fused_h, fused_w = leaves(hidden, weight)
    f64_h, f64_w = leaves(hidden.double(), weight.double())
    assert (hidden[0] @ weight.T).abs().max() > 200
    loss, _ = fused_dft_loss(fused_h, fused_w, labels, 0.5, chunk_size=4)
    f64_loss = float64_dft(f64_h, f64_w, labels, 0.5)
    loss.backward()
    f64_loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fused_w.grad).all()
    torch.testing.assert_close(loss.double(), f64_loss, rtol=1e-5, atol=1e-5)
    for ours, f64 in ((fused_h, f64_h), (fused_w, f64_w)):
        error = (ours.grad.double() - f64.grad).norm() / f64.grad.norm()
        assert error <= 1e-5, error
