"""Every registered objective (`dft.objectives`) on both heads against an independent float64 computation.

Values and gradients (hidden states, LM-head weight, bias), with and without soft-cap, chunked; the KL term's
direction; EAFT's hand-worked weights; gradient-accumulation invariance; no `[tokens, vocab]` block for either
model on the fused ASFT path; and that a new objective is a function plus a registration.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import config.schema
from config.schema import LOSS_TYPES, LossConfig
from core.keys import IGNORE_INDEX
from dft.loss import fused_objective_loss, objective_loss
from dft.objectives import OBJECTIVES, Objective, build_objective, dft_objective, register_objective, unit_weights
from tests.helpers import (
    LOSS_VOCAB,
    LargestAllocation,
    float32_bound,
    leaves,
    loss_and_grads,
    make_trainer,
    num_valid,
    random_inputs,
    relative_error,
    tiny_qwen2,
)

KL_COEF, TOP_K, EXPONENT = 0.3, 5, 1.5
CONFIGS = {
    "ce": LossConfig(type="ce"),
    "dft": LossConfig(type="dft", alpha=0.7),
    "asft": LossConfig(type="asft", alpha=1.0, kl_coef=KL_COEF),
    "eaft": LossConfig(type="eaft", eaft_top_k=TOP_K, eaft_exponent=EXPONENT),
}
# As in test_fused_loss.py: float32 rounding grows about as eps * sqrt(n) over a reduction of n terms, the longest
# here the softmaxes and the KL's sum over the vocabulary (LOSS_VOCAB = 37 terms), so 4 * eps * sqrt(37) = 2.9e-6
# relative in norm. The KL term adds two such sums per token (reference and policy log-softmax) to the CE's one:
# twice the bound. A wrong KL direction, a missing stop-gradient on a weight, a weight computed from the wrong
# logits or a missed chunk is 1e-3 or more.
BOUND = 2 * float32_bound(LOSS_VOCAB)


def float64_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    name: str,
    reference_logits: torch.Tensor | None = None,
    denominator: float | None = None,
) -> torch.Tensor:
    """The objective from the papers' definitions in float64, sharing no code with dft.loss or dft.objectives."""
    log_probs = torch.log_softmax(logits.double()[:, :-1], dim=-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    log_p = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    if name == "ce":
        weights = torch.ones_like(log_p)
    elif name in ("dft", "asft"):
        alpha = CONFIGS[name].alpha
        weights = alpha * log_p.detach().exp() + 1 - alpha
    else:  # eaft: the entropy of the renormalised top-k probabilities, over its maximum ln k
        top = torch.softmax(logits.double()[:, :-1].detach().topk(TOP_K, dim=-1).values, dim=-1)
        weights = (-(top * top.log()).sum(-1) / math.log(TOP_K)) ** EXPONENT
    per_token = -weights * log_p
    if name == "asft":
        log_q = torch.log_softmax(reference_logits.double()[:, :-1], dim=-1)
        per_token = per_token + KL_COEF * (log_q.exp() * (log_q - log_probs)).sum(-1)  # KL(q || p)
    return per_token[valid].sum() / (denominator if denominator is not None else max(int(valid.sum()), 1))


def reference_head(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Another model's hidden states, head weight and bias, for the KL term."""
    hidden, weight, bias, _ = random_inputs(seed)
    return hidden, weight, bias


def assert_close(name: str, value: torch.Tensor, expected: torch.Tensor, bound: float = BOUND) -> None:
    error = relative_error(value, expected)
    assert error <= bound, f"{name}: relative error in norm {error:.2e} > {bound:.2e}"


def test_the_registry_is_the_config_s_list_of_loss_types() -> None:
    assert sorted(OBJECTIVES) == sorted(LOSS_TYPES) == sorted(CONFIGS)


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_both_heads_match_float64_values_and_gradients(name: str, chunk_size: int, softcap: float | None) -> None:
    hidden, weight, bias, labels = random_inputs(0)
    ref_hidden, ref_weight, ref_bias = reference_head(11)
    objective = build_objective(CONFIGS[name])
    kl = objective.needs_reference
    fused = leaves(hidden, weight, bias)
    full = leaves(hidden, weight, bias)
    f64 = leaves(hidden.double(), weight.double(), bias.double())

    def logits_of(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = h @ w.T + b
        return softcap * torch.tanh(z / softcap) if softcap is not None else z

    loss, stats = fused_objective_loss(
        fused[0], fused[1], labels, objective, chunk_size=chunk_size, logit_softcap=softcap, lm_head_bias=fused[2],
        **({"reference_hidden_states": ref_hidden, "reference_lm_head_weight": ref_weight,
            "reference_lm_head_bias": ref_bias} if kl else {}),
    )  # fmt: skip
    reference_logits = logits_of(ref_hidden, ref_weight, ref_bias) if kl else None
    full_loss, full_stats = objective_loss(logits_of(*full), labels, objective, reference_logits=reference_logits)
    expected = float64_objective(logits_of(*f64), labels, name, reference_logits)
    for value in (loss, full_loss, expected):
        value.backward()

    assert loss.item() > 0
    assert_close("fused loss", loss, expected)
    assert_close("full-logits loss", full_loss, expected)
    for part, ours, theirs, exact in zip(("hidden", "weight", "bias"), fused, full, f64, strict=True):
        assert exact.grad.abs().max() > 0
        assert_close(f"fused {part} gradient", ours.grad, exact.grad)
        assert_close(f"full-logits {part} gradient", theirs.grad, exact.grad)
    assert (stats.sum_kl is not None) == kl and (full_stats.sum_kl is not None) == kl
    if kl:
        assert_close("fused KL sum", stats.sum_kl, full_stats.sum_kl)
        assert stats.sum_kl.item() > 0


def test_the_kl_is_reference_to_policy_and_zero_at_the_start() -> None:
    hidden, weight, _, labels = random_inputs(2)
    ref_hidden, ref_weight, _ = reference_head(12)
    objective = build_objective(CONFIGS["asft"])
    dft_only = dft_objective(1.0)
    _, stats = fused_objective_loss(
        hidden, weight, labels, objective, reference_hidden_states=ref_hidden, reference_lm_head_weight=ref_weight
    )
    valid = labels[:, 1:] != IGNORE_INDEX
    log_p = torch.log_softmax((hidden.double() @ weight.double().T)[:, :-1], -1)[valid]
    log_q = torch.log_softmax((ref_hidden.double() @ ref_weight.double().T)[:, :-1], -1)[valid]
    forward_kl = (log_q.exp() * (log_q - log_p)).sum()
    reverse_kl = (log_p.exp() * (log_p - log_q)).sum()
    assert relative_error(stats.sum_kl, forward_kl) <= BOUND
    assert relative_error(reverse_kl, forward_kl) > 100 * BOUND  # the other direction would be caught
    # The policy as its own reference (the first step of a run): KL 0, and the gradient is DFT's alone.
    with_kl, without = leaves(hidden, weight), leaves(hidden, weight)
    loss, stats = fused_objective_loss(
        *with_kl, labels, objective, reference_hidden_states=hidden, reference_lm_head_weight=weight, chunk_size=4
    )
    dft_loss, _ = fused_objective_loss(*without, labels, dft_only, chunk_size=4)
    (loss + dft_loss).backward()
    # KL(p || p) is a sum of p (log p - log p) over 37 entries per token: exactly cancelling logs, rounding only.
    assert abs(stats.sum_kl.item()) <= float32_bound(LOSS_VOCAB) * num_valid(labels)
    for ours, dft in zip(with_kl, without, strict=True):
        assert_close("gradient with a zero KL", ours.grad, dft.grad)


def test_eaft_hand_worked_weights() -> None:
    # Equal logits: the top-k entropy is ln k, the weight 1, the loss plain CE = ln V per token.
    hidden = torch.randn(1, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    eaft = build_objective(LossConfig(type="eaft", eaft_top_k=TOP_K))
    loss, _ = fused_objective_loss(hidden, torch.zeros(LOSS_VOCAB, 4), labels, eaft, chunk_size=1)
    assert loss.item() == pytest.approx(math.log(LOSS_VOCAB), rel=float32_bound(LOSS_VOCAB), abs=0)
    # One logit far above the rest: entropy near 0, so the token barely trains even though its CE is large.
    peaked = torch.zeros(LOSS_VOCAB, 4)
    peaked[5] = 10.0
    hidden = torch.ones(1, 3, 4)
    loss, stats = fused_objective_loss(hidden, peaked, labels, eaft, chunk_size=1)
    assert stats.sum_nll.item() > 2 * 30  # two tokens, each with CE about 40 nats
    assert 0 < loss.item() < 1e-6 * stats.sum_nll.item()


@pytest.mark.parametrize("name", ["asft", "eaft"])
def test_gradient_accumulation_split_does_not_change_the_update(name: str) -> None:
    hidden, weight, _, labels = random_inputs(7, batch=4, seq=11)
    ref_hidden, ref_weight, _ = random_inputs(17, batch=4, seq=11)[:3]
    objective = build_objective(CONFIGS[name])
    reference = {"reference_hidden_states": ref_hidden, "reference_lm_head_weight": ref_weight}
    num_items = torch.tensor(num_valid(labels))
    f64 = leaves(hidden.double(), weight.double())
    expected = float64_objective(
        f64[0] @ f64[1].T, labels, name, ref_hidden @ ref_weight.T if name == "asft" else None, int(num_items)
    )
    expected.backward()
    split = leaves(hidden, weight)
    accumulated = torch.zeros(())
    for i in range(4):
        micro, _ = fused_objective_loss(
            split[0][i : i + 1], split[1], labels[i : i + 1], objective, num_items_in_batch=num_items, chunk_size=6,
            **({key: value[i : i + 1] if key == "reference_hidden_states" else value
                for key, value in reference.items()} if name == "asft" else {}),
        )  # fmt: skip
        micro.backward()
        accumulated += micro.detach()
    assert_close("split loss", accumulated, expected)
    assert_close("split hidden gradient", split[0].grad, f64[0].grad)
    assert_close("split weight gradient", split[1].grad, f64[1].grad)


def test_fused_asft_never_allocates_either_model_s_full_logits() -> None:
    batch, seq, hidden_size, vocab, chunk = 2, 64, 8, 301, 16
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    ref_hidden = torch.randn(batch, seq, hidden_size, generator=generator)
    ref_weight = torch.randn(vocab, hidden_size, generator=generator)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    objective = build_objective(CONFIGS["asft"])
    bound = max(chunk * vocab, vocab * hidden_size, batch * seq * hidden_size)
    assert bound * 4 < num_valid(labels) * vocab
    with LargestAllocation() as tracker:
        loss, _ = fused_objective_loss(
            hidden, weight, labels, objective, chunk_size=chunk,
            reference_hidden_states=ref_hidden, reference_lm_head_weight=ref_weight,
        )  # fmt: skip
        loss.backward()
    assert 0 < tracker.largest <= bound
    with LargestAllocation() as naive:
        objective_loss(hidden @ weight.T, labels, objective, reference_logits=ref_hidden @ ref_weight.T)[0].backward()
    assert naive.largest >= num_valid(labels) * vocab


def test_a_reference_must_come_with_a_kl_term_and_only_then() -> None:
    hidden, weight, _, labels = random_inputs(3)
    with pytest.raises(ValueError, match="loss.type=asft: the KL term needs the reference model"):
        fused_objective_loss(hidden, weight, labels, build_objective(CONFIGS["asft"]))
    with pytest.raises(ValueError, match="loss.type=eaft has no KL term"):
        objective_loss(hidden @ weight.T, labels, build_objective(CONFIGS["eaft"]), reference_logits=hidden @ weight.T)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"type": "asft", "kl_coef": 0.0}, "above 0 for loss.type=asft"),
        ({"kl_coef": -1.0}, "loss.kl_coef=-1.0 must be >= 0"),
        ({"type": "eaft", "eaft_top_k": 1}, "loss.eaft_top_k=1 must be >= 2"),
        ({"type": "dpo"}, "loss.type='dpo' is not one of"),
    ],
)
def test_bad_objective_settings_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossConfig(**overrides)


def test_a_new_objective_is_a_function_and_a_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half of cross-entropy, registered the documented way: the Trainer trains it with no other change."""
    monkeypatch.setattr(config.schema, "LOSS_TYPES", (*LOSS_TYPES, "half_ce"))
    monkeypatch.setattr("dft.objectives.OBJECTIVES", dict(OBJECTIVES))

    @register_objective("half_ce")
    def half(config: LossConfig, alpha: float) -> Objective:
        return Objective("half_ce", lambda nll, feature: torch.full_like(nll, 0.5))

    model = tiny_qwen2(0)
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    half_loss, half_grads = loss_and_grads(make_trainer(model, tmp_path, type="half_ce"), model, inputs, None)
    ce_loss, ce_grads = loss_and_grads(make_trainer(model, tmp_path, type="ce"), model, inputs, None)
    # The same float32 computation scaled by 0.5 (exact in binary floating point).
    assert half_loss.item() == pytest.approx(0.5 * ce_loss.item(), rel=1e-6)
    for name, grad in half_grads.items():
        torch.testing.assert_close(grad, 0.5 * ce_grads[name], rtol=1e-5, atol=1e-9)
    assert Objective("x", unit_weights).needs_reference is False


@pytest.mark.parametrize("train_embeddings", [False, True], ids=["adapter", "adapter_and_trained_head"])
def test_an_adapter_run_s_reference_is_its_base_with_the_adapter_off(tmp_path: Path, train_embeddings: bool) -> None:
    """ASFT under LoRA: no second model; the KL is to the base (with a head trained in full, to the original head),
    equal to the float64 computation with the adapter switched off, gradients included."""
    from config.schema import LoraConfig, ModelConfig
    from dft.reference import DisabledAdapter
    from modeling.adapter import add_adapter

    model = add_adapter(
        tiny_qwen2(0), ModelConfig(adapter="lora", lora=LoraConfig(dropout=0.0, train_embeddings=train_embeddings)), 0
    )
    with torch.no_grad():  # move the adapter (and the trained head copy) away from the base, so the KL is not 0
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    trainer = make_trainer(model, tmp_path, type="asft", alpha=1.0, kl_coef=KL_COEF)
    assert trainer.reference_model is None and isinstance(trainer._reference(model), DisabledAdapter)
    generator = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    loss, grads = loss_and_grads(trainer, model, inputs, None)

    exact = copy.deepcopy(model).double()
    batch = {"input_ids": input_ids, "attention_mask": inputs["attention_mask"]}
    with torch.no_grad(), exact.disable_adapter():
        reference_logits = exact(**batch).logits
    expected = float64_objective(exact(**batch).logits, labels, "asft", reference_logits)
    expected.backward()
    # The float32 model's logits come through 2 layers of matmuls of 32-64 terms before the loss's 300-entry
    # softmaxes: 4 * eps * sqrt(300) per reduction, a few of them in sequence; 1e-5 leaves that room, while a
    # reference with the adapter still on (KL 0) or the trained head copy in place of the base head is 1e-3 or more.
    assert relative_error(loss, expected) <= 1e-5
    for name, parameter in exact.named_parameters():
        if parameter.requires_grad:
            assert relative_error(grads[name], parameter.grad) <= 1e-4, name


def test_label_smoothing_is_refused_with_the_reason() -> None:
    from config.schema import load_run_config

    with pytest.raises(ValueError, match="training.label_smoothing_factor=0.1: every loss.type computes"):
        load_run_config(["training.label_smoothing_factor=0.1"])
