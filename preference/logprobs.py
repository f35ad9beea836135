"""Sequence log-probabilities for preference losses: per row of a batch, `sum_t log p(label_t)` over its label
tokens, computed from the LM head's input one chunk of tokens at a time, so no `[tokens, vocab]` logits exist.

`summed_label_logprobs` runs this inside the model's own forward (the LM head's call, swapped as the SFT objectives'
fused head is: `modeling.lm_head`), so under ZeRO-3 the partitioned head weight is gathered for the forward and again
before the backward, which recomputes each chunk's softmax. `reference_label_logprobs` gives the same sums for a
frozen reference model (`dft.reference.FrozenCopy` or `DisabledAdapter`, any `modeling.lm_head.ReferenceHead`),
without gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from core.keys import IGNORE_INDEX
from modeling.lm_head import (
    AUTO_CHUNK_SIZE,
    ReferenceHead,
    add_chunk_gradients,
    chunk_logits,
    final_logit_softcap,
    head_gradients,
    linear_head,
    replaced_head_forward,
    resolve_chunk_size,
    shift_labels,
)


def _chunk_log_softmax_at(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk's `log p(target)` per row, with its unnormalised softmax (in place of the logits), the row sums of
    that softmax and `tanh(z / cap)` (None without a cap), which the backward turns into the logits' gradient."""
    logits, tanh = chunk_logits(hidden, weight, bias, softcap)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    # logsumexp by hand, in place: torch.logsumexp would allocate a second [chunk, vocab] block.
    row_max = logits.amax(dim=-1)
    exp_logits = logits.sub_(row_max[:, None]).exp_()
    sum_exp = exp_logits.sum(dim=-1)
    return target_logits - row_max - sum_exp.log(), exp_logits, sum_exp, tanh


class _ChunkedSequenceLogprobs(torch.autograd.Function):
    """`out[r] = sum over the tokens t of row r of log softmax(hidden_t @ weight.T + bias)[target_t]`, chunk by chunk.

    The forward keeps no logits. Unlike the SFT objectives' scalar loss, the output is a vector whose upstream
    gradient (one scalar per row) is known only in the backward, and the weight's gradient `sum_t g_row(t) (onehot_t
    - softmax_t)^T hidden_t` cannot be split per row without a `[vocab, hidden]` buffer per row: so the backward
    recomputes each chunk's softmax (one more matmul than the forward-computed gradient of `dft.loss`).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        token_rows: torch.Tensor,
        num_rows: int,
        chunk_size: int,
        softcap: float | None,
    ) -> torch.Tensor:
        logprobs = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens.numel(), chunk_size):
            end = start + chunk_size
            chunk_hidden = hidden.index_select(0, tokens[start:end])
            token_logprobs, *_ = _chunk_log_softmax_at(chunk_hidden, weight, bias, targets[start:end], softcap)
            logprobs.index_add_(0, token_rows[start:end], token_logprobs)
        # Saved as DeepSpeed's own ZeRO-3 linear function saves them: under ZeRO-3 the weight's storage is released
        # after the head's forward and gathered again (by the head module's pre-backward hook) before this backward.
        ctx.save_for_backward(hidden, weight, bias, tokens, targets, token_rows)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_logprobs: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, tokens, targets, token_rows = ctx.saved_tensors
        # float32 buffers: the weight and bias gradients sum over every chunk.
        grads = head_gradients(hidden, weight, bias, ctx.needs_input_grad[:3])
        token_grads = grad_logprobs.float()[token_rows]
        for start in range(0, tokens.numel(), ctx.chunk_size):
            end = start + ctx.chunk_size
            chunk_tokens, chunk_targets, g = tokens[start:end], targets[start:end], token_grads[start:end]
            chunk_hidden = hidden.index_select(0, chunk_tokens)
            _, exp_logits, sum_exp, tanh = _chunk_log_softmax_at(chunk_hidden, weight, bias, chunk_targets, ctx.softcap)
            # d log p(target) / d logits = onehot - softmax, times the row's upstream gradient; in place of the block.
            grad_logits = exp_logits.div_(sum_exp[:, None]).mul_(-g[:, None])
            grad_logits[torch.arange(chunk_tokens.numel(), device=grad_logits.device), chunk_targets] += g
            add_chunk_gradients(grad_logits, tanh, chunk_hidden, chunk_tokens, weight, grads)
            del exp_logits, grad_logits, tanh  # free this chunk before the next one is allocated
        grads = (
            None if grad is None else grad.to(tensor.dtype)
            for grad, tensor in zip(grads, (hidden, weight, bias), strict=True)
        )
        return (*grads, None, None, None, None, None, None)


def sequence_logprobs(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | str = AUTO_CHUNK_SIZE,
    logit_softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per row, the summed log-probability of its label tokens, without materialising the `[tokens, vocab]` logits.

    Same value and gradients as `log_softmax(hidden_states @ lm_head_weight.T + bias).gather(labels shifted).sum(1)`
    over the positions whose shifted label is not `ignore_index`, but logits exist one chunk of label tokens at a
    time (forward, then again in the backward). Tokens without a label are never projected, and their hidden states
    get a zero gradient; a row with no label token gives 0.

    Args:
        hidden_states: `[batch, seq, hidden]`, the input of the LM head (after the final norm).
        lm_head_weight: `[vocab, hidden]`. The matmul runs in its dtype; the log-softmax and the sums in float32.
        labels: `[batch, seq]`, aligned with the input ids (HF convention); shifted here, as for a causal LM.
        chunk_size: label tokens per chunk of logits (peak extra memory is one `[chunk_size, vocab]` float32 block
            and its float32 temporaries), or `"auto"` (`modeling.lm_head.auto_chunk_size` of the shapes).
        logit_softcap: when set, logits become `cap * tanh(logits / cap)` (Gemma 2) before the softmax.
        lm_head_bias: `[vocab]`, when the LM head has a bias.
        ignore_index: label value of tokens that are not summed.

    Returns:
        `[batch]` float32 log-probabilities, differentiable in `hidden_states`, `lm_head_weight` and `lm_head_bias`.

    Raises:
        ValueError: on shapes that do not match, a bad `chunk_size` or a non-positive `logit_softcap`.
    """
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap={logit_softcap}: must be positive, or None for no soft-cap")
    if hidden_states.dim() != 3 or hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} do not match: expected "
            "[batch, seq, hidden] and [batch, seq]"
        )
    if hidden_states.size(-1) != lm_head_weight.size(-1):
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} and lm_head_weight {tuple(lm_head_weight.shape)} do not "
            "match: expected [..., hidden] and [vocab, hidden]"
        )
    chunk_size = resolve_chunk_size(chunk_size, hidden_states, lm_head_weight)
    batch, seq = labels.shape
    targets = shift_labels(labels, ignore_index).reshape(-1).to(hidden_states.device)
    tokens = (targets != ignore_index).nonzero().squeeze(1)
    return _ChunkedSequenceLogprobs.apply(
        hidden_states.reshape(-1, hidden_states.size(-1)),
        lm_head_weight,
        lm_head_bias,
        tokens,
        targets[tokens],
        torch.div(tokens, seq, rounding_mode="floor"),
        batch,
        chunk_size,
        logit_softcap,
    )


class SequenceLogprobsHead:
    """What `summed_label_logprobs` leaves behind: the head's output of the model call made inside it."""

    logprobs: torch.Tensor | None = None
    """`[batch]` float32 per-row summed label log-probabilities, grad-carrying; None until the head has run."""


@contextlib.contextmanager
def summed_label_logprobs(
    model: torch.nn.Module, labels: torch.Tensor, chunk_size: int | str = AUTO_CHUNK_SIZE
) -> Iterator[SequenceLogprobsHead]:
    """Within this context the model's LM head returns `sequence_logprobs` of `labels` in place of its logits.

    Usage (the model called through its DeepSpeed/DDP wrapper, so its forward bookkeeping runs as usual)::

        with summed_label_logprobs(unwrapped_model, labels, chunk_size) as head:
            model(**inputs)  # without labels: the model must not compute its own loss
        logprobs = head.logprobs  # [batch], as the head module's hooks returned it

    `head.logprobs` is the head module's output after its forward hooks (also the model output's `logits`): under
    ZeRO-3 that output carries the hook that gathers the head weight again before the backward recomputes the
    logits. The model's `final_logit_softcapping` is applied here and switched off in its own forward for the call.

    Args:
        model: the unwrapped causal LM (`get_output_embeddings()` gives its head, a linear layer; with peft's
            `modules_to_save` the trained copy).
        labels: `[batch, seq]`, aligned with the input ids, `IGNORE_INDEX` where nothing is scored.
        chunk_size: as for `sequence_logprobs`.

    Yields:
        A record whose `logprobs` the head's call fills in.

    Raises:
        ValueError: when the head has no weight matrix, or carries a LoRA adapter (its update would be left out).
    """
    head = linear_head(model)
    softcap = final_logit_softcap(model)
    result = SequenceLogprobsHead()

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # head.weight here, not before the call: under ZeRO-3 it is gathered only inside the head's forward.
        return sequence_logprobs(
            hidden_states, head.weight, labels, chunk_size, logit_softcap=softcap, lm_head_bias=head.bias
        )

    def record_output(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
        # Registered after DeepSpeed's hooks, so it sees the output they return (with the pre-backward gather).
        result.logprobs = output

    hook = head.register_forward_hook(record_output)
    try:
        with replaced_head_forward(model, forward):
            yield result
    finally:
        hook.remove()


@torch.no_grad()
def reference_label_logprobs(
    reference: ReferenceHead,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    chunk_size: int | str = AUTO_CHUNK_SIZE,
) -> torch.Tensor:
    """A frozen reference model's per-row summed label log-probabilities (DPO's `log pi_ref(y | x)`), no gradient.

    Args:
        reference: the reference model (`dft.reference.FrozenCopy` or `DisabledAdapter`): its LM head's input for
            the batch, and the head's weight and bias, gathered under ZeRO-3 while the chunks are computed.
        inputs: the model inputs of the batch, without labels (the policy's, so positions and packing agree).
        labels: `[batch, seq]`, as for `sequence_logprobs`.
        chunk_size: as for `sequence_logprobs`. The reference's final logit soft-cap (`logit_softcap`, which its
            forward leaves out while it returns the head's input) is applied here.

    Returns:
        `[batch]` float32 log-probabilities, detached.
    """
    hidden_states = reference.head_inputs(inputs)
    with reference.head_parameters() as (weight, bias):
        return sequence_logprobs(
            hidden_states, weight, labels, chunk_size, logit_softcap=reference.logit_softcap, lm_head_bias=bias
        )
