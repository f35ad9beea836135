"""SampleIdCollator: per-token source ids aligned with the labels, and the origins, for padded and packed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from core.keys import IGNORE_INDEX, ORIGINS_KEY, SOURCE_ID_KEY, SOURCE_IDS_KEY
from data_pipeline.collate import SampleIdCollator, token_source_ids
from data_pipeline.packing import PaddingFreeCollator
from data_pipeline.prepare import build_datasets
from tests.helpers import SAMPLE_SOURCES, data_config

LENGTHS, SOURCES = (5, 11, 8), (1, 0, 1)


def features() -> list[dict]:
    out = []
    for i, (length, source) in enumerate(zip(LENGTHS, SOURCES, strict=True)):
        input_ids = list(range(10 + i, 10 + i + length))
        out.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * length,
                "labels": [IGNORE_INDEX] * 2 + input_ids[2:],
                SOURCE_ID_KEY: source,
                "origin": f"data/s{source}.jsonl:{i + 1}",
            }
        )
    return out


def padding_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def without_sample_columns(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in SampleIdCollator.dataset_columns} for s in samples]


def test_padded_batch_repeats_each_row_source(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    samples = features()
    batch = SampleIdCollator(padding_collator(chatml_tokenizer))(samples)
    plain = padding_collator(chatml_tokenizer)(without_sample_columns(samples))
    assert set(batch) == set(plain) | {SOURCE_IDS_KEY, ORIGINS_KEY}
    for key in plain:
        assert torch.equal(batch[key], plain[key]), key  # the model inputs are the wrapped collator's own
    ids = batch[SOURCE_IDS_KEY]
    assert ids.dtype == torch.long and ids.shape == batch["labels"].shape == (3, max(LENGTHS))
    assert ids.tolist() == [[source] * max(LENGTHS) for source in SOURCES]
    assert batch[ORIGINS_KEY] == ["data/s1.jsonl:1", "data/s0.jsonl:2", "data/s1.jsonl:3"]
    assert "origin" not in batch and SOURCE_ID_KEY not in batch


def test_packed_batch_gives_each_sample_its_source_over_its_tokens() -> None:
    samples = features()
    batch = SampleIdCollator(PaddingFreeCollator())(samples)
    ids = batch[SOURCE_IDS_KEY]
    assert ids.shape == batch["labels"].shape == (1, sum(LENGTHS))
    assert ids[0].tolist() == [1] * 5 + [0] * 11 + [1] * 8
    # Aligned with the labels: every separator (a sample's first label) starts a run of that sample's source.
    starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1).tolist()
    assert starts == [0, 5, 16] and ids[0, starts].tolist() == list(SOURCES)
    assert batch[ORIGINS_KEY] == [s["origin"] for s in samples]
    assert torch.equal(batch["input_ids"], PaddingFreeCollator()(without_sample_columns(samples))["input_ids"])


def test_prepared_rows_keep_their_source_through_both_collators(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    data = data_config(SAMPLE_SOURCES, max_length=128, num_proc=1, validation_split_percentage=0)
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    names = list(stats.sources)
    rows = [train[i] for i in range(len(train))]
    by_source = {source: next(r for r in rows if r[SOURCE_ID_KEY] == source) for source in range(len(names))}
    samples = list(by_source.values())
    assert len(samples) == 2
    for collator in (padding_collator(chatml_tokenizer), PaddingFreeCollator()):
        batch = SampleIdCollator(collator)(samples)
        valid = batch["labels"] != IGNORE_INDEX
        for source, origin in enumerate(batch[ORIGINS_KEY]):
            # The id names the file the record came from: `stats.sources` order, as the trainer reads it.
            assert Path(origin.rsplit(":", 1)[0]) == Path(names[source])
            expected = sum(1 for label in samples[source]["labels"] if label != IGNORE_INDEX)
            separator = int(samples[source]["labels"][0] != IGNORE_INDEX) if batch["labels"].size(0) == 1 else 0
            assert int((valid & (batch[SOURCE_IDS_KEY] == source)).sum()) == expected - separator


def test_batches_without_sample_columns_pass_through(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    batch = SampleIdCollator(padding_collator(chatml_tokenizer))(without_sample_columns(features()))
    assert SOURCE_IDS_KEY not in batch and ORIGINS_KEY not in batch


def test_unknown_layout_is_reported() -> None:
    with pytest.raises(ValueError, match=r"labels of shape \(2, 3\) from 3 samples"):
        token_source_ids([0, 1, 1], [2, 3, 3], (2, 3))
