"""`DFTTrainer`: a `transformers.Trainer` whose loss is DFT, with its metrics.

Features and their config keys:
- `loss.type=dft`: `sum_t CE_t * (alpha * p_t.detach() + 1 - alpha) / N` (see `dft.loss`);
  `loss.type=ce`: the model's own cross-entropy, exactly as the stock Trainer computes it.
- `loss.alpha`: weight of the probability term (logged as `dft_alpha`).
- Exact normalisation: `N` is the Trainer's `num_items_in_batch`, the trainable tokens of the
  whole optimizer step over gradient accumulation and ranks (`training.average_tokens_across_devices`).
- Metrics beside `loss`: `nll` (plain cross-entropy of the same tokens), `avg_p_correct`
  (mean probability of the correct token) and `trainable_tokens_per_second`; evaluation logs
  `eval_nll` and `eval_avg_p_correct`. Each is a token-weighted mean over the logging interval:
  sums and counts are all-reduced over ranks, then divided, never averages of averages.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer

from dft.loss import DFTStats, dft_loss

TRAIN, EVAL = "train", "eval"


class DFTTrainer(Trainer):
    # compute_loss divides by the step's token count itself: the Trainer must not divide by GA again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, loss_type: str = "dft", alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_type = loss_type
        self.alpha = alpha
        self._metric_sums = {mode: torch.zeros(3, dtype=torch.float64) for mode in (TRAIN, EVAL)}
        self._interval_start: float | None = None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = inputs["labels"]
        if self.loss_type == "ce":
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            with torch.no_grad():
                _, stats = dft_loss(outputs.logits, labels, alpha=0.0)
        else:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss, stats = dft_loss(outputs.logits, labels, self.alpha, num_items_in_batch=num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every rank's tokens while DDP/ZeRO average gradients over
                # ranks: scale back up, as the stock compute_loss does.
                loss = loss * self.accelerator.num_processes
            elif num_items_in_batch is None and model.training:
                loss = loss / self.current_gradient_accumulation_steps
        self._record(stats, TRAIN if model.training else EVAL)
        return (loss, outputs) if return_outputs else loss

    def _record(self, stats: DFTStats, mode: str) -> None:
        if mode == TRAIN and self._interval_start is None:
            self._interval_start = time.perf_counter()
        self._metric_sums[mode] += torch.stack(
            [stats.sum_p_correct.double().cpu(), stats.sum_nll.double().cpu(), stats.num_tokens.double().cpu()]
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = EVAL if "eval_loss" in logs else TRAIN if "loss" in logs else None
        if mode is None:  # the end-of-training summary
            super().log(logs, start_time)
            return
        sums = self.accelerator.reduce(self._metric_sums[mode].to(self.args.device), reduction="sum").cpu()
        self._metric_sums[mode].zero_()
        sum_p, sum_nll, num_tokens = sums.tolist()
        prefix = "eval_" if mode == EVAL else ""
        if num_tokens > 0:
            logs[f"{prefix}nll"] = sum_nll / num_tokens
            logs[f"{prefix}avg_p_correct"] = sum_p / num_tokens
        if mode == TRAIN:
            elapsed = time.perf_counter() - (self._interval_start or time.perf_counter())
            logs["trainable_tokens_per_second"] = num_tokens / max(elapsed, 1e-9)
            self._interval_start = None
            if self.loss_type == "dft":
                logs["dft_alpha"] = self.alpha
        super().log(logs, start_time)
