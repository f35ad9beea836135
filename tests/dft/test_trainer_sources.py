"""DFTTrainer with sample ids, single process: per-source sums, their log lines, and the step's origins.

The dataset columns survive `remove_unused_columns`, the model never sees `source_ids` or `origins`, each
source's sums equal the model run on that source's rows alone, the logged per-source values combine
(token-weighted) into the global ones (and reach the rank's `logs/rank0_metrics.jsonl`, through
`RankMetricsMixin`), and `step_origins` follows the optimizer steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from config.schema import LossConfig
from core.keys import IGNORE_INDEX, SAMPLE_BATCH_KEYS
from core.metric_sums import EVAL, GROUP_SUM_COLUMNS, TRAIN
from data_pipeline.collate import SampleIdCollator
from data_pipeline.stats import source_metric_names
from dft.loss import dft_loss
from tests.helpers import VOCAB, RankMetricsTrainer, tiny_qwen2, training_args

SOURCE_NAMES = ["data/chat.jsonl", "data/more/alpaca.json.gz", "data/unused.jsonl"]
SOURCE_OF_ROW = [0, 1, 1, 0, 1, 0]


def rows() -> dict[str, list]:
    generator = torch.Generator().manual_seed(5)
    columns: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", "source_id", "origin")}
    for i, source in enumerate(SOURCE_OF_ROW):
        length = 6 + 3 * i % 7
        input_ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        columns["input_ids"].append(input_ids)
        columns["attention_mask"].append([1] * length)
        columns["labels"].append([IGNORE_INDEX] * 3 + input_ids[3:])
        columns["source_id"].append(source)
        columns["origin"].append(f"{SOURCE_NAMES[source]}:{i + 1}")
    columns["source"] = [SOURCE_NAMES[s] for s in SOURCE_OF_ROW]  # a column nothing reads: it must be dropped
    return columns


def make_trainer(tmp_path: Path, tokenizer: PreTrainedTokenizerBase, **loss: Any) -> RankMetricsTrainer:
    trainer = RankMetricsTrainer(
        model=tiny_qwen2(),
        args=training_args(tmp_path, per_device_train_batch_size=3),
        train_dataset=Dataset.from_dict(rows()),
        data_collator=SampleIdCollator(
            DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        ),
        loss=LossConfig(**loss),
        source_keys=source_metric_names(SOURCE_NAMES),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests do not run
    return trainer


def collate(trainer: RankMetricsTrainer, indices: list[int]) -> dict[str, Any]:
    data = Dataset.from_dict(rows()).select(indices).remove_columns("source")
    return trainer.data_collator([data[i] for i in range(len(data))])


def test_sample_columns_survive_remove_unused_columns(tmp_path: Path, chatml_tokenizer) -> None:
    trainer = make_trainer(tmp_path, chatml_tokenizer)
    assert trainer.args.remove_unused_columns
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(SAMPLE_BATCH_KEYS) <= set(batch) and "source" not in batch
    assert batch["source_ids"].shape == batch["labels"].shape
    assert all(isinstance(origin, str) and ":" in origin for origin in batch["origins"])


@pytest.mark.parametrize(("loss_type", "implementation"), [("dft", "fused"), ("dft", "reference"), ("ce", "reference")])
def test_per_source_sums_equal_each_source_run_alone(
    tmp_path: Path, chatml_tokenizer, loss_type: str, implementation: str
) -> None:
    trainer = make_trainer(tmp_path, chatml_tokenizer, type=loss_type, implementation=implementation)
    model = trainer.model
    seen_keys: set[str] = set()
    model.register_forward_pre_hook(lambda m, a, kw: seen_keys.update(kw), with_kwargs=True)
    batch = collate(trainer, list(range(len(SOURCE_OF_ROW))))
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    assert seen_keys and not seen_keys & set(SAMPLE_BATCH_KEYS)
    assert set(SAMPLE_BATCH_KEYS) <= set(batch)  # popped from a copy, not from the caller's batch
    sums = trainer._interval_sums[EVAL].sources
    assert sums.shape == (len(SOURCE_NAMES), len(GROUP_SUM_COLUMNS))
    alpha = 0.0 if loss_type == "ce" else 1.0
    for source in range(2):
        alone = collate(trainer, [i for i, s in enumerate(SOURCE_OF_ROW) if s == source])
        with torch.no_grad():
            logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        _, stats = dft_loss(logits, alone["labels"], alpha)
        expected = [stats.sum_p_correct, stats.sum_nll, None, stats.num_tokens]
        for column, value in zip(GROUP_SUM_COLUMNS, expected, strict=True):
            if value is not None:
                got = sums[source, GROUP_SUM_COLUMNS.index(column)].item()
                assert got == pytest.approx(value.item(), rel=1e-5), (source, column)
    assert sums[2].abs().sum() == 0


def test_log_gives_per_source_means_that_combine_into_the_global_ones(tmp_path: Path, chatml_tokenizer) -> None:
    trainer = make_trainer(tmp_path, chatml_tokenizer)
    model = trainer.model
    model.train()
    for indices in ([0, 1, 2], [3, 4, 5]):
        trainer.compute_loss(model, collate(trainer, indices)).backward()
    logs = {"loss": 1.0}
    trainer.log(logs)
    keys = source_metric_names(SOURCE_NAMES)
    assert keys == ["chat", "alpaca", "unused"]
    assert "nll/unused" not in logs and "num_tokens/unused" not in logs  # no token in the interval: no NaN
    tokens = {key: logs[f"num_tokens/{key}"] for key in keys[:2]}
    for metric in ("nll", "avg_p_correct"):
        combined = sum(logs[f"{metric}/{key}"] * tokens[key] for key in tokens) / sum(tokens.values())
        assert combined == pytest.approx(logs[metric], rel=1e-6)  # the global sums are float32 per micro-batch
    assert 0 < logs["dft_loss/chat"] < logs["nll/chat"]  # alpha = 1: w_t = p_t < 1
    record = json.loads((tmp_path / "logs" / "rank0_metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["sources"]) == {"chat", "alpaca"}
    assert sum(s["num_tokens"] for s in record["sources"].values()) == record["num_tokens"] == sum(tokens.values())
    # The sums were cleared with the interval.
    assert trainer._interval_sums[TRAIN].sources.abs().sum() == 0


def test_step_origins_hold_the_current_optimizer_steps_samples(tmp_path: Path, chatml_tokenizer) -> None:
    trainer = make_trainer(tmp_path, chatml_tokenizer)
    model = trainer.model
    origins = Dataset.from_dict(rows())["origin"]
    model.train()
    trainer.state.global_step = 4
    trainer.compute_loss(model, collate(trainer, [0, 1]))
    trainer.compute_loss(model, collate(trainer, [2]))  # a second micro-batch of the same step
    assert trainer.step_origins == origins[:3]
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, collate(trainer, [5]))  # evaluation does not touch them
    assert trainer.step_origins == origins[:3]
    model.train()
    trainer.state.global_step = 5
    trainer.compute_loss(model, collate(trainer, [3, 4]))
    assert trainer.step_origins == origins[3:5]


def test_source_ids_beyond_source_keys_are_reported(tmp_path: Path, chatml_tokenizer) -> None:
    trainer = make_trainer(tmp_path, chatml_tokenizer)
    batch = collate(trainer, [0, 1])
    batch["source_ids"] = batch["source_ids"] + 3
    with pytest.raises(ValueError, match=r"source ids span 3\.\.4 but source_keys lists 3 sources"):
        trainer.compute_loss(trainer.model, batch)
