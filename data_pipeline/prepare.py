"""Build the training and validation sets from `data.sources`.

Reads every source, converts each record to the canonical schema (a bad
record stops the run with its file and line), tokenises across
`data.num_proc` processes with assistant-only labels, drops samples left with
no trainable token (counted), and splits off a deterministic validation share.
`DatasetStats` accounts for every record of every source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from data_pipeline.schema import MESSAGES_KEY, SOURCE_KEY, to_canonical
from data_pipeline.sources import check_source_paths, read_records
from data_pipeline.tokenize import (
    ATTENTION_MASK_KEY,
    INPUT_IDS_KEY,
    LABELS_KEY,
    NUM_TRAINABLE_KEY,
    TRUNCATED_KEY,
    check_assistant_mask,
    tokenize_batch,
)

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = (INPUT_IDS_KEY, ATTENTION_MASK_KEY, LABELS_KEY)


@dataclass
class SourceStats:
    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    trainable_tokens: int = 0


@dataclass
class DatasetStats:
    sources: dict[str, SourceStats] = field(default_factory=dict)
    train_samples: int = 0
    validation_samples: int = 0

    def summary(self) -> str:
        header = f"{'source':<48} {'records':>8} {'kept':>8} {'dropped':>8} {'trunc':>6} {'tokens':>10} {'trained':>10}"
        lines = [header, "-" * len(header)]
        for name, s in self.sources.items():
            lines.append(
                f"{name[-48:]:<48} {s.records:>8} {s.kept:>8} {sum(s.dropped.values()):>8} "
                f"{s.truncated:>6} {s.tokens:>10} {s.trainable_tokens:>10}"
            )
        lines.append(f"train samples: {self.train_samples}  validation samples: {self.validation_samples}")
        return "\n".join(lines)


def load_canonical(sources: list[str]) -> tuple[list[dict], DatasetStats]:
    stats = DatasetStats()
    records = []
    for path in check_source_paths(sources):
        source_stats = stats.sources.setdefault(str(path), SourceStats())
        for line, record in read_records(path):
            source_stats.records += 1
            records.append(to_canonical(record, path, line))
    return records, stats


def build_datasets(
    sources: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_proc: int,
    validation_split_percentage: float,
    seed: int,
) -> tuple[Dataset, Dataset | None, DatasetStats]:
    check_assistant_mask(tokenizer)
    records, stats = load_canonical(sources)
    canonical = Dataset.from_list(records)
    tokenized = canonical.map(
        partial(tokenize_batch, tokenizer=tokenizer, max_length=max_length),
        batched=True,
        num_proc=min(num_proc, max(len(records) // 1000, 1)),
        remove_columns=[MESSAGES_KEY],
        desc="Tokenising",
    )
    _account(tokenized, stats)
    kept = tokenized.filter(lambda n: n > 0, input_columns=NUM_TRAINABLE_KEY)
    kept = kept.select_columns(list(MODEL_INPUT_KEYS))
    if validation_split_percentage > 0:
        split = kept.train_test_split(test_size=validation_split_percentage / 100.0, seed=seed)
        train, validation = split["train"], split["test"]
    else:
        train, validation = kept, None
    stats.train_samples = len(train)
    stats.validation_samples = len(validation) if validation is not None else 0
    return train, validation, stats


def _account(tokenized: Dataset, stats: DatasetStats) -> None:
    columns = tokenized.select_columns([SOURCE_KEY, NUM_TRAINABLE_KEY, TRUNCATED_KEY, INPUT_IDS_KEY])
    for row in columns:
        source = stats.sources[row[SOURCE_KEY]]
        if row[NUM_TRAINABLE_KEY] == 0:
            reason = "no_trainable_tokens_after_truncation" if row[TRUNCATED_KEY] else "no_trainable_tokens"
            source.dropped[reason] = source.dropped.get(reason, 0) + 1
            continue
        source.kept += 1
        source.truncated += int(row[TRUNCATED_KEY])
        source.tokens += len(row[INPUT_IDS_KEY])
        source.trainable_tokens += row[NUM_TRAINABLE_KEY]
