"""The model's LM head swapped, for one forward call, for the fused DFT loss: no `[tokens, vocab]` logits.

`fused_lm_head` runs the loss inside the head module's own forward call, so under ZeRO-3 DeepSpeed's module
hooks gather the partitioned (possibly tied) head weight for the forward and again for the backward, and reduce
its gradient, as for a stock head. A model's `final_logit_softcapping` is applied inside the fused loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dft.loss import DFTStats, fused_dft_loss


class _FusedHeadResult:
    """What the swapped head leaves behind besides its output: the micro-batch's detached statistics."""

    stats: DFTStats | None = None


@contextlib.contextmanager
def fused_lm_head(
    model: torch.nn.Module,
    labels: torch.Tensor,
    alpha: float,
    num_items_in_batch: torch.Tensor | int | None,
    chunk_size: int | str,
    token_groups: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> Iterator[_FusedHeadResult]:
    """Within this context the model's LM head returns the scalar fused DFT loss in place of the logits.

    The head module keeps its identity (only its `forward` is shadowed by an instance attribute), so hooks
    registered on it, DeepSpeed ZeRO-3's parameter gathering and gradient reduction included, run as for
    a stock head. The model's final logit soft-cap, applied by its forward after the head, is switched off
    for the call and applied inside the loss instead, where it acts on the logits and not on the loss.

    Args:
        model: the unwrapped causal LM (`get_output_embeddings()` gives its head, a linear layer).
        labels, alpha, num_items_in_batch, chunk_size, token_groups, num_groups: as for `fused_dft_loss`.

    Yields:
        A record whose `stats` the head's call fills in.
    """
    head = _head_module(model)
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__}: the LM head {type(head).__name__} has no weight matrix; "
            "use loss.implementation=reference"
        )
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    result = _FusedHeadResult()

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # head.weight here, not before the call: under ZeRO-3 it is gathered only inside the head's forward.
        loss, result.stats = fused_dft_loss(
            hidden_states,
            head.weight,
            labels,
            alpha,
            num_items_in_batch=num_items_in_batch,
            chunk_size=chunk_size,
            logit_softcap=softcap,
            lm_head_bias=head.bias,
            token_groups=token_groups,
            num_groups=num_groups,
        )
        return loss

    head.forward = forward
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        yield result
    finally:
        del head.forward  # back to the class's forward
        if softcap is not None:
            config.final_logit_softcapping = softcap


def _head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward computes the logits: the model's LM head, or, when an adapter trains the head in
    full (peft's `modules_to_save`), the trainable copy the wrapper calls, so that its own hooks (ZeRO-3's gather)
    run and its weight is the one the loss uses."""
    head = model.get_output_embeddings()
    copies = getattr(head, "modules_to_save", None)
    if isinstance(copies, torch.nn.ModuleDict) and not head.disable_adapters:
        head = copies[head.active_adapters[0]]
    if hasattr(head, "lora_A"):
        # A LoRA-wrapped head adds B @ A to its weight in its forward; the fused loss reads the weight alone.
        raise ValueError(
            "loss.implementation=fused: the LM head carries a LoRA adapter, which the fused loss would leave out; "
            "leave the head out of model.lora.target_modules (all-linear does) or use loss.implementation=reference"
        )
    return head
