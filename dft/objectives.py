"""The SFT objectives `loss.type` names, one registry.

Every objective here has one form, over the trainable tokens `t` of an optimizer step:

    loss = (1 / N) * sum_t [ w_t * CE_t + kl_coef * KL_t(reference || policy) ]

`CE_t = -log p_t(y_t)` is the policy's cross-entropy of the target token; `w_t` is a per-token weight computed
from the policy's own logits of that token and detached (a stop-gradient: the weight scales the token's gradient,
it is not trained); `KL_t = sum_v q_v (log q_v - log p_v)` compares the frozen starting model's next-token
distribution `q` with the policy's `p` over the whole vocabulary, and only objectives with `kl_coef > 0` need that
reference model. `N` is the step's trainable-token count over gradient accumulation and ranks, as for every loss
of this project (`dft.loss`).

Both heads evaluate the same `Objective`: `dft.loss.objective_loss` on full logits (the reference formulation)
and `dft.loss.fused_objective_loss` one chunk of logits at a time (the default). A new objective is a function
here that returns an `Objective`, decorated with `@register_objective("name")`, plus its name in
`config.schema.LOSS_TYPES` (the config check runs without importing torch); tests/dft/test_objectives.py then
holds it to a float64 reference like the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from config.schema import LossConfig

TokenWeights = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""`(nll [rows], feature [rows] or None) -> [rows]`: each trainable token's weight, detached."""
LogitFeature = Callable[[torch.Tensor], torch.Tensor]
"""`logits [rows, vocab] float32 -> [rows]`: a detached per-token statistic of the (soft-capped) logits, computed
before the heads turn the logits into probabilities in place; it must not modify them."""


@dataclass(frozen=True)
class Objective:
    """One objective, evaluated at the current step (DFT's alpha can warm up)."""

    name: str
    token_weights: TokenWeights
    logit_feature: LogitFeature | None = None
    """What `token_weights` needs from the logits beyond the token's CE (EAFT: the top-k entropy); None: nothing."""
    kl_coef: float = 0.0
    """Weight of `KL(reference || policy)`; above 0 the objective needs the frozen starting model."""
    alpha: float | None = None
    """DFT's alpha in use, for the objectives built on DFT's weights (logged as `dft_alpha`)."""
    settings: str = ""
    """The settings that define it, as the start-up banner shows them."""

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0


ObjectiveBuilder = Callable[[LossConfig, float], Objective]
"""`(loss config, alpha in use) -> Objective`."""

OBJECTIVES: dict[str, ObjectiveBuilder] = {}
DEFAULT_ALPHAS: dict[str, float] = {}
"""The alpha an objective built on DFT's weights takes when `loss.alpha` is null."""


def register_objective(name: str, default_alpha: float | None = None) -> Callable[[ObjectiveBuilder], ObjectiveBuilder]:
    """Register `builder` under `name`; `default_alpha` for an objective that uses DFT's alpha."""

    def register(builder: ObjectiveBuilder) -> ObjectiveBuilder:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = builder
        if default_alpha is not None:
            DEFAULT_ALPHAS[name] = default_alpha
        return builder

    return register


def resolve_alpha(config: LossConfig) -> float:
    """`loss.alpha` as configured, else the objective's default; 0 for an objective that has no alpha."""
    return config.alpha if config.alpha is not None else DEFAULT_ALPHAS.get(config.type, 0.0)


def build_objective(config: LossConfig, alpha: float | None = None) -> Objective:
    """The objective `config.type` names, with DFT's alpha at `alpha` (`resolve_alpha(config)` when None)."""
    if config.type not in OBJECTIVES:
        raise ValueError(f"loss.type={config.type!r}: no such objective; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[config.type](config, resolve_alpha(config) if alpha is None else alpha)


def describe_objective(config: LossConfig, adapter: str) -> str:
    """One line for the start-up banner: the objective, its settings (alpha as configured: a warm-up starts it
    lower), what the KL term's reference is, and the head."""
    objective = build_objective(config)
    text = f"{objective.name} ({objective.settings})" if objective.settings else objective.name
    if objective.needs_reference:
        reference = "a frozen copy" if adapter == "none" else "the base with the adapter off (no copy)"
        text += f"; KL to the starting model: {reference}"
    return f"{text}, {config.implementation} head"


def unit_weights(nll: torch.Tensor, feature: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(nll)


def dft_weights(alpha: float) -> TokenWeights:
    """`alpha * p_t + (1 - alpha)` with `p_t = exp(-CE_t)`: no second softmax over the vocabulary."""

    def weights(nll: torch.Tensor, feature: torch.Tensor | None) -> torch.Tensor:
        return (alpha * torch.exp(-nll) + (1.0 - alpha)).detach()

    return weights


def normalised_topk_entropy(top_k: int) -> LogitFeature:
    """`H_k / ln k`, `H_k` the entropy of the softmax over the token's `k` largest logits.

    Dividing by `ln k`, the largest entropy `k` outcomes can have, puts it in [0, 1] whatever `k`; LLaMA-Factory
    divides by 3 for its `k = 20` (`ln 20 = 2.996`), so the weights agree to 0.2%. A vocabulary smaller than `k`
    uses all of it."""

    def feature(logits: torch.Tensor) -> torch.Tensor:
        k = min(top_k, logits.size(-1))
        log_probs = torch.log_softmax(logits.detach().float().topk(k, dim=-1).values, dim=-1)
        return (-(log_probs.exp() * log_probs).sum(-1) / math.log(k)).clamp(min=0.0)

    return feature


def power_of_feature(exponent: float) -> TokenWeights:
    def weights(nll: torch.Tensor, feature: torch.Tensor | None) -> torch.Tensor:
        return feature.pow(exponent).detach()

    return weights


@register_objective("ce")
def cross_entropy(config: LossConfig, alpha: float) -> Objective:
    """Plain SFT: every trainable token weighs 1 (`loss = sum_t CE_t / N`)."""
    return Objective("ce", unit_weights)


@register_objective("dft", default_alpha=0.5)
def dynamic_fine_tuning(config: LossConfig, alpha: float) -> Objective:
    """DFT (Wu et al., 2025, arXiv 2508.05629): `w_t = alpha * p_t + (1 - alpha)`.

    With `alpha = 1` a token's gradient is that of `-p_t`: tokens the model finds unlikely learn least, and nothing
    holds the model near where it started, so it can drift (the objective keeps falling while CE rises); `alpha =
    0` is plain CE. Default alpha 0.5: half of each, the best held-out exact match on both tasks README's verdicts
    measure (the letters demo and a released 135M model's addition), where alpha 1 was the weakest arm."""
    return dft_objective(alpha)


def dft_objective(alpha: float) -> Objective:
    """DFT at `alpha`, whatever the config says (`dft.loss.dft_loss` and `fused_dft_loss` take it this way)."""
    return Objective("dft", dft_weights(alpha), alpha=alpha, settings=f"alpha {alpha:g}")


@register_objective("asft", default_alpha=1.0)
def anchored_sft(config: LossConfig, alpha: float) -> Objective:
    """ASFT (Anchored SFT, arXiv 2509.23753): DFT plus `loss.kl_coef * KL(reference || policy)` per trainable token.

    The KL to the frozen starting model is the anchor DFT lacks: it costs nothing while the policy stays close and
    pulls back a distribution that wanders. Direction `KL(q || p)`, the reference's expectation of `log q - log p`,
    as the paper and LLaMA-Factory's `use_asft_loss` write it; its gradient with respect to the policy's logits is
    `p - q`."""
    return Objective(
        "asft",
        dft_weights(alpha),
        kl_coef=config.kl_coef,
        alpha=alpha,
        settings=f"alpha {alpha:g}, kl_coef {config.kl_coef:g}",
    )


@register_objective("eaft")
def entropy_adaptive(config: LossConfig, alpha: float) -> Objective:
    """EAFT (Entropy-Adaptive Fine-Tuning, arXiv 2601.02151): CE weighted by the model's normalised top-k entropy.

    A token the model predicts with low entropy but gets wrong (a confident conflict with what it knows) gets a
    small weight, so the update does not overwrite knowledge; uncertain tokens learn at full strength.
    `loss.eaft_top_k` (k, 20) and `loss.eaft_exponent` (1) as LLaMA-Factory's `use_eaft_loss`."""
    return Objective(
        "eaft",
        power_of_feature(config.eaft_exponent),
        normalised_topk_entropy(config.eaft_top_k),
        settings=f"top-{config.eaft_top_k} entropy ** {config.eaft_exponent:g}",
    )
