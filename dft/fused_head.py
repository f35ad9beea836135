"""The model's LM head swapped, for one forward call: for the fused loss (no `[tokens, vocab]` logits), or to return
its input (a reference model's hidden states for the fused KL term).

`fused_lm_head` runs the loss inside the head module's own forward call, so under ZeRO-3 DeepSpeed's module
hooks gather the partitioned (possibly tied) head weight for the forward and again for the backward, and reduce
its gradient, as for a stock head. A model's `final_logit_softcapping` is applied inside the fused loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from dft.loss import LossStats, fused_objective_loss
from dft.objectives import Objective

HeadParameters = contextlib.AbstractContextManager[tuple[torch.Tensor, torch.Tensor | None]]
"""A context that gives an LM head's weight and bias in full while it is entered."""


class _FusedHeadResult:
    """What the swapped head leaves behind besides its output: the micro-batch's detached statistics."""

    stats: LossStats | None = None


@contextlib.contextmanager
def _head_forward(model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within this context the model's LM head computes `forward(hidden_states)` in place of its logits.

    The head module keeps its identity (only its `forward` is shadowed by an instance attribute), so hooks
    registered on it, DeepSpeed ZeRO-3's parameter gathering and gradient reduction included, run as for
    a stock head. The model's final logit soft-cap, applied by its forward after the head, is switched off
    for the call (the fused loss applies it to the logits it builds)."""
    head = head_module(model)
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
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
    return _head_forward(model, lambda hidden_states: hidden_states)


@contextlib.contextmanager
def fused_lm_head(
    model: torch.nn.Module,
    labels: torch.Tensor,
    objective: Objective,
    num_items_in_batch: torch.Tensor | int | None,
    chunk_size: int | str,
    token_groups: torch.Tensor | None = None,
    num_groups: int | None = None,
    reference_head_inputs: torch.Tensor | None = None,
    reference_head: Callable[[], HeadParameters] | None = None,
) -> Iterator[_FusedHeadResult]:
    """Within this context the model's LM head returns the scalar fused loss of `objective` in place of the logits.

    Args:
        model: the unwrapped causal LM (`get_output_embeddings()` gives its head, a linear layer).
        labels, objective, num_items_in_batch, chunk_size, token_groups, num_groups: as for `fused_objective_loss`.
        reference_head_inputs, reference_head: for an objective with a KL term, the reference model's LM-head input
            for this batch (`dft.reference.ReferenceModel.head_inputs`) and a context giving that head's weight and
            bias (its `head_parameters`), entered inside the policy head's call, where ZeRO-3 gathers both heads.

    Yields:
        A record whose `stats` the head's call fills in.
    """
    head = head_module(model)
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__}: the LM head {type(head).__name__} has no weight matrix; "
            "use loss.implementation=reference"
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    result = _FusedHeadResult()

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # head.weight here, not before the call: under ZeRO-3 it is gathered only inside the head's forward.
        parameters = reference_head() if reference_head is not None else contextlib.nullcontext((None, None))
        with parameters as (reference_weight, reference_bias):
            loss, result.stats = fused_objective_loss(
                hidden_states,
                head.weight,
                labels,
                objective,
                num_items_in_batch=num_items_in_batch,
                chunk_size=chunk_size,
                logit_softcap=softcap,
                lm_head_bias=head.bias,
                token_groups=token_groups,
                num_groups=num_groups,
                reference_hidden_states=reference_head_inputs,
                reference_lm_head_weight=reference_weight,
                reference_lm_head_bias=reference_bias,
            )
        return loss

    with _head_forward(model, forward):
        yield result


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
        # A LoRA-wrapped head adds B @ A to its weight in its forward; the fused loss reads the weight alone.
        raise ValueError(
            "loss.implementation=fused: the LM head carries a LoRA adapter, which the fused loss would leave out; "
            "leave the head out of model.lora.target_modules (all-linear does) or use loss.implementation=reference"
        )
    return head
