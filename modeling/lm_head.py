"""The LM head as the fused losses use it: which module it is, its forward swapped for one model call, and its
logits one chunk of rows at a time.

Shared by the SFT objectives' fused loss (`dft.fused_head`, `dft.loss`) and the preference log-probabilities
(`preference.logprobs`), so that neither builds `[tokens, vocab]` logits and both run inside the head module's own
forward call: under ZeRO-3, DeepSpeed's module hooks gather the partitioned (possibly tied) head weight there, again
before the backward, and reduce its gradient, as for a stock head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from core.keys import IGNORE_INDEX

HeadParameters = contextlib.AbstractContextManager[tuple[torch.Tensor, torch.Tensor | None]]
# float32 gradients of the head's input, weight and bias, accumulated chunk by chunk (None: not needed).
HeadGradients = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
"""A context that gives an LM head's weight and bias in full while it is entered."""


class ReferenceHead(Protocol):
    """A frozen model seen through its LM head: what the head gets for a batch, the head's parameters, and the final
    logit soft-cap its forward applies after the head (None for none)."""

    logit_softcap: float | None

    def head_inputs(self, inputs: dict[str, Any]) -> torch.Tensor:
        """`[batch, seq, hidden]`: what the reference's LM head gets for these model inputs; no gradient."""

    def head_parameters(self) -> HeadParameters:
        """The reference head's full weight and bias, for the duration of the context."""


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned with input ids (HF convention) -> the target of each position's logits."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward computes the logits: the model's LM head, or, when an adapter trains the head in
    full (peft's `modules_to_save`), the module the wrapper calls (the trainable copy; the original with the adapter
    off), so that its own hooks (ZeRO-3's gather) run and its weight is the one the loss uses."""
    head = model.get_output_embeddings()
    copies = getattr(head, "modules_to_save", None)
    if isinstance(copies, torch.nn.ModuleDict):
        # With the adapter off (a KL term's reference) the wrapper calls the original head, whose weight its own
        # `weight` attribute does not give (that is the trained copy's).
        head = head.original_module if head.disable_adapters else copies[head.active_adapters[0]]
    if hasattr(head, "lora_A"):
        # A LoRA-wrapped head adds B @ A to its weight in its forward; a fused head reads the weight alone.
        raise ValueError(
            "loss.implementation=fused: the LM head carries a LoRA adapter, which the fused loss would leave out; "
            "leave the head out of model.lora.target_modules (all-linear does) or use loss.implementation=reference"
        )
    return head


def final_logit_softcap(model: torch.nn.Module) -> float | None:
    """The model's final logit soft-cap (Gemma 2's `final_logit_softcapping`), or None."""
    return getattr(model.config, "final_logit_softcapping", None)


def linear_head(model: torch.nn.Module) -> torch.nn.Module:
    """`head_module(model)`, checked to hold the weight matrix a fused head reads."""
    head = head_module(model)
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__}: the LM head {type(head).__name__} has no weight matrix; "
            "use loss.implementation=reference"
        )
    return head


@contextlib.contextmanager
def replaced_head_forward(model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within this context the model's LM head computes `forward(hidden_states)` in place of its logits.

    The head module keeps its identity (only its `forward` is shadowed by an instance attribute), so hooks
    registered on it, DeepSpeed ZeRO-3's parameter gathering and gradient reduction included, run as for
    a stock head. The model's final logit soft-cap, applied by its forward after the head, is switched off
    for the call (a fused head applies it to the logits it builds)."""
    head = head_module(model)
    config = model.config
    softcap = final_logit_softcap(model)
    head.forward = forward
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        del head.forward  # back to the class's forward
        if softcap is not None:
            config.final_logit_softcapping = softcap


def lm_head_input(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within this context the model's output `logits` are the input of its LM head, `[batch, seq, hidden]`."""
    return replaced_head_forward(model, lambda hidden_states: hidden_states)


AUTO_CHUNK_SIZE = "auto"
AUTO_CHUNK_MIN_TOKENS = 256
_LOGITS_BYTES = 4  # the chunk's logits are float32, whatever the model's dtype


def auto_chunk_size(
    num_tokens: int, hidden_size: int, vocab_size: int, hidden_dtype: torch.dtype, blocks: int = 1
) -> int:
    """Tokens per chunk of a fused head with `chunk_size="auto"`: `max(256, tokens * hidden * itemsize // (vocab
    * 4))`, from the shapes alone, so the same batch shape always gets the same chunk (and the same float32 sums).

    Memory budget: one chunk holds one float32 `[chunk, vocab]` block of logits (turned into the softmax and then the
    logits' gradient in place), so the block is kept no larger than the batch's hidden states, `[tokens, hidden]` in
    their own dtype, a tensor the step holds anyway. The naive head holds at least three float32 `[tokens, vocab]`
    blocks at once (logits, softmax, their gradient), `3 * 4 * vocab / (hidden * itemsize)` times that budget: over
    1,000 times at Qwen2.5-0.5B's float32 head (vocab 151,936, hidden 896), so the budget alone would allow a few
    tokens per chunk at the sizes of `bench/loss_head.py`; it only exceeds the floor for long batches with a wide
    hidden size (32,768 tokens x 4096 bf16 over 151,936 entries: 441 tokens).

    Floor, 256 tokens: whatever its size, each chunk streams the `[vocab, hidden]` weight twice (logits, hidden
    gradient) and the float32 weight gradient once in and out (`addmm_`), while its three matmuls do `6 * chunk *
    hidden * vocab` flops: a chunk of c rows does about c / 3 flops per byte of those passes in float32, so small
    chunks become bound by memory traffic and per-chunk overhead. At 256 rows the fused head's forward+backward took
    1.07-1.15x the time at 1024 at the sizes of `bench/loss_head.py`, and its extra peak over the gradient buffers
    was 0.014-0.064x the naive head's from 2048 tokens up (docs/benchmarks.md, 2026-12-03). At 512 x 256 x 16,384 it
    is 0.43x, and no chunk size reaches 1/8 there (measured: 0.18x at 64 tokens, 0.16x at 16, 0.10x at 1 token but
    ten times slower): the chunk's fixed temporaries and allocator slack alone are about the 13 MiB allowed.

    Args:
        num_tokens: positions in the batch (all of them: the hidden states exist for each).
        hidden_size: width of the hidden states.
        vocab_size: rows of the LM-head weight.
        hidden_dtype: dtype of the hidden states, for their bytes per element.
        blocks: `[chunk, vocab]` float32 blocks the computation holds at once: the budget is shared among them.

    Returns:
        The chunk size, in trainable tokens; at least `AUTO_CHUNK_MIN_TOKENS`.
    """
    budget_tokens = num_tokens * hidden_size * hidden_dtype.itemsize // (vocab_size * _LOGITS_BYTES * blocks)
    return max(AUTO_CHUNK_MIN_TOKENS, budget_tokens)


def resolve_chunk_size(
    chunk_size: int | str, hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, blocks: int = 1
) -> int:
    """`chunk_size` as a number of tokens: `auto_chunk_size` of the shapes for `"auto"`, else checked positive.

    Raises:
        ValueError: on a `chunk_size` that is neither `"auto"` nor a positive int.
    """
    if chunk_size == AUTO_CHUNK_SIZE:
        num_tokens = hidden_states.numel() // hidden_states.size(-1)
        chunk_size = auto_chunk_size(
            num_tokens, hidden_states.size(-1), lm_head_weight.size(0), hidden_states.dtype, blocks=blocks
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive number of tokens or {AUTO_CHUNK_SIZE!r}")
    return chunk_size


def chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of one chunk of rows, soft-capped when asked, and `tanh(logits / cap)` for the chain rule.

    The matmul runs in the weight's dtype (the hidden rows are cast, not the `[vocab, hidden]` weight) with autocast
    off, so the logits, and the gradients computed from them, do not depend on the caller's autocast state.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).float()
    if softcap is None:
        return logits, None
    # Gemma-2 style: cap * tanh(z / cap); d/dz = 1 - tanh^2, so tanh is kept for the backward.
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def head_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: Sequence[bool]
) -> HeadGradients:
    """float32 accumulators for the gradients of the head's input, weight and bias (None where none is needed)."""
    return tuple(  # type: ignore[return-value]
        torch.zeros_like(tensor, dtype=torch.float32) if tensor is not None and need else None
        for tensor, need in zip((hidden, weight, bias), needs, strict=True)
    )


def add_chunk_gradients(
    grad_logits: torch.Tensor,
    tanh: torch.Tensor | None,
    chunk_hidden: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    grads: HeadGradients,
) -> None:
    """Adds one chunk's share of the head's gradients to `grads` (`head_gradients`), from the loss's gradient with
    respect to the chunk's (soft-capped) logits, `[chunk, vocab]`, which this scales in place.

    Args:
        tanh: the chunk's `tanh(z / cap)` when the logits were soft-capped (`chunk_logits`), else None.
        chunk_hidden: the chunk's rows of the head's input; `rows` their indices in the whole input.
    """
    if tanh is not None:
        grad_logits.mul_(tanh.square_().neg_().add_(1.0))  # through cap * tanh(z / cap): 1 - tanh^2
    grad_hidden, grad_weight, grad_bias = grads
    # Autocast off, as for the logits: the gradients must not depend on the caller's autocast state.
    with torch.autocast(chunk_hidden.device.type, enabled=False):
        if grad_hidden is not None:
            grad_hidden.index_copy_(0, rows, (grad_logits.to(weight.dtype) @ weight).float())
        if grad_weight is not None:
            # float32 addmm in place: no [vocab, hidden] temporary per chunk.
            grad_weight.addmm_(grad_logits.T, chunk_hidden.float())
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)
