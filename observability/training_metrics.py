"""Metrics of a training interval beyond the loss, as Trainer mixins over the loss Trainer's interval sums.

Both mixins go before the loss Trainer (`dft.trainer.DFTTrainer`) in a Trainer's bases and extend its
`log_interval_sums(mode, local, total, logs)` hook, which hands them this rank's and all ranks' sums
(`core.metric_sums.IntervalSums`) at each logging event.

- `RankMetricsMixin`: each rank appends its own interval sums (per source too) to
  `<output_dir>/logs/rank<N>_metrics.jsonl`, to find the rank (and so the data shard) that misbehaves, with
  `samples`: a digest of the `file:line` of every sample the rank trained on in the interval, in order, so two
  runs can be shown to have seen the same data in the same order (`python -m evaluation.compare` checks it).
- `ThroughputMetricsMixin`, per training logging interval: `tokens_per_second` and
  `trainable_tokens_per_second` (global) with their `_per_device` values, `step_time` (seconds per optimizer
  step), `peak_memory_gb` (max over ranks: allocated device memory on GPUs, process peak RSS on CPU), and on
  GPUs whose peak is known `mfu`: model FLOPs per token (`6 N_trainable + 4 N_frozen + 12 L H C`, C the mean
  attended context of the interval's samples, read from each micro-batch's mask or position ids) times tokens/s
  per device, over the device's dense bf16 peak; formula and peak table in `observability/flops.py`, shared
  with the GPU benchmark. The interval's clock runs from before its first step fetches its batches to the
  logging event: whole optimizer steps, data loading included (evaluation and checkpoint saves fall between
  intervals).
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from core.metric_sums import GROUP_SUM_COLUMNS, INTERVAL_SUM_COLUMNS, TRAIN, IntervalSums
from observability.flops import (
    attended_keys,
    batch_sample_lengths,
    cuda_peak_bf16_flops,
    flop_parameters,
    model_flops_per_token,
)


class RankMetricsMixin:
    """Trainer mixin: this rank's interval sums, one JSON line per logging event, in `logs/rank<N>_metrics.jsonl`."""

    _samples_digest: Any = None

    def _note_origins(self, origins: list[str]) -> None:
        super()._note_origins(origins)  # training micro-batches only
        if self._samples_digest is None:
            self._samples_digest = hashlib.sha1(usedforsecurity=False)
        for origin in origins:
            self._samples_digest.update(origin.encode() + b"\n")

    def log_interval_sums(self, mode: str, local: IntervalSums, total: IntervalSums, logs: dict[str, float]) -> None:
        record: dict[str, Any] = {"step": self.state.global_step, "mode": mode}
        record.update({column: local.total(column) for column in INTERVAL_SUM_COLUMNS if column != "rows"})
        if mode == TRAIN and self._samples_digest is not None:
            record["samples"] = self._samples_digest.hexdigest()
            self._samples_digest = None
        sources = {
            key: dict(zip(GROUP_SUM_COLUMNS, values, strict=True))
            for key, values in zip(self.source_keys, local.sources.tolist(), strict=True)
            if values[-1] > 0
        }
        if sources:
            record["sources"] = sources
        path = Path(self.args.output_dir) / "logs" / f"rank{self.args.process_index}_metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        super().log_interval_sums(mode, local, total, logs)


class ThroughputMetricsMixin:
    """Trainer mixin: tokens per second, step time, peak memory and MFU of each training logging interval."""

    _interval_start: float | None = None
    _interval_first_step = 0
    # This rank's sums over the interval's samples, for MFU's mean attended context C.
    _attended_keys = 0
    _attended_tokens = 0

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        # The interval's clock starts before its first optimizer step fetches its micro-batches, so it times whole
        # steps, data loading included, as a stopwatch around them would; evaluations and checkpoint saves between
        # two intervals fall outside both.
        if self._interval_start is None:
            self._interval_start = time.perf_counter()
            self._interval_first_step = self.state.global_step
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batches:
            lengths = batch_sample_lengths(batch)
            self._attended_keys += attended_keys(lengths)
            self._attended_tokens += sum(lengths)
        return batches, num_items

    def log_interval_sums(self, mode: str, local: IntervalSums, total: IntervalSums, logs: dict[str, float]) -> None:
        if mode == TRAIN:
            logs.update(self._throughput(total.total("num_tokens"), total.total("input_tokens")))
        super().log_interval_sums(mode, local, total, logs)

    def _throughput(self, trainable_tokens: float, input_tokens: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - (self._interval_start or time.perf_counter()), 1e-9)
        steps = max(self.state.global_step - self._interval_first_step, 1)
        self._interval_start = None
        world = self.accelerator.num_processes
        if torch.cuda.is_available():
            peak_bytes = torch.cuda.max_memory_allocated()
        else:
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        local = torch.tensor(
            [[float(peak_bytes), float(self._attended_keys), float(self._attended_tokens)]],
            dtype=torch.float64,
            device=self.args.device,
        )
        self._attended_keys = self._attended_tokens = 0
        gathered = self.accelerator.gather(local).reshape(-1, 3)
        peak = gathered[:, 0].max().item()
        keys, tokens = gathered[:, 1].sum().item(), gathered[:, 2].sum().item()
        metrics = {
            "tokens_per_second": input_tokens / elapsed,
            "tokens_per_second_per_device": input_tokens / elapsed / world,
            "trainable_tokens_per_second": trainable_tokens / elapsed,
            "trainable_tokens_per_second_per_device": trainable_tokens / elapsed / world,
            "step_time": elapsed / steps,
            "peak_memory_gb": peak / 2**30,
        }
        mfu = self._mfu(input_tokens / elapsed / world, keys / max(tokens, 1.0))
        if mfu is not None:
            metrics["mfu"] = mfu
        return metrics

    def _mfu(self, tokens_per_second_per_device: float, mean_context: float) -> float | None:
        """Model FLOPs utilisation (`observability.flops`), or None off CUDA or on a GPU of unknown peak."""
        if not torch.cuda.is_available():
            return None
        peak = cuda_peak_bf16_flops()
        if peak is None:
            return None
        model = self.accelerator.unwrap_model(self.model)
        trainable, frozen = flop_parameters(model)
        config = model.config.get_text_config()
        return model_flops_per_token(trainable, frozen, config, mean_context) * tokens_per_second_per_device / peak
