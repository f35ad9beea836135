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
  GPUs `mfu`: `6 * N_params + 12 * layers * hidden * seq_len` FLOPs per token (forward and backward, the PaLM
  appendix B estimate, `seq_len` the mean row length) times tokens/s per device, over the device's dense bf16
  peak. The interval's clock runs from before its first step fetches its batches to the logging event: whole
  optimizer steps, data loading included (evaluation and checkpoint saves fall between intervals).
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

# Dense bf16 peak FLOP/s by device name, for the MFU estimate (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


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

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        # The interval's clock starts before its first optimizer step fetches its micro-batches, so it times whole
        # steps, data loading included, as a stopwatch around them would; evaluations and checkpoint saves between
        # two intervals fall outside both.
        if self._interval_start is None:
            self._interval_start = time.perf_counter()
            self._interval_first_step = self.state.global_step
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def log_interval_sums(self, mode: str, local: IntervalSums, total: IntervalSums, logs: dict[str, float]) -> None:
        if mode == TRAIN:
            input_tokens = total.total("input_tokens")
            mean_row_length = input_tokens / max(total.total("rows"), 1.0)
            logs.update(self._throughput(total.total("num_tokens"), input_tokens, mean_row_length))
        super().log_interval_sums(mode, local, total, logs)

    def _throughput(self, trainable_tokens: float, input_tokens: float, mean_row_length: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - (self._interval_start or time.perf_counter()), 1e-9)
        steps = max(self.state.global_step - self._interval_first_step, 1)
        self._interval_start = None
        world = self.accelerator.num_processes
        if torch.cuda.is_available():
            peak_bytes = torch.cuda.max_memory_allocated()
        else:
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        peak = self.accelerator.gather(torch.tensor([float(peak_bytes)], device=self.args.device)).max().item()
        metrics = {
            "tokens_per_second": input_tokens / elapsed,
            "tokens_per_second_per_device": input_tokens / elapsed / world,
            "trainable_tokens_per_second": trainable_tokens / elapsed,
            "trainable_tokens_per_second_per_device": trainable_tokens / elapsed / world,
            "step_time": elapsed / steps,
            "peak_memory_gb": peak / 2**30,
        }
        mfu = self._mfu(input_tokens / elapsed / world, mean_row_length)
        if mfu is not None:
            metrics["mfu"] = mfu
        return metrics

    def _mfu(self, tokens_per_second_per_device: float, seq_len: float) -> float | None:
        # A packed row counts as one sequence: its block-diagonal attention is over-counted.
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
        peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
        if peak is None:
            return None
        config = self.accelerator.unwrap_model(self.model).config
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len
        return flops_per_token * tokens_per_second_per_device / peak
