"""fused_dft_loss against the full-logits reference `dft_loss` and an independent float64 computation.

Values and gradients (hidden states, LM-head weight, bias), chunking, ignored tokens, soft-cap, bf16, the empty
micro-batch, gradient-accumulation invariance, and that no full `[tokens, vocab]` block is ever allocated.
"""

from __future__ import annotations

import math

import pytest
import torch

from core.keys import IGNORE_INDEX
from dft.loss import auto_chunk_size, dft_loss, fused_dft_loss
from modeling.lm_head import AUTO_CHUNK_MIN_TOKENS
from tests.helpers import (
    LOSS_VOCAB,
    LargestAllocation,
    float32_bound,
    float64_dft_sum,
    float64_label_logprobs,
    leaves,
    num_valid,
    random_inputs,
    relative_error,
)

# Each float32 path (fused, and the full-logits reference) is compared with the float64 computation of the same loss,
# never with the other, relative in norm. float32 rounding grows about as eps * sqrt(n) over a reduction of n terms;
# the longest here is the log-softmax over the vocabulary (LOSS_VOCAB = 37; the token sums have at most 40 terms in
# the split test and 24 elsewhere, the matmuls 16), so 4 * eps * sqrt(37) = 2.9e-6. Measured at most 6.8e-7 (the
# soft-capped gradients; 3.0e-7 without the cap) with 1 or 2 threads; a missed chunk, a wrong weight or scale, or the
# soft-cap's derivative left out is 1e-3 or more.
FLOAT32_BOUND = float32_bound(LOSS_VOCAB)


def assert_float32_close(name: str, value: torch.Tensor, reference: torch.Tensor, bound: float = FLOAT32_BOUND) -> None:
    error = relative_error(value, reference)
    assert error <= bound, f"{name}: relative error in norm {error:.2e} > {bound:.2e}"


def float64_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_p_correct, sum_nll and num_tokens of the unbiased, uncapped head, in float64."""
    _, nll, valid = float64_dft_sum(hidden.double() @ weight.double().T, labels, 0.0)
    return {"sum_p_correct": torch.exp(-nll)[valid].sum(), "sum_nll": nll[valid].sum(), "num_tokens": valid.sum()}


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
    log_p, valid = float64_label_logprobs(hidden, weight, labels, softcap, bias)
    log_p = log_p[valid]
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
    assert_float32_close("fused loss", loss, f64_loss)
    assert_float32_close("reference loss", ref_loss, f64_loss)
    for name, ours, ref, f64 in (("hidden", fused_h, ref_h, f64_h), ("weight", fused_w, ref_w, f64_w)):
        assert ours.grad.abs().max() > 0
        assert_float32_close(f"fused {name} gradient", ours.grad, f64.grad)
        assert_float32_close(f"reference {name} gradient", ref.grad, f64.grad)
    assert stats.group_sums is None and ref_stats.group_sums is None  # no token_groups given
    expected = float64_stats(hidden, weight, labels)
    for field in ("sum_p_correct", "sum_nll"):
        for name, value in (("fused", getattr(stats, field)), ("reference", getattr(ref_stats, field))):
            assert not value.requires_grad
            assert_float32_close(f"{name} {field}", value, expected[field])
    assert int(stats.num_tokens) == int(ref_stats.num_tokens) == int(expected["num_tokens"])  # counts: exact


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
    # Without num_items_in_batch the micro-batch's own token count divides (the float64 sums differ only by it).
    assert_float32_close("own count", own_count, float64_dft(hidden, weight, labels, 1.0))
    assert_float32_close("loss", loss, expected)
    assert_float32_close("hidden gradient", fused_h.grad, f64_h.grad)
    assert_float32_close("weight gradient", fused_w.grad, f64_w.grad)


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
        # The cap is exercised, not a no-op at this scale: it moves the loss by more than 10 %, five orders of
        # magnitude above rounding, so leaving it out could not hide under FLOAT32_BOUND.
        assert abs(loss.item() - uncapped.item()) > 0.1 * uncapped.item()
    assert_float32_close("fused loss", loss, f64_loss)
    assert_float32_close("reference loss", ref_loss, f64_loss)
    for name, ours, ref, f64 in (
        ("hidden", fused_h, ref_h, f64_h),
        ("weight", fused_w, ref_w, f64_w),
        ("bias", fused_b, ref_b, f64_b),
    ):
        assert ours.grad.abs().max() > 0
        assert_float32_close(f"fused {name} gradient", ours.grad, f64.grad)
        assert_float32_close(f"reference {name} gradient", ref.grad, f64.grad)


def test_bf16_inputs_accumulate_in_float32() -> None:
    hidden, weight, bias, labels = random_inputs(4, batch=4, seq=16)
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    fused_h, fused_w, fused_b = leaves(hidden, weight, bias)
    # Reference: the same bf16 values, everything else in float32.
    ref_h, ref_w, ref_b = leaves(hidden.float(), weight.float(), bias.float())
    f64_h, f64_w, f64_b = leaves(hidden.double(), weight.double(), bias.double())
    loss, stats = fused_dft_loss(fused_h, fused_w, labels, 1.0, chunk_size=5, lm_head_bias=fused_b)
    ref_loss, ref_stats = dft_loss(ref_h @ ref_w.T + ref_b, labels, 1.0)
    f64_loss = float64_dft(f64_h, f64_w, labels, 1.0, bias=f64_b)
    for value in (loss, ref_loss, f64_loss):
        value.backward()
    with torch.no_grad():
        f64_sum_nll = float64_dft_sum(f64_h @ f64_w.T + f64_b, labels, 1.0)[1][labels[:, 1:] != IGNORE_INDEX].sum()

    assert loss.dtype == torch.float32 and stats.sum_nll.dtype == torch.float32
    assert (fused_h.grad.dtype, fused_w.grad.dtype, fused_b.grad.dtype) == (torch.bfloat16,) * 3
    # The float64 reference takes the same bf16 values. The float32 path is within FLOAT32_BOUND of it (n = the
    # vocabulary, 37). The fused path runs the head's matmuls in the weight's dtype: each logit, each logit
    # gradient before its matmul, and each returned gradient is rounded once to bf16 (relative 2**-9 on average,
    # 2**-8 at most), and a logit's rounding moves its softmax by up to |logit| times as much; the sums are float32.
    # A chain of a few such roundings, independent from element to element: in norm they stay a small multiple of
    # 2**-9, and 4 * eps_bf16 = 2**-5 = 3.1e-2 bounds them (measured at most 5.0e-3, on the weight's gradient,
    # with 1 or 2 threads; 1.4e-4 on the loss). The float32
    # accumulation is what this test guards: summing in bf16 would lose 2**-8 * sqrt(tokens) and more on the weight
    # gradient's 60-term sums, and a wrong weight or a dropped token is off by 1e-2 or more in the loss.
    bf16_bound = 4 * torch.finfo(torch.bfloat16).eps
    assert_float32_close("float32 loss", ref_loss, f64_loss)
    assert_float32_close("float32 sum_nll", ref_stats.sum_nll, f64_sum_nll)
    assert_float32_close("fused bf16 loss", loss, f64_loss, bf16_bound)
    assert_float32_close("fused bf16 sum_nll", stats.sum_nll, f64_sum_nll, bf16_bound)
    for name, ours, ref, f64 in (
        ("hidden", fused_h, ref_h, f64_h),
        ("weight", fused_w, ref_w, f64_w),
        ("bias", fused_b, ref_b, f64_b),
    ):
        assert torch.isfinite(ours.grad).all()
        assert_float32_close(f"float32 {name} gradient", ref.grad, f64.grad)
        assert_float32_close(f"fused bf16 {name} gradient", ours.grad, f64.grad, bf16_bound)


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
    # The same float32 operations on the same values in the same process: equal bit for bit, no tolerance.
    assert torch.equal(under_autocast, plain)
    assert torch.equal(cast_h.grad, plain_h.grad)
    assert torch.equal(cast_w.grad, plain_w.grad)


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
    f64_h, f64_w = leaves(hidden.double(), weight.double())
    expected = float64_dft(f64_h, f64_w, labels, 1.0, denominator=int(num_items))
    expected.backward()
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
    # The whole batch and its split, each within float32 rounding of the float64 step (FLOAT32_BOUND: the longest
    # reduction is still the vocabulary; the 40 tokens add up in sums of at most 40 terms, 4 * eps * sqrt(40) is
    # smaller than it). A micro-batch divided by its own token count would be off by 10 % or more.
    for name, value, h, w in (("whole", loss, whole_h, whole_w), ("split", accumulated, split_h, split_w)):
        assert_float32_close(f"{name} loss", value, expected)
        assert_float32_close(f"{name} hidden gradient", h.grad, f64_h.grad)
        assert_float32_close(f"{name} weight gradient", w.grad, f64_w.grad)


def test_hand_worked_uniform_logits() -> None:
    # A zero weight gives uniform logits over 2 classes: p = 1/2, CE = log 2, DFT (alpha=1) = log(2) / 2 per token.
    hidden = torch.randn(1, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss, stats = fused_dft_loss(hidden, torch.zeros(2, 4), labels, alpha=1.0, chunk_size=1)
    # A few float32 roundings each (a 2-term log-sum-exp, a product, a 2-term sum, a division): 4 * eps * sqrt(2).
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=float32_bound(2), abs=0)
    assert stats.sum_nll.item() == pytest.approx(2 * math.log(2), rel=float32_bound(2), abs=0)
    assert stats.sum_p_correct.item() == pytest.approx(1.0, rel=float32_bound(2), abs=0)


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
    with LargestAllocation() as tracker:
        loss, stats = fused_dft_loss(hidden, weight, labels, 1.0, chunk_size=chunk, **(groups if with_groups else {}))
        loss.backward()
    assert 0 < tracker.largest <= bound
    if with_groups:
        assert stats.group_sums[:, -1].sum().item() == num_valid(labels)
    with LargestAllocation() as naive:
        dft_loss(hidden @ weight.T, labels, 1.0)[0].backward()
    assert naive.largest >= num_valid(labels) * vocab  # the tracker sees a full-logits allocation when there is one


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"chunk_size": "big"}, "chunk_size='big'"),
        ({"logit_softcap": 0.0}, "logit_softcap=0.0"),
    ],
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
    # FLOAT32_BOUND still: each CE_t = logsumexp - target logit loses eps * |logit| to rounding, but at this scale
    # the CE_t are in the hundreds too, so relative to the loss the error stays near eps (measured 5.3e-8). An exp()
    # that overflowed gives inf or NaN, not a small error.
    assert_float32_close("loss", loss, f64_loss)
    for name, ours, f64 in (("hidden", fused_h, f64_h), ("weight", fused_w, f64_w)):
        assert_float32_close(f"{name} gradient", ours.grad, f64.grad)


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [
        # bench/loss_head.py's sizes: the hidden states allow a few tokens of logits, so the floor decides.
        ((512, 256, 16384), torch.float32, AUTO_CHUNK_MIN_TOKENS),
        ((2048, 896, 151936), torch.float32, AUTO_CHUNK_MIN_TOKENS),
        ((8192, 896, 151936), torch.float32, AUTO_CHUNK_MIN_TOKENS),
        ((2048, 256, 65536), torch.float32, AUTO_CHUNK_MIN_TOKENS),
        # A long batch of a wide model: the float32 logits of 441 tokens fit in the bf16 hidden states
        # (32768 * 4096 * 2 // (151936 * 4) = 441); float32 hidden states are twice the bytes, so twice the chunk.
        ((32768, 4096, 151936), torch.bfloat16, 441),
        ((32768, 4096, 151936), torch.float32, 883),
    ],
)
def test_auto_chunk_size_is_the_hidden_states_budget_with_a_floor(
    shape: tuple[int, int, int], dtype: torch.dtype, expected: int
) -> None:
    assert auto_chunk_size(*shape, dtype) == expected


def test_auto_chunk_matches_float64_and_runs_as_the_chunk_it_names() -> None:
    # 2 x 300 positions of width 16 over 37 entries: 600 * 16 * 4 // (37 * 4) = 259 tokens per chunk, above the
    # floor, so the budget is what decides, and about 420 trainable tokens make two chunks.
    hidden, weight, _, labels = random_inputs(10, batch=2, seq=300)
    chunk = auto_chunk_size(labels.numel(), hidden.size(-1), weight.size(0), hidden.dtype)
    tokens = num_valid(labels)
    assert chunk == 259 and chunk < tokens < 2 * chunk, (chunk, tokens)
    auto_h, auto_w = leaves(hidden, weight)
    named_h, named_w = leaves(hidden, weight)
    f64_h, f64_w = leaves(hidden.double(), weight.double())
    loss, stats = fused_dft_loss(auto_h, auto_w, labels, 1.0)  # chunk_size="auto", the default
    named_loss, named_stats = fused_dft_loss(named_h, named_w, labels, 1.0, chunk_size=chunk)
    f64_loss = float64_dft(f64_h, f64_w, labels, 1.0)
    for value in (loss, named_loss, f64_loss):
        value.backward()

    # The sums here run over the trainable tokens (about 420 terms), longer than the vocabulary's 37.
    bound = float32_bound(tokens)
    assert_float32_close("auto-chunk loss", loss, f64_loss, bound)
    assert_float32_close("auto-chunk hidden gradient", auto_h.grad, f64_h.grad, bound)
    assert_float32_close("auto-chunk weight gradient", auto_w.grad, f64_w.grad, bound)
    # "auto" resolves to a chunk size from the shapes alone: the very same computation as naming that size.
    assert torch.equal(loss, named_loss) and torch.equal(auto_w.grad, named_w.grad)
    assert torch.equal(stats.sum_nll, named_stats.sum_nll)
