"""The frozen starting model an objective's KL term compares the policy with (`loss.type=asft`).

Two forms, one interface (`ReferenceModel`):
- `FrozenCopy`: a second copy of the starting model, frozen. Under ZeRO-3 it is a DeepSpeed engine of its own,
  partitioned like the policy (each rank holds `1 / world` of its parameters, gathered module by module in its
  forward, never a full copy per GPU); under DDP, ZeRO-1/2 or one process it is a plain frozen copy on the device.
- `DisabledAdapter`: for an adapter run (`model.adapter=lora|qlora`) the starting model is the base itself: the
  policy's forward with the adapter switched off, so no second copy exists.

Either gives the fused head what it needs, without `[tokens, vocab]` logits: the input of the LM head for the
batch (`head_inputs`, the same `position_ids` and packing boundaries as the policy's, since it is the policy's batch)
and the head's weight and bias (`head_parameters`, gathered under ZeRO-3 for the duration of the loss). The
reference (full-logits) head gets the reference's logits (`logits`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from modeling.lm_head import ReferenceHead, final_logit_softcap, head_module, lm_head_input


class ReferenceModel(ReferenceHead, Protocol):
    """A `ReferenceHead` (what the fused heads need) that also gives full logits (the reference head's need)."""

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """`[batch, seq, vocab]`: the reference's logits for these model inputs; no gradient."""


@contextlib.contextmanager
def gathered(parameters: list[torch.Tensor | None]) -> Iterator[None]:
    """ZeRO-3-partitioned parameters gathered in full for the context (read-only); others as they are.

    A parameter already gathered (the policy's own head weight inside the policy head's forward, or a tied
    embedding) is left alone: gathering or releasing it twice would break DeepSpeed's bookkeeping."""
    partitioned = [p for p in parameters if p is not None and _is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _is_partitioned(parameter: torch.Tensor) -> bool:
    if not hasattr(parameter, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return parameter.ds_status == ZeroParamStatus.NOT_AVAILABLE


class FrozenCopy:
    """A frozen copy of the starting model: a DeepSpeed ZeRO-3 engine, or a plain module on the device."""

    def __init__(self, model: torch.nn.Module, engine: torch.nn.Module | None = None) -> None:
        """
        Args:
            model: the loaded starting model (under ZeRO-3 loaded partitioned, as the policy is).
            engine: what to call it through: its DeepSpeed engine under ZeRO-3, else None (the model itself).
        """
        self.model = model
        self.engine = engine if engine is not None else model
        self.model.requires_grad_(False)
        self.engine.eval()
        self.logit_softcap = final_logit_softcap(model)

    @torch.no_grad()
    def head_inputs(self, inputs: dict[str, Any]) -> torch.Tensor:
        with lm_head_input(self.model):
            return self.engine(**inputs).logits

    @torch.no_grad()
    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.engine(**inputs).logits

    @contextlib.contextmanager
    def head_parameters(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        head = head_module(self.model)
        with gathered([head.weight, head.bias]):
            yield head.weight, head.bias


class DisabledAdapter:
    """The base model of an adapter run: the policy's own forward with its adapter switched off."""

    def __init__(self, wrapped: torch.nn.Module, peft_model: torch.nn.Module) -> None:
        """
        Args:
            wrapped: the policy as the Trainer calls it (its DeepSpeed or DDP wrapper, or the model itself).
            peft_model: the unwrapped `peft.PeftModel`.
        """
        self.wrapped = wrapped
        self.peft_model = peft_model
        self.logit_softcap = final_logit_softcap(peft_model)

    @torch.no_grad()
    def head_inputs(self, inputs: dict[str, Any]) -> torch.Tensor:
        with self.peft_model.disable_adapter(), lm_head_input(self.peft_model):
            return self.wrapped(**inputs).logits

    @torch.no_grad()
    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        with self.peft_model.disable_adapter():
            return self.wrapped(**inputs).logits

    @contextlib.contextmanager
    def head_parameters(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        # The base's head: with `modules_to_save` the policy trains a copy, and the original stays as it started.
        with self.peft_model.disable_adapter():
            head = head_module(self.peft_model)
        with gathered([head.weight, head.bias]):
            yield head.weight, head.bias


def zero3_inference_config(train_config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """The policy's DeepSpeed config turned into one for a frozen ZeRO-3 model: no optimizer, scheduler or
    optimizer offload (nothing to step: DeepSpeed would build them anyway and fail without parameters to train),
    and numbers for the size-dependent values the Trainer fills only for its own engine (TRL's reference models
    use the same values)."""
    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if hidden_size is not None:
        sizes = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        }
        for key, value in sizes.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    return config
