"""`DFTTrainer`: a `transformers.Trainer` whose loss is one of the registered objectives, and the loss metrics of
each logging interval.

Features and their config keys (`loss.*`, passed as a `LossConfig`):
- `loss.type`: the objective (`dft.objectives`: ce, dft, asft, eaft), built at each step (alpha can warm up);
  `compute_loss` runs whichever it is the same way. An objective with a KL term gets the frozen starting model
  (`dft.reference`): the `reference_model` given at construction (prepared on first use: a ZeRO-3 engine of its
  own under ZeRO-3), or, for an adapter run, the policy with its adapter off; `kl` is logged.
- `loss.implementation=fused` (default): the model runs with its LM head swapped, for that call only,
  for `fused_objective_loss` (`dft.fused_head`), so the `[tokens, vocab]` logits are never built, under ZeRO-3
  too. `loss.implementation=reference`: full logits, then `objective_loss`. `loss.chunk_size`: tokens per chunk
  of the fused loss, or `auto` (default: sized from the batch's shapes, `dft.loss.auto_chunk_size`).
- `loss.alpha`, `loss.alpha_warmup_steps`: alpha (configured, or the objective's default) rises linearly from 0
  over that many optimizer steps (0: constant); the value in use is logged as `dft_alpha`.
- Exact normalisation: `N` is the Trainer's `num_items_in_batch`, the trainable tokens of the
  whole optimizer step over gradient accumulation and ranks (`training.average_tokens_across_devices`).
- Metrics beside `loss`: `nll` (plain cross-entropy of the same tokens), `avg_p_correct`
  (mean probability of the correct token); evaluation logs `eval_nll` and `eval_avg_p_correct`.
  Each is a token-weighted mean over the logging interval: the interval's sums (`core.metric_sums`) are
  all-reduced over ranks, then divided, never averages of averages.
- Per-source metrics, when `source_keys` (the metric names of the prepared data's sources, in order:
  `data_pipeline.stats.source_metric_names`) lists two or more sources and the batches carry `source_ids`
  (`data_pipeline.collate.SampleIdCollator`): `nll/<source>`, `avg_p_correct/<source>`, `<type>_loss/<source>`
  (the mean per-token `w_t * CE_t`, for objectives whose weights are not all 1) and `num_tokens/<source>`,
  `eval_`-prefixed in evaluation. Token-weighted like the rest, reduced in the same single all-reduce; a source
  with no token in the interval is left out.
- Sample origins: `step_origins` holds the `file:line` of every sample this rank fed to the current
  optimizer step (from the batches' `origins`); it is reset at the first micro-batch of the next step,
  so callbacks read the finished step's samples in `on_pre_optimizer_step` and `on_step_end`.
  The model never sees `source_ids` or `origins`: `compute_loss` pops them.
- `log_interval_sums(mode, local, total, logs)`: called at each logging event with this rank's and all
  ranks' interval sums, for mixins that write more metrics from them (`observability.training_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from config.schema import LossConfig
from core.keys import SAMPLE_BATCH_KEYS
from core.metric_sums import EVAL, TRAIN, IntervalSums
from dft.fused_head import fused_lm_head
from dft.loss import LossStats, objective_loss
from dft.objectives import build_objective, resolve_alpha, unit_weights
from dft.reference import DisabledAdapter, FrozenCopy, ReferenceModel, zero3_inference_config


class DFTTrainer(Trainer):
    # compute_loss divides by the step's token count itself: the Trainer must not divide by GA again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        loss: LossConfig | None = None,
        source_keys: Sequence[str] = (),
        reference_model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_config = loss if loss is not None else LossConfig()
        self.reference_model = reference_model
        self._reference_copy: FrozenCopy | None = None
        self._alpha_in_use = self.current_alpha()
        self._objective = build_objective(self.loss_config, self._alpha_in_use)
        # Per-source metrics only mean something with two sources or more; with fewer none are computed.
        self.source_keys = list(source_keys) if len(source_keys) >= 2 else []
        self._interval_sums = {mode: IntervalSums.zeros(len(self.source_keys)) for mode in (TRAIN, EVAL)}
        self._current_rows = 0
        self.step_origins: list[str] = []
        self._origins_step: int | None = None

    def current_alpha(self) -> float:
        """`alpha * min(1, step / alpha_warmup_steps)` at the current optimizer step, `alpha` the configured or the
        objective's default (`resolve_alpha`); `alpha` without warm-up."""
        alpha = resolve_alpha(self.loss_config)
        if self.loss_config.alpha_warmup_steps == 0:
            return alpha
        return alpha * min(1.0, self.state.global_step / self.loss_config.alpha_warmup_steps)

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps only the model's inputs: also keep the columns the collator reads.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += list(getattr(self.data_collator, "dataset_columns", ()))

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)  # the caller's batch keeps its keys
        source_ids = self._take_sample_keys(inputs, model.training)
        groups = self._token_groups(source_ids)
        group_kwargs = {} if groups is None else {"token_groups": groups, "num_groups": len(self.source_keys)}
        labels = inputs.pop("labels")
        self._alpha_in_use = alpha = self.current_alpha()
        self._objective = objective = build_objective(self.loss_config, alpha)
        reference = self._reference(model) if objective.needs_reference else None
        if self.loss_config.implementation == "fused":
            unwrapped = self.accelerator.unwrap_model(model)
            reference_inputs = reference.head_inputs(inputs) if reference is not None else None
            with fused_lm_head(
                unwrapped,
                labels,
                objective,
                num_items_in_batch,
                self.loss_config.chunk_size,
                reference_head_inputs=reference_inputs,
                reference_head=reference.head_parameters if reference is not None else None,
                **group_kwargs,
            ) as head:
                # Through the (DeepSpeed/DDP) wrapper, so its forward bookkeeping runs as usual.
                outputs = model(**inputs)
            if head.stats is None:
                raise RuntimeError(
                    f"loss.implementation=fused: {type(unwrapped).__name__}'s forward did not call its LM head "
                    "module, so the fused loss never ran; use loss.implementation=reference"
                )
            # The head's output, as the wrapper returned it: under ZeRO-3 it carries the hook that
            # gathers the head weight again before the loss's backward.
            loss, stats = outputs.logits, head.stats
            outputs = CausalLMOutputWithPast(loss=loss)  # no logits exist to return
        else:
            reference_logits = reference.logits(inputs) if reference is not None else None
            outputs = model(**inputs)
            loss, stats = objective_loss(
                outputs.logits,
                labels,
                objective,
                num_items_in_batch=num_items_in_batch,
                reference_logits=reference_logits,
                **group_kwargs,
            )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens while DDP/ZeRO average gradients over
            # ranks: scale back up, as the stock compute_loss does.
            loss = loss * self.accelerator.num_processes
        elif num_items_in_batch is None and model.training:
            loss = loss / self.current_gradient_accumulation_steps
        attention_mask = inputs.get("attention_mask")
        input_tokens = int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        self._current_rows = inputs["input_ids"].shape[0]
        self._record(stats, input_tokens, TRAIN if model.training else EVAL)
        return (loss, outputs) if return_outputs else loss

    def _take_sample_keys(self, inputs: dict[str, Any], training: bool) -> torch.Tensor | None:
        """Pops the collator's sample keys off `inputs` (the model never sees them), notes a training batch's sample
        origins, and returns its `source_ids` (None without them)."""
        source_ids, origins = (inputs.pop(key, None) for key in SAMPLE_BATCH_KEYS)
        if origins is not None and training:
            self._note_origins(origins)
        return source_ids

    def _reference(self, model: torch.nn.Module) -> ReferenceModel:
        """The starting model for the KL term: the frozen copy given at construction (prepared on first use, when
        the accelerator and the device are known), else, for an adapter run, the policy with its adapter off."""
        if self._reference_copy is not None:
            return self._reference_copy
        if self.reference_model is not None:
            self._reference_copy = self._prepare_reference(self.reference_model)
            return self._reference_copy
        unwrapped = self.accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "disable_adapter"):
            raise ValueError(
                f"loss.type={self.loss_config.type}: the KL term needs the starting model: pass reference_model "
                "(train.py loads it for a full fine-tune) or train an adapter (model.adapter=lora)"
            )
        return DisabledAdapter(model, unwrapped)

    def _prepare_reference(self, reference_model: torch.nn.Module) -> FrozenCopy:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
            import deepspeed

            hidden_size = getattr(reference_model.config, "hidden_size", None)
            config = zero3_inference_config(plugin.deepspeed_config, hidden_size)
            engine, *_ = deepspeed.initialize(model=reference_model, config=config)
            return FrozenCopy(reference_model, engine)
        return FrozenCopy(reference_model.to(self.args.device))

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not all(inputs.get(name) is not None for name in self.label_names):
            # Without labels the Trainer calls the model itself, not compute_loss.
            inputs = {k: v for k, v in inputs.items() if k not in SAMPLE_BATCH_KEYS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _note_origins(self, origins: list[str]) -> None:
        # global_step moves after each optimizer step: a new value means this is the next step's first micro-batch.
        if self._origins_step != self.state.global_step:
            self.step_origins = []
            self._origins_step = self.state.global_step
        self.step_origins.extend(origins)

    def _token_groups(self, source_ids: torch.Tensor | None) -> torch.Tensor | None:
        if source_ids is None or not self.source_keys:
            return None
        if bool(((source_ids < 0) | (source_ids >= len(self.source_keys))).any()):
            raise ValueError(
                f"the batch's source ids span {int(source_ids.min())}..{int(source_ids.max())} but source_keys "
                f"lists {len(self.source_keys)} sources: pass source_metric_names(stats.sources) of the prepared "
                "data the batches come from"
            )
        return source_ids

    def _record(self, stats: LossStats | None, input_tokens: int, mode: str) -> None:
        """Adds a micro-batch's loss sums to the interval's; None (a loss with no per-token sums) adds only its
        input tokens and rows."""
        sums = self._interval_sums[mode]
        if stats is None:
            zero = torch.zeros(())
            stats = LossStats(zero, zero, zero)
        sums.totals.add_(
            torch.tensor(
                [
                    float(stats.sum_p_correct),
                    float(stats.sum_nll),
                    float(stats.num_tokens),
                    float(input_tokens),
                    float(self._current_rows),
                    float(stats.sum_kl) if stats.sum_kl is not None else 0.0,
                ],
                dtype=torch.float64,
            )
        )
        if stats.group_sums is not None:
            sums.sources.add_(stats.group_sums.cpu())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = EVAL if "eval_loss" in logs else TRAIN if "loss" in logs else None
        if mode is None:  # the end-of-training summary
            super().log(logs, start_time)
            return
        sums = self._interval_sums[mode]
        local = IntervalSums(sums.totals.clone(), sums.sources.clone())
        sums.totals.zero_()
        sums.sources.zero_()
        # One collective for the global and the per-source sums.
        flat = torch.cat([local.totals, local.sources.flatten()]).to(self.args.device)
        reduced = self.accelerator.reduce(flat, reduction="sum").cpu()
        size = local.totals.numel()
        total = IntervalSums(reduced[:size], reduced[size:].view_as(local.sources))
        prefix = "eval_" if mode == EVAL else ""
        num_tokens = total.total("num_tokens")
        if num_tokens > 0:
            logs[f"{prefix}nll"] = total.total("sum_nll") / num_tokens
            logs[f"{prefix}avg_p_correct"] = total.total("sum_p_correct") / num_tokens
            if self._objective.needs_reference:
                logs[f"{prefix}kl"] = total.total("sum_kl") / num_tokens
        logs.update(self._source_metrics(total.sources, prefix))
        self.log_interval_sums(mode, local, total, logs)
        if mode == TRAIN and self._objective.alpha is not None:
            logs["dft_alpha"] = self._alpha_in_use
        super().log(logs, start_time)

    def log_interval_sums(self, mode: str, local: IntervalSums, total: IntervalSums, logs: dict[str, float]) -> None:
        """Called at each logging event with this rank's (`local`) and all ranks' (`total`) interval sums; a mixin
        adds its metrics to `logs` or writes them elsewhere, then calls `super()`. Collective: every rank calls it."""

    def _source_metrics(self, source_sums: torch.Tensor, prefix: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, (sum_p, sum_nll, sum_weighted, tokens) in zip(self.source_keys, source_sums.tolist(), strict=True):
            if tokens == 0:
                continue
            metrics[f"{prefix}nll/{key}"] = sum_nll / tokens
            metrics[f"{prefix}avg_p_correct/{key}"] = sum_p / tokens
            if self._objective.token_weights is not unit_weights:
                metrics[f"{prefix}{self._objective.name}_loss/{key}"] = sum_weighted / tokens
            metrics[f"{prefix}num_tokens/{key}"] = int(tokens)
        return metrics
