"""The model's LM head swapped, for one forward call, for the fused loss of an objective (no `[tokens, vocab]`
logits); the swapping itself, and the head's input for a reference model, are `modeling.lm_head`'s.

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
from modeling.lm_head import HeadParameters, final_logit_softcap, linear_head, replaced_head_forward


class _FusedHeadResult:
    """What the swapped head leaves behind besides its output: the micro-batch's detached statistics."""

    stats: LossStats | None = None


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
    head = linear_head(model)
    softcap = final_logit_softcap(model)
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

    with replaced_head_forward(model, forward):
        yield result
