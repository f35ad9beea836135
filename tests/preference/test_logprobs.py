"""The chunked sequence log-probabilities (`preference.logprobs`) against an independent float64 computation.

Values and gradients (hidden states, LM-head weight, bias) under a per-row upstream gradient, chunk sizes that do and
do not divide the label tokens, soft-cap, rows with no label and padding; that no `[tokens, vocab]` block is ever
allocated; and, on tiny models, the swapped head inside the model's forward (tied head, Gemma 2's soft-cap, a head
trained in full by an adapter) and the frozen reference's no-gradient sums.
"""

from __future__ import annotations

import pytest
import torch

from config.schema import LoraConfig, ModelConfig
from core.keys import IGNORE_INDEX
from dft.reference import DisabledAdapter, FrozenCopy
from modeling.adapter import add_adapter
from preference.logprobs import reference_label_logprobs, sequence_logprobs, summed_label_logprobs
from tests.helpers import (
    LOSS_VOCAB,
    VOCAB,
    LargestAllocation,
    float32_bound,
    float64_label_logprobs,
    leaves,
    num_valid,
    random_inputs,
    relative_error,
    tiny_gemma2,
    tiny_qwen2,
)

# Each float32 result is compared with the float64 computation, relative in norm. float32 rounding grows about as
# eps * sqrt(n) over a reduction of n terms; the longest here is the log-softmax over the vocabulary (LOSS_VOCAB = 37;
# a row sums at most 9 tokens, the matmuls 16 terms), so 4 * eps * sqrt(37) = 2.9e-6. A missed or doubled chunk, a
# token summed into the wrong row, a wrong sign or the soft-cap's derivative left out is 1e-2 or more.
FLOAT32_BOUND = float32_bound(LOSS_VOCAB)
# Through a tiny model (VOCAB = 300 entries, hidden 32): the same rounding over the 300-term softmax, 4 * eps *
# sqrt(300) = 8.3e-6, for the fused head against the model's own full float32 logits.
MODEL_BOUND = float32_bound(VOCAB)


def float64_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row summed log p(label) from the definition, on full logits, sharing no code with preference.logprobs."""
    token_logps, valid = float64_label_logprobs(hidden, weight, labels, softcap, bias)
    return (token_logps * valid).sum(dim=1)


def assert_float32_close(name: str, value: torch.Tensor, reference: torch.Tensor, bound: float = FLOAT32_BOUND) -> None:
    error = relative_error(value, reference)
    assert error <= bound, f"{name}: relative error in norm {error:.2e} > {bound:.2e}"


def with_empty_and_padded_rows(labels: torch.Tensor) -> torch.Tensor:
    """Row 0 scores nothing (a pair truncated away), row 1 ends in right padding (ignored labels)."""
    labels = labels.clone()
    labels[0] = IGNORE_INDEX
    labels[1, -4:] = IGNORE_INDEX
    return labels


# 1 and 4 do not divide the label tokens (20 here), 5 does, 1000 holds them all in one chunk.
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1000])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_values_and_gradients_match_float64(chunk_size: int, softcap: float | None) -> None:
    # Large weights so that the cap of 2 bends the logits.
    hidden, weight, bias, labels = random_inputs(3, batch=4, seq=9, scale=2.0)
    labels = with_empty_and_padded_rows(labels)
    # One upstream gradient per row, as DPO gives (+beta-ish for chosen, - for rejected): each row's tokens must be
    # scaled by their own row's value.
    upstream = torch.tensor([0.7, -1.3, 0.4, 2.1])
    ours_h, ours_w, ours_b = leaves(hidden, weight, bias)
    f64_h, f64_w, f64_b = leaves(hidden.double(), weight.double(), bias.double())

    logprobs = sequence_logprobs(ours_h, ours_w, labels, chunk_size, logit_softcap=softcap, lm_head_bias=ours_b)
    expected = float64_sequence_logprobs(f64_h, f64_w, labels, softcap, f64_b)
    (logprobs * upstream).sum().backward()
    (expected * upstream.double()).sum().backward()

    assert logprobs.dtype == torch.float32 and logprobs.shape == (4,)
    assert logprobs[0].item() == 0.0  # no label token: nothing summed
    assert_float32_close("log-probabilities", logprobs.detach(), expected.detach())
    for name, ours, f64 in (("hidden", ours_h, f64_h), ("weight", ours_w, f64_w), ("bias", ours_b, f64_b)):
        assert ours.grad.abs().max() > 0
        assert_float32_close(f"{name} gradient", ours.grad, f64.grad)
    # Hidden states without a label (row 0, and each row's last position) get an exact zero gradient.
    assert ours_h.grad[0].abs().max() == 0 and ours_h.grad[:, -1].abs().max() == 0
    if softcap is not None:
        # The cap is exercised, not a no-op at this scale: it moves the sums by more than 10 %.
        uncapped = sequence_logprobs(hidden, weight, labels, chunk_size, lm_head_bias=bias)
        assert relative_error(uncapped, logprobs) > 0.1


def test_chunk_size_auto_and_no_label_at_all() -> None:
    hidden, weight, _, labels = random_inputs(5)
    expected = float64_sequence_logprobs(hidden, weight, labels)
    assert_float32_close("auto chunk", sequence_logprobs(hidden, weight, labels, "auto"), expected)
    # Nothing to score: zeros, still connected to the graph (every parameter gets a zero gradient).
    ours_h, ours_w = leaves(hidden, weight)
    empty = sequence_logprobs(ours_h, ours_w, torch.full_like(labels, IGNORE_INDEX), 4)
    empty.sum().backward()
    assert empty.abs().max() == 0 and ours_h.grad.abs().max() == 0 and ours_w.grad.abs().max() == 0


def test_never_allocates_full_logits() -> None:
    batch, seq, hidden_size, vocab, chunk = 2, 64, 8, 301, 16
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    # Bound: one chunk of logits, the weight's gradient, or the hidden states' - far below tokens * vocab.
    bound = max(chunk * vocab, vocab * hidden_size, batch * seq * hidden_size)
    assert bound * 4 < num_valid(labels) * vocab
    with LargestAllocation() as tracker:
        sequence_logprobs(hidden, weight, labels, chunk).sum().backward()
    assert 0 < tracker.largest <= bound
    with LargestAllocation() as naive:
        float64_sequence_logprobs(hidden.float(), weight.float(), labels).sum().backward()
    assert naive.largest >= num_valid(labels) * vocab  # the tracker sees a full-logits allocation when there is one


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"chunk_size": 0}, "chunk_size=0"), ({"logit_softcap": -1.0}, "logit_softcap=-1.0")],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    hidden, weight, _, labels = random_inputs(0)
    with pytest.raises(ValueError, match=message):
        sequence_logprobs(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="do not match"):
        sequence_logprobs(hidden, weight, labels[:, :-1])


def model_batch(seed: int, batch: int = 3, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, a right-padded attention mask, and labels on a 'response' part of each row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def full_logits_logprobs(model: torch.nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """The stock path: the model's own `[batch, seq, vocab]` logits (soft-capped by its forward), then log-softmax."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    return (log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * valid).sum(1)


def fused_and_full(model: torch.nn.Module, seed: int) -> tuple[tuple[torch.Tensor, dict], tuple[torch.Tensor, dict]]:
    input_ids, attention_mask, labels = model_batch(seed)
    upstream = torch.tensor([1.0, -0.5, 2.0])

    def run(fused: bool) -> tuple[torch.Tensor, dict]:
        model.zero_grad()
        if fused:
            with summed_label_logprobs(model, labels, chunk_size=7) as head:
                outputs = model(input_ids=input_ids, attention_mask=attention_mask)
            assert head.logprobs is outputs.logits  # the head's output is what the model returns
            logprobs = head.logprobs
        else:
            logprobs = full_logits_logprobs(model, input_ids, attention_mask, labels)
        (logprobs * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        return logprobs.detach(), grads

    return run(fused=True), run(fused=False)


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_gemma2], ids=["qwen2_tied", "gemma2_softcap"])
def test_inside_the_model_forward_matches_the_full_logits(build) -> None:
    model = build(seed=0).float()
    (fused, fused_grads), (full, full_grads) = fused_and_full(model, seed=1)
    assert_float32_close("model log-probabilities", fused, full, MODEL_BOUND)
    assert set(fused_grads) == set(full_grads)
    flat = [torch.cat([g.flatten() for g in grads.values()]) for grads in (fused_grads, full_grads)]
    assert_float32_close("model gradients", flat[0], flat[1], MODEL_BOUND)
    # The head's forward and the soft-cap are restored after the context.
    assert "forward" not in vars(model.get_output_embeddings())
    if build is tiny_gemma2:
        assert model.config.final_logit_softcapping == 2.0


def test_a_head_trained_in_full_by_an_adapter_uses_the_trained_copy() -> None:
    model = add_adapter(tiny_qwen2(), ModelConfig(adapter="lora", lora=LoraConfig(train_embeddings=True)), seed=0)
    (fused, fused_grads), (full, full_grads) = fused_and_full(model, seed=2)
    assert_float32_close("adapter log-probabilities", fused, full, MODEL_BOUND)
    copies = [name for name in full_grads if "modules_to_save" in name]
    assert copies, "train_embeddings trained no head copy"
    for name in copies:
        assert full_grads[name].abs().sum() > 0, name
        assert_float32_close(name, fused_grads[name], full_grads[name], MODEL_BOUND)


def test_a_lora_head_is_refused() -> None:
    model = add_adapter(tiny_qwen2(), ModelConfig(adapter="lora", lora=LoraConfig(target_modules=["lm_head"])), seed=0)
    with pytest.raises(ValueError, match="LM head carries a LoRA adapter"):
        with summed_label_logprobs(model, torch.zeros(1, 4, dtype=torch.long)):
            pass


@pytest.mark.parametrize("form", ["frozen_copy", "disabled_adapter"])
def test_reference_logprobs_are_the_frozen_models_without_gradient(form: str) -> None:
    input_ids, attention_mask, labels = model_batch(3)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    base = tiny_gemma2(seed=4).float()
    expected = full_logits_logprobs(base, input_ids, attention_mask, labels).detach()
    if form == "frozen_copy":
        reference = FrozenCopy(base)
    else:
        peft_model = add_adapter(base, ModelConfig(adapter="lora", lora=LoraConfig(dropout=0.0)), seed=0)
        for parameter in peft_model.parameters():  # lora_B starts at zero: make the adapter change the model
            if parameter.requires_grad:
                torch.nn.init.normal_(parameter, std=0.1)
        reference = DisabledAdapter(peft_model, peft_model)
        adapted = full_logits_logprobs(peft_model, input_ids, attention_mask, labels).detach()
        assert relative_error(adapted, expected) > 1e-3  # the adapter matters, so "off" is tested
    assert reference.logit_softcap == 2.0  # the Gemma 2 base's cap, applied to the reference's chunks
    logprobs = reference_label_logprobs(reference, inputs, labels, chunk_size=5)
    assert not logprobs.requires_grad
    assert_float32_close("reference log-probabilities", logprobs, expected, MODEL_BOUND)
