"""The objectives' losses as pure functions: on full logits (the reference) and fused, from the hidden states.

Every objective (`dft.objectives`) is

    loss = sum_t (w_t * CE_t + kl_coef * KL_t(reference || policy)) / N

with a stop-gradient on the per-token weight `w_t`: DFT re-weights each trainable token's cross-entropy by
`w_t = alpha * p_t + (1 - alpha)`, `p_t = exp(-CE_t)` the model's own detached probability of the correct token
(`alpha=1` is the paper's DFT, `alpha=0` plain SFT cross-entropy; no second softmax over the vocabulary). `N` is
the number of trainable tokens of the whole optimizer step (`num_items_in_batch`, summed over gradient-accumulation
micro-batches and ranks by the Trainer) so that the update does not depend on how a step is split; without it, the
micro-batch's own count is used.

The fused loss sizes its chunks of logits itself by default (`chunk_size="auto"`, `auto_chunk_size`); with a KL
term it projects the reference model's hidden states through the reference's head chunk by chunk too, so neither
model's `[tokens, vocab]` logits exist.

Both functions can also split their statistics by a per-token group (`token_groups`, e.g. the data
source of each token): `LossStats.group_sums` then holds the same sums per group, computed from the
per-token values the loss has anyway, so the fused path still builds no `[tokens, vocab]` block.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from config.schema import LossConfig
from core.keys import IGNORE_INDEX
from core.metric_sums import GROUP_SUM_COLUMNS
from dft.objectives import Objective, dft_objective
from modeling.lm_head import add_chunk_gradients, chunk_logits, head_gradients, resolve_chunk_size, shift_labels
from modeling.lm_head import auto_chunk_size as auto_chunk_size  # re-exported: the `loss.chunk_size=auto` rule


class LossStats(NamedTuple):
    """Detached sums over the valid tokens of one micro-batch: reduce sums and counts, then divide.

    `sum_kl` is None unless the objective has a KL term (then `sum_t KL_t`, unweighted). `group_sums` is None unless
    `token_groups` was given: then a float64 `[num_groups, len(GROUP_SUM_COLUMNS)]` tensor of the same sums per
    group (a group with no valid token has a zero row).
    """

    sum_p_correct: torch.Tensor
    sum_nll: torch.Tensor
    num_tokens: torch.Tensor
    group_sums: torch.Tensor | None = None
    sum_kl: torch.Tensor | None = None


def _check_groups(token_groups: torch.Tensor | None, num_groups: int | None, labels: torch.Tensor) -> None:
    if token_groups is None:
        return
    if num_groups is None or num_groups < 1:
        raise ValueError(f"num_groups={num_groups}: give the number of groups (>= 1) along with token_groups")
    if token_groups.shape != labels.shape:
        raise ValueError(
            f"token_groups {tuple(token_groups.shape)} and labels {tuple(labels.shape)} do not match: "
            "expected one group per label"
        )


def _check_reference(objective: Objective, has_reference: bool) -> None:
    if objective.needs_reference and not has_reference:
        raise ValueError(f"loss.type={objective.name}: the KL term needs the reference model's logits or hidden states")
    if has_reference and not objective.needs_reference:
        raise ValueError(f"loss.type={objective.name} has no KL term: do not pass a reference")


def _group_sums(groups: torch.Tensor, nll: torch.Tensor, token_weights: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group `GROUP_SUM_COLUMNS` of the valid tokens' detached `nll`, in float64 (exact counts, no drift)."""
    nll = nll.detach().double()
    values = torch.stack([torch.exp(-nll), nll, nll * token_weights.double(), torch.ones_like(nll)], dim=1)
    sums = torch.zeros(num_groups, len(GROUP_SUM_COLUMNS), dtype=torch.float64, device=nll.device)
    return sums.index_add_(0, groups.to(nll.device), values)


def objective_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    token_groups: torch.Tensor | None = None,
    num_groups: int | None = None,
    reference_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """An objective (`dft.objectives`) on full logits: the reference formulation of the fused head.

    Args:
        logits: `[batch, seq, vocab]` in any float dtype; computed in float32.
        labels: `[batch, seq]`, aligned with the input ids; shifted here.
        objective: what to compute: `sum_t (w_t * CE_t + kl_coef * KL_t) / N`.
        ignore_index: label value of tokens that are not trained.
        num_items_in_batch: denominator `N`; the count of valid tokens when None.
        token_groups: `[batch, seq]` group ids in `[0, num_groups)`, aligned with `labels` (a token counts in
            its label's group; positions whose label is ignored may hold anything); fills `LossStats.group_sums`.
        num_groups: the number of groups, so that every micro-batch (and rank) gives the same shape.
        reference_logits: `[batch, seq, vocab]`, the frozen starting model's logits of the same inputs; given
            exactly when the objective has a KL term.

    Returns:
        The scalar loss and the micro-batch's `LossStats`. With no valid token the loss is a zero still connected
        to the graph, so every parameter gets a (zero) gradient and sharded optimizers stay in step.
    """
    _check_groups(token_groups, num_groups, labels)
    _check_reference(objective, reference_logits is not None)
    targets = shift_labels(labels, ignore_index).reshape(-1)
    flat_logits = logits.float().reshape(-1, logits.size(-1))
    nll = F.cross_entropy(flat_logits, targets, ignore_index=ignore_index, reduction="none")
    valid = targets != ignore_index
    feature = objective.logit_feature(flat_logits) if objective.logit_feature is not None else None
    token_weights = objective.token_weights(nll, feature)
    token_loss = nll * token_weights
    sum_kl = None
    if reference_logits is not None:
        log_p = torch.log_softmax(flat_logits, dim=-1)
        log_q = torch.log_softmax(reference_logits.detach().float().reshape(-1, logits.size(-1)), dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        token_loss = token_loss + objective.kl_coef * kl
        sum_kl = (kl.detach() * valid).sum()
    num_valid = valid.sum()
    group_sums = None
    if token_groups is not None:
        groups = shift_labels(token_groups, 0).reshape(-1).to(valid.device)
        group_sums = _group_sums(groups[valid], nll[valid], token_weights[valid], num_groups)
    stats = LossStats(
        sum_p_correct=(torch.exp(-nll.detach()) * valid).sum(),
        sum_nll=(nll.detach() * valid).sum(),
        num_tokens=num_valid,
        group_sums=group_sums,
        sum_kl=sum_kl,
    )
    return (token_loss * valid).sum() / _loss_denominator(num_valid, num_items_in_batch), stats


def dft_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, **kwargs: Any) -> tuple[torch.Tensor, LossStats]:
    """`objective_loss` with DFT's weights at `alpha` (0 gives cross-entropy); the keywords are its."""
    return objective_loss(logits, labels, dft_objective(alpha), **kwargs)


def _loss_denominator(num_valid: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | int:
    """The step's token count when given, else the micro-batch's own count (at least 1, so never 0/0)."""
    denominator = num_items_in_batch if num_items_in_batch is not None else num_valid.clamp(min=1)
    return denominator.to(num_valid.device) if torch.is_tensor(denominator) else denominator


class _ChunkReference(NamedTuple):
    """The frozen starting model's side of a KL term: its hidden states (flattened) and LM head."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a * b).sum(-1)` for `[rows, vocab]` blocks without a third block: a batched matmul."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _FusedLinearObjective(torch.autograd.Function):
    """`sum_t (w_t * CE_t + kl_coef * KL_t)` over the given rows of `hidden @ weight.T (+ bias)`, one chunk of logits
    at a time.

    Also returns the rows' per-token `CE_t`, weights and `KL_t`, not differentiable, for the statistics. When
    gradients are wanted the forward computes them too, chunk by chunk, while each chunk's logits exist (as Liger's
    fused linear cross-entropy does): three matmuls per chunk instead of the four of a recomputing backward, and
    nothing but per-token vectors and the float32 gradient buffers is kept. The loss is a scalar, so the backward
    only scales those buffers by its upstream gradient. Without a KL term no pass holds more than one `[chunk,
    vocab]` block (plus its float32 temporaries); with one, the reference's log-probabilities and probabilities of
    the chunk add two more (`KL_BLOCKS`), and no reference gradient is ever computed.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        targets: torch.Tensor,
        objective: Objective,
        reference: _ChunkReference | None,
        chunk_size: int,
        softcap: float | None,
        needs_grad: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        nll = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        token_weights = torch.empty_like(nll)
        kl = torch.zeros_like(nll)
        # float32 buffers: each hidden row is written once but scaled again in the backward, and the weight
        # and bias gradients sum over every chunk.
        grads = head_gradients(hidden, weight, bias, needs_grad)
        for start in range(0, rows.numel(), chunk_size):
            end = start + chunk_size
            chunk_rows = rows[start:end]
            chunk_hidden = hidden.index_select(0, chunk_rows)
            logits, tanh = chunk_logits(chunk_hidden, weight, bias, softcap)
            feature = objective.logit_feature(logits) if objective.logit_feature is not None else None
            target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
            # logsumexp by hand, in place: torch.logsumexp would allocate a second [chunk, vocab] block, and the
            # exponentials it throws away are the softmax the gradient needs.
            row_max = logits.amax(dim=-1)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            shifted = logits.sub_(row_max[:, None])
            q = None
            if reference is not None:
                # KL(q || p) = sum_v q log q - sum_v q z' + log sum_v exp(z'), z' = z - max z: every term a few
                # nats at most, so float32 keeps the small KL of a policy near its start (no cancellation of lse).
                log_q, _ = chunk_logits(reference.hidden.index_select(0, chunk_rows), *reference[1:], softcap)
                log_q = log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
                q = log_q.exp()
                kl[start:end] = _row_dot(q, log_q) - _row_dot(q, shifted)
                del log_q
            exp_logits = shifted.exp_()
            sum_exp = exp_logits.sum(dim=-1)
            log_sum_exp = sum_exp.log()
            nll[start:end] = row_max + log_sum_exp - target_logits
            if q is not None:
                kl[start:end] += log_sum_exp
            chunk_weights = objective.token_weights(nll[start:end], feature)
            token_weights[start:end] = chunk_weights
            if any(needs_grad):
                # d(w_t CE_t + c KL_t)/d(logits_t) = w_t (softmax_t - onehot_t) + c (softmax_t - q_t), w_t held
                # constant (stop-gradient).
                grad_logits = exp_logits.div_(sum_exp[:, None])  # softmax, in place of the logits
                if q is not None:
                    grad_logits.mul_(chunk_weights[:, None] + objective.kl_coef).sub_(q.mul_(objective.kl_coef))
                else:
                    grad_logits.mul_(chunk_weights[:, None])
                arange = torch.arange(chunk_rows.numel(), device=grad_logits.device)
                grad_logits[arange, targets[start:end]] -= chunk_weights
                add_chunk_gradients(grad_logits, tanh, chunk_hidden, chunk_rows, weight, grads)
                del grad_logits
            del logits, shifted, exp_logits, tanh, q  # free this chunk before the next one is allocated
        # Held on the context, not saved for backward: the backward scales them in place and drops them, so no
        # second [vocab, hidden] float32 copy ever exists.
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(nll, token_weights, kl)
        return (nll * token_weights).sum() + objective.kl_coef * kl.sum(), nll, token_weights, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_loss_sum: torch.Tensor,
        *_grad_statistics: torch.Tensor,
    ) -> tuple[torch.Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_objective_loss: a second backward through one loss (retain_graph) is unsupported")
        scale = grad_loss_sum.float()
        scaled = [
            None if grad is None else grad.mul_(scale).to(dtype) for grad, dtype in zip(grads, ctx.dtypes, strict=True)
        ]
        return (*scaled, None, None, None, None, None, None, None)


# [chunk, vocab] float32 blocks a chunk holds at once with a KL term: the policy's logits (then softmax, then
# gradient), the reference's log-probabilities and its probabilities.
KL_BLOCKS = 3


def fused_objective_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | str = LossConfig.chunk_size,
    logit_softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    token_groups: torch.Tensor | None = None,
    num_groups: int | None = None,
    reference_hidden_states: torch.Tensor | None = None,
    reference_lm_head_weight: torch.Tensor | None = None,
    reference_lm_head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """An objective from the hidden states, without materialising the `[tokens, vocab]` logits.

    Same value, gradients and statistics as `objective_loss(hidden_states @ lm_head_weight.T, ...,
    reference_logits=reference_hidden_states @ reference_lm_head_weight.T)`, but logits exist one chunk of valid
    tokens at a time, in the forward, which also computes the gradients when autograd will want them. Tokens whose
    target is `ignore_index` are never projected, and their hidden states get a zero gradient.

    Args:
        hidden_states: `[batch, seq, hidden]`, the input of the LM head (after the final norm).
        lm_head_weight: `[vocab, hidden]`. The matmul runs in its dtype; logsumexp and CE in float32.
        labels: `[batch, seq]`, aligned with the input ids; shifted here.
        objective: what to compute (`dft.objectives`).
        ignore_index: label value of tokens that are not trained.
        num_items_in_batch: denominator; the count of valid tokens when None.
        chunk_size: valid tokens per chunk of logits (peak extra memory is one `[chunk_size, vocab]` float32
            block and its float32 temporaries, `KL_BLOCKS` with a KL term), or `"auto"` (the default):
            `auto_chunk_size` of the batch's shapes, divided among the blocks.
        logit_softcap: when set, logits (the reference's too) become `cap * tanh(logits / cap)` (Gemma-2) before
            the softmax.
        lm_head_bias: `[vocab]`, when the LM head has a bias.
        token_groups, num_groups: as for `objective_loss`; the group sums come from the per-token CE of the chunk
            loop, with no extra pass over the vocabulary.
        reference_hidden_states, reference_lm_head_weight, reference_lm_head_bias: the frozen starting model's
            input of its LM head for the same tokens, and that head; given exactly when the objective has a KL
            term. Never differentiated.

    Returns:
        The float32 scalar loss and the micro-batch's detached `LossStats`. With no valid token the loss is a zero
        still connected to the graph: the hidden states, weight and bias get zero gradients, not None.

    Raises:
        ValueError: on a `chunk_size` that is neither `"auto"` nor a positive int, a non-positive
            `logit_softcap`, shapes that do not match, `token_groups` without `num_groups`, or a reference given
            to an objective without a KL term (or missing for one with it).
    """
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap={logit_softcap}: must be positive, or None for no soft-cap")
    if hidden_states.shape[:-1] != labels.shape or hidden_states.size(-1) != lm_head_weight.size(-1):
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)}, lm_head_weight {tuple(lm_head_weight.shape)} and labels "
            f"{tuple(labels.shape)} do not match: expected [batch, seq, hidden], [vocab, hidden] and [batch, seq]"
        )
    _check_reference(objective, reference_hidden_states is not None)
    reference = None
    if reference_hidden_states is not None:
        if reference_lm_head_weight is None or reference_hidden_states.shape[:-1] != labels.shape:
            raise ValueError(
                f"reference_hidden_states {tuple(reference_hidden_states.shape)} must be [batch, seq, hidden] like "
                f"labels {tuple(labels.shape)}, with reference_lm_head_weight"
            )
        if reference_lm_head_weight.size(0) != lm_head_weight.size(0):
            raise ValueError(
                f"the reference's LM head has {reference_lm_head_weight.size(0)} rows, the policy's "
                f"{lm_head_weight.size(0)}: the KL needs one vocabulary"
            )
        reference = _ChunkReference(
            reference_hidden_states.detach().reshape(-1, reference_hidden_states.size(-1)),
            reference_lm_head_weight.detach(),
            None if reference_lm_head_bias is None else reference_lm_head_bias.detach(),
        )
    chunk_size = resolve_chunk_size(
        chunk_size, hidden_states, lm_head_weight, blocks=KL_BLOCKS if reference is not None else 1
    )
    _check_groups(token_groups, num_groups, labels)
    targets = shift_labels(labels, ignore_index).reshape(-1).to(hidden_states.device)
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)
    grad_enabled = torch.is_grad_enabled()
    needs_grad = tuple(
        grad_enabled and tensor is not None and tensor.requires_grad
        for tensor in (hidden_states, lm_head_weight, lm_head_bias)
    )
    loss_sum, nll, token_weights, kl = _FusedLinearObjective.apply(
        hidden_states.reshape(-1, hidden_states.size(-1)),
        lm_head_weight,
        lm_head_bias,
        rows,
        targets[rows],
        objective,
        reference,
        chunk_size,
        logit_softcap,
        needs_grad,
    )
    num_valid = valid.sum()
    group_sums = None
    if token_groups is not None:
        groups = shift_labels(token_groups, 0).reshape(-1).to(rows.device)[rows]
        group_sums = _group_sums(groups, nll, token_weights, num_groups)
    stats = LossStats(
        sum_p_correct=torch.exp(-nll).sum(),
        sum_nll=nll.sum(),
        num_tokens=num_valid,
        group_sums=group_sums,
        sum_kl=kl.sum() if reference is not None else None,
    )
    return loss_sum / _loss_denominator(num_valid, num_items_in_batch), stats


def fused_dft_loss(
    hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, alpha: float, **kwargs: Any
) -> tuple[torch.Tensor, LossStats]:
    """`fused_objective_loss` with DFT's weights at `alpha` (0 gives cross-entropy); the keywords are its."""
    return fused_objective_loss(hidden_states, lm_head_weight, labels, dft_objective(alpha), **kwargs)
