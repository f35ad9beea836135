"""Logged throughput is a stopwatch's: each interval's step time covers whole optimizer steps, data loading
included, and matches an external clock around the same steps.

Data loading is made slow on purpose (a collator that sleeps), as a real dataloader on a busy node is: a clock that
started after the interval's first fetch (as it once did) would leave one fetch out of each interval and read
`SLOW_FETCH_S / interval` faster than the stopwatch (12% here), far outside the 3% asked of it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, TrainerCallback

from core.keys import IGNORE_INDEX
from dft.trainer import DFTTrainer
from observability.training_metrics import ThroughputMetricsMixin
from tests.helpers import TOKENIZER_DIR, tiny_qwen2, token_budget_samples, training_args

SLOW_FETCH_S = 0.03
STEPS, LOGGING_STEPS = 12, 4
# The logged interval runs from before its first fetch to the log; the external one from the previous step's
# on_step_end to this one's: they differ by the few milliseconds of logging and callbacks at each end, against
# intervals of ~4 x (fetch + step) = 250 ms and more.
CLOCK_AGREEMENT = 0.03


class ThroughputTrainer(ThroughputMetricsMixin, DFTTrainer):
    pass


class StepClock(TrainerCallback):
    """perf_counter at the epoch's start and at the end of every optimizer step: the external stopwatch."""

    def __init__(self) -> None:
        self.step_end: dict[int, float] = {}

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_end.setdefault(0, time.perf_counter())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_end[state.global_step] = time.perf_counter()


class SlowCollator:
    """Pads like the run's collator, after a sleep; remembers each batch's real (unpadded) token count."""

    def __init__(self) -> None:
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        self.batch_tokens: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        time.sleep(SLOW_FETCH_S)
        batch = self.pad(features)
        self.batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch


def test_logged_step_time_and_tokens_per_second_match_a_stopwatch(tmp_path: Path) -> None:
    clock = StepClock()
    samples = [{**s, "labels": s["input_ids"]} for s in token_budget_samples(STEPS * 4, max_length=48)]
    args = training_args(
        tmp_path, per_device_train_batch_size=4, max_steps=STEPS, logging_steps=LOGGING_STEPS, report_to="none"
    )
    collator = SlowCollator()
    trainer = ThroughputTrainer(
        model=tiny_qwen2(), args=args, train_dataset=samples, data_collator=collator, callbacks=[clock]
    )
    trainer.train()
    intervals = [row for row in trainer.state.log_history if "step_time" in row]
    assert [row["step"] for row in intervals] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    for row in intervals:
        end, start = row["step"], row["step"] - LOGGING_STEPS
        stopwatch = clock.step_end[end] - clock.step_end[start]
        logged = row["step_time"] * LOGGING_STEPS
        assert abs(logged - stopwatch) <= CLOCK_AGREEMENT * stopwatch, (
            f"steps {start + 1}-{end}: logged {logged:.3f} s, stopwatch {stopwatch:.3f} s"
        )
        # tokens/s: the real (unpadded) tokens of the interval's batches over that same time.
        batches = collator.batch_tokens[start:end]  # one batch per step: 1 process, no accumulation
        assert row["tokens_per_second"] * logged == pytest.approx(sum(batches), rel=1e-9), (row, batches)
