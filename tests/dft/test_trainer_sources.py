"""DFTTrainer with sample ids, single process: per-source sums, their log lines, and the step's origins.

The dataset columns survive `remove_unused_columns`, the model never sees `source_ids` or `origins`, each
source's sums equal the model run on that source's rows alone, the logged per-source values combine
(token-weighted) into the global ones (and reach the rank's `logs/rank0_metrics.jsonl`, through
`RankMetricsMixin`), and `step_origins` follows the optimizer steps.
"""

from __future__ import annotations

import copy
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
from tests.helpers import (
    VOCAB,
    RankMetricsTrainer,
    float32_bound,
    float64_dft_sum,
    relative_error,
    tiny_qwen2,
    training_args,
)

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


# The logged sums are float64 sums of float32 per-token CE_t, each rounded like a log-softmax over the vocabulary
# (VOCAB = 300) after 2 layers; they are compared with the float64 model's, relative, at 4 * eps * sqrt(300) = 8.3e-6
# (measured at most 1.4e-7 with 1 or 2 threads). A token counted in the wrong source, or a mean of means instead of a
# token-weighted mean, is off by 1e-2 or more.
FLOAT32_BOUND = float32_bound(VOCAB)


def float64_token_values(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainable targets' CE_t, in float64 on a float64 copy of `model`, and each one's source id."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _, nll, valid = float64_dft_sum(logits, batch["labels"], 1.0)
    return nll[valid], batch["source_ids"][:, 1:][valid]


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
    for source in range(2):
        # The source's rows alone, in float64: each float32 sum of the mixed batch against it (FLOAT32_BOUND).
        alone = collate(trainer, [i for i, s in enumerate(SOURCE_OF_ROW) if s == source])
        nll, _ = float64_token_values(model, alone)
        expected = {"sum_p_correct": torch.exp(-nll).sum(), "sum_nll": nll.sum(), "num_tokens": nll.numel()}
        for column, value in expected.items():
            got = sums[source, GROUP_SUM_COLUMNS.index(column)]
            if column == "num_tokens":
                assert got.item() == value, (source, column)  # a count: exact
            else:
                assert relative_error(got, value) <= FLOAT32_BOUND, (source, column, relative_error(got, value))
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
    # The float64 truth of the interval: both micro-batches' targets through the float64 model (unchanged: no
    # optimizer step ran). Each logged mean, global or per source, within FLOAT32_BOUND of it; the per-source
    # means combine, token-weighted, into the global one because both match the same float64 values.
    values = [float64_token_values(model, collate(trainer, indices)) for indices in ([0, 1, 2], [3, 4, 5])]
    nll, source_of = torch.cat([v[0] for v in values]), torch.cat([v[1] for v in values])
    for metric, per_token in (("nll", nll), ("avg_p_correct", torch.exp(-nll))):
        assert relative_error(logs[metric], per_token.mean()) <= FLOAT32_BOUND, metric
        for source, key in enumerate(keys[:2]):
            assert tokens[key] == int((source_of == source).sum()), key
            expected = per_token[source_of == source].mean()
            assert relative_error(logs[f"{metric}/{key}"], expected) <= FLOAT32_BOUND, (metric, key)
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
