"""Build the training and validation sets from `data.sources`, cached, and the `prepare` command.

    python -m data_pipeline.prepare data=custom data.sources=[/data/a.jsonl,/data/b.json.gz]

takes the same Hydra overrides as `train.py`, prepares the dataset once under `data.cache_dir` and prints the
prepared directory as its last line; `train.py` then reuses it instead of tokenising again.

The steps: read every source (each record with its file and line), convert it to the canonical schema (a bad
record stops the run with `file:line: problem` under `data.on_error=raise`, or is skipped and counted under
`skip`), cap each source at `max_samples`, sample it by `weight`, tokenise across `data.num_proc` processes
with assistant-only labels, drop (and count) samples left with no trainable token, split off a deterministic
validation share of the distinct records, then repeat the training rows of up-weighted sources. Validation
rows are never repeated, and a record is never both in training and validation.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import PreTrainedTokenizerBase

from data_pipeline.cache import cached_build, dataset_fingerprint
from data_pipeline.schema import ORIGIN_KEY, SOURCE_KEY, TOOLS_KEY, to_canonical
from data_pipeline.sources import (
    ON_ERROR_CHOICES,
    DataFormatError,
    SourceSpec,
    iter_records,
    parse_sources,
    resolve_files,
)
from data_pipeline.stats import DatasetStats, SourceStats
from data_pipeline.tokenize import (
    ATTENTION_MASK_KEY,
    CONVERSATION_KEY,
    INPUT_IDS_KEY,
    LABELS_KEY,
    NUM_TRAINABLE_KEY,
    TRUNCATED_KEY,
    check_assistant_mask,
    tokenize_batch,
)
from launcher.config import RunConfig, register_configs, to_run_config
from launcher.model import load_tokenizer, resolve_tokenizer_path

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = (INPUT_IDS_KEY, ATTENTION_MASK_KEY, LABELS_KEY)
# Carried beside the model inputs: which source (its index in `stats.sources`, the order of `data.sources`)
# and which record (`file:line`) each sample is, for per-source metrics and for naming a bad batch's samples.
SOURCE_ID_KEY = "source_id"
SAMPLE_KEYS = (SOURCE_ID_KEY, ORIGIN_KEY)
COPIES_KEY = "copies"
TRAIN_DIR, VALIDATION_DIR = "train", "validation"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Located warnings per source under `skip`; the counts cover the rest.
_SKIP_WARNINGS_PER_SOURCE = 3


@dataclass
class PreparedData:
    """The training set, the validation set (or None) and their report."""

    train: Dataset
    validation: Dataset | None
    stats: DatasetStats

    def save(self, directory: Path) -> None:
        self.train.save_to_disk(str(directory / TRAIN_DIR))
        if self.validation is not None:
            self.validation.save_to_disk(str(directory / VALIDATION_DIR))
        self.stats.save(directory)

    @classmethod
    def load(cls, directory: Path) -> PreparedData:
        validation_dir = directory / VALIDATION_DIR
        validation = load_from_disk(str(validation_dir)) if validation_dir.is_dir() else None
        return cls(load_from_disk(str(directory / TRAIN_DIR)), validation, DatasetStats.load(directory))


def load_canonical(
    sources: list[Any], on_error: str = "raise", seed: int = 0
) -> tuple[list[dict[str, Any]], DatasetStats]:
    """Read, check and sample every source.

    Args:
        sources: `data.sources` entries (paths, globs, directories or mappings).
        on_error: `raise` stops at the first bad record; `skip` counts it under its reason.
        seed: seeds the sampling by `weight`.

    Returns:
        The canonical records, each with the number of `copies` it gets in training, and the accounting.

    Raises:
        DataFormatError: a bad record under `raise`, or a file that cannot be read to its end.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"data.on_error={on_error!r} is not one of {list(ON_ERROR_CHOICES)}")
    stats = DatasetStats()
    records: list[dict[str, Any]] = []
    for index, spec in enumerate(parse_sources(sources)):
        for path in resolve_files(spec, index):
            source_stats = stats.sources.setdefault(str(path), SourceStats())
            kept = _read_source_file(path, spec, on_error, source_stats)
            records.extend(_sample(kept, spec, seed, f"{index}:{path}", source_stats))
    return records, stats


def _read_source_file(path: Path, spec: SourceSpec, on_error: str, stats: SourceStats) -> list[dict[str, Any]]:
    kept = []
    for line, record in iter_records(path):
        stats.records += 1
        try:
            if isinstance(record, DataFormatError):
                raise record
            canonical, dropped_columns = to_canonical(record, path, line, spec.format, spec.fields)
        except DataFormatError as e:
            if on_error == "raise":
                raise
            if sum(stats.dropped.values()) < _SKIP_WARNINGS_PER_SOURCE:
                logger.warning("Skipped %s (data.on_error=skip)", e)
            stats.drop(e.reason)
            continue
        for column in dropped_columns:
            stats.dropped_columns[column] = stats.dropped_columns.get(column, 0) + 1
        kept.append(canonical)
    return kept


def _sample(
    records: list[dict[str, Any]], spec: SourceSpec, seed: int, salt: str, stats: SourceStats
) -> list[dict[str, Any]]:
    """Cap at `max_samples`, then give each record `floor(weight)` copies plus one for a seeded share."""
    if spec.max_samples is not None and len(records) > spec.max_samples:
        stats.drop("max_samples", len(records) - spec.max_samples)
        records = records[: spec.max_samples]
    whole = math.floor(spec.weight)
    extra = round((spec.weight - whole) * len(records))
    chosen = set(random.Random(f"{seed}:{salt}").sample(range(len(records)), extra))
    sampled = []
    for i, record in enumerate(records):
        copies = whole + (i in chosen)
        if copies == 0:
            stats.drop("weight")
            continue
        sampled.append({**record, COPIES_KEY: copies})
    return sampled


def _to_rows(records: list[dict[str, Any]], source_ids: dict[str, int]) -> Dataset:
    # Tool schemas and call arguments differ from record to record: one JSON string per dialogue keeps Arrow
    # from having to unify their types (the `datasets` schema-mismatch crash on mixed sources).
    return Dataset.from_dict(
        {
            CONVERSATION_KEY: [
                json.dumps({key: r[key] for key in ("messages", TOOLS_KEY) if key in r}, ensure_ascii=False)
                for r in records
            ],
            SOURCE_KEY: [r[SOURCE_KEY] for r in records],
            SOURCE_ID_KEY: [source_ids[r[SOURCE_KEY]] for r in records],
            ORIGIN_KEY: [r[ORIGIN_KEY] for r in records],
            COPIES_KEY: [r[COPIES_KEY] for r in records],
        }
    )


def build_prepared(
    sources: list[Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_proc: int,
    validation_split_percentage: float,
    seed: int,
    on_error: str = "raise",
) -> PreparedData:
    """Read, tokenise, account and split, without any cache (see `build_datasets`)."""
    check_assistant_mask(tokenizer)
    records, stats = load_canonical(sources, on_error, seed)
    source_ids = {name: i for i, name in enumerate(stats.sources)}
    tokenized = _to_rows(records, source_ids).map(
        partial(tokenize_batch, tokenizer=tokenizer, max_length=max_length),
        batched=True,
        num_proc=min(num_proc, max(len(records) // 1000, 1)),
        remove_columns=[CONVERSATION_KEY],
        desc="Tokenising",
    )
    _account(tokenized, stats)
    kept = tokenized.filter(lambda n: n > 0, input_columns=NUM_TRAINABLE_KEY)
    if validation_split_percentage > 0:
        split = kept.train_test_split(test_size=validation_split_percentage / 100.0, seed=seed)
        train, validation = split["train"], split["test"]
    else:
        train, validation = kept, None
    copies = list(train[COPIES_KEY])
    if any(n > 1 for n in copies):
        train = train.select([i for i, n in enumerate(copies) for _ in range(n)])
    for source in list(train[SOURCE_KEY]) + (list(validation[SOURCE_KEY]) if validation is not None else []):
        stats.sources[source].samples += 1
    stats.train_samples = len(train)
    stats.validation_samples = len(validation) if validation is not None else 0
    columns = [*MODEL_INPUT_KEYS, *SAMPLE_KEYS]
    validation = validation.select_columns(columns) if validation is not None else None
    return PreparedData(train.select_columns(columns), validation, stats)


def prepare_dataset(
    sources: list[Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_proc: int,
    validation_split_percentage: float,
    seed: int,
    on_error: str,
    cache_dir: str | Path,
) -> tuple[Path, bool]:
    """Build the dataset into `<cache_dir>/<fingerprint>` unless a matching one is there.

    Returns:
        The prepared directory and whether this call built it.
    """
    specs = parse_sources(sources)
    files = [(spec, resolve_files(spec, index)) for index, spec in enumerate(specs)]
    options = {
        "max_length": max_length,
        "validation_split_percentage": validation_split_percentage,
        "seed": seed,
        "on_error": on_error,
    }
    fingerprint = dataset_fingerprint(files, tokenizer, options)

    def build(directory: Path) -> None:
        prepared = build_prepared(sources, tokenizer, max_length, num_proc, validation_split_percentage, seed, on_error)
        prepared.save(directory)

    return cached_build(cache_dir, fingerprint, build)


def build_datasets(
    sources: list[Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_proc: int,
    validation_split_percentage: float,
    seed: int,
    on_error: str = "raise",
    cache_dir: str | Path | None = None,
) -> tuple[Dataset, Dataset | None, DatasetStats]:
    """The training set, the validation set (or None) and the data report.

    Args:
        sources: `data.sources` entries.
        tokenizer: its chat template gives the assistant mask (checked on a probe dialogue first).
        max_length: tokens kept per sample.
        num_proc: tokenisation workers.
        validation_split_percentage: share of the distinct samples held out.
        seed: the split and the weighted sampling.
        on_error: `raise` or `skip` (count) bad records.
        cache_dir: reuse or write the prepared dataset there; None builds in memory.
    """
    if cache_dir is None:
        prepared = build_prepared(sources, tokenizer, max_length, num_proc, validation_split_percentage, seed, on_error)
        return prepared.train, prepared.validation, prepared.stats
    directory, built = prepare_dataset(
        sources, tokenizer, max_length, num_proc, validation_split_percentage, seed, on_error, cache_dir
    )
    logger.info("%s the prepared dataset %s", "Wrote" if built else "Reusing", directory)
    prepared = PreparedData.load(directory)
    return prepared.train, prepared.validation, prepared.stats


def _account(tokenized: Dataset, stats: DatasetStats) -> None:
    columns = tokenized.select_columns([SOURCE_KEY, NUM_TRAINABLE_KEY, TRUNCATED_KEY, INPUT_IDS_KEY])
    for row in columns:
        source = stats.sources[row[SOURCE_KEY]]
        if row[NUM_TRAINABLE_KEY] == 0:
            source.drop("no_trainable_tokens_after_truncation" if row[TRUNCATED_KEY] else "no_trainable_tokens")
            continue
        source.kept += 1
        source.truncated += int(row[TRUNCATED_KEY])
        source.tokens += len(row[INPUT_IDS_KEY])
        source.trainable_tokens += row[NUM_TRAINABLE_KEY]


def load_run_config(overrides: list[str]) -> RunConfig:
    """Compose `conf/config.yaml` with `train.py`'s overrides into the typed `RunConfig`."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_run_config(compose(config_name="config", overrides=overrides))


def prepare_run(run: RunConfig) -> tuple[Path, bool, PreTrainedTokenizerBase]:
    """Prepare (or find) the dataset of a composed run, as `train.py` would.

    Returns:
        The prepared directory, whether this call built it, and the run's tokenizer.
    """
    tokenizer = load_tokenizer(run.model, resolve_tokenizer_path(run.model))
    data = run.data
    directory, built = prepare_dataset(
        data.sources,
        tokenizer,
        data.max_length,
        data.num_proc,
        data.validation_split_percentage,
        run.training.seed,
        data.on_error,
        data.cache_dir,
    )
    return directory, built, tokenizer


def main(argv: list[str] | None = None) -> None:
    """Prepare the dataset for a set of overrides; the last line printed is its directory."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory, built, _ = prepare_run(load_run_config(sys.argv[1:] if argv is None else argv))
    # A CLI: the table for the user, the directory last so that scripts can take it with `tail -n 1`.
    print(DatasetStats.load(directory).summary())  # noqa: T201
    print("built" if built else "reused (already prepared)")  # noqa: T201
    print(directory.resolve())  # noqa: T201


if __name__ == "__main__":
    main()
