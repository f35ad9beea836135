"""Build the training and validation sets from `data.sources`, cached, and the `prepare` command.

    python -m data_pipeline.prepare data=custom data.sources=[/data/a.jsonl,/data/b.json.gz]

takes the same Hydra overrides as `train.py`, prepares the dataset once under `data.cache_dir` and prints the
prepared directory as its last line; `train.py` then reuses it instead of tokenising again.

The steps: find every record of every source (its bytes, file and line), parse and convert it to the canonical
schema (a bad record stops the run with `file:line: problem` under `data.on_error=raise`, or is skipped and
counted under `skip`), cap each source at `max_samples`, sample it by `weight`, tokenise with assistant-only
labels, drop (and count) samples left with no trainable token, split off a deterministic validation share of
the distinct records, then repeat the training rows of up-weighted sources. Validation rows are never
repeated, and a record is never both in training and validation.

Raw text (`format: text` sources, `training.objective=pretrain`) takes the same steps with documents for records:
each is tokenised and closed with the end-of-text token instead of rendered as a dialogue, and after the split and
repetition each part is cut into samples of at most `data.max_length` tokens (`data_pipeline.text`), every token
labelled; the same cache, report and `prepare` command serve both.

Preference pairs (`format: pairs` sources, `training.objective=reward|dpo`) take the same steps with pairs for
records: each is read into a canonical pair and tokenised into its chosen and rejected sequences, which share their
prompt tokens (`data_pipeline.pairs`); a pair is held out for validation or trained whole.

Only finding the records runs in this process: conversion and tokenisation are Arrow-batch maps across
`data.num_proc` forked workers (`data_pipeline.parallel`) that hand Arrow tables to each other (the canonical
dialogue as one JSON string per record), and the accounting, filtering, split and repetition are column operations
on the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.fingerprint import get_temporary_cache_files_directory
from transformers import PreTrainedTokenizerBase

from config.schema import SAMPLE_BY_LINE, DataConfig, RunConfig, load_run_config, source_kind
from config.sources import ON_ERROR_CHOICES, PAIRS_FORMAT, TEXT_FORMAT, SourceSpec
from core.errors import exit_on_user_error
from core.files import build_once
from core.keys import (
    ATTENTION_MASK_KEY,
    INPUT_IDS_KEY,
    LABELS_KEY,
    LENGTH_KEY,
    ORIGIN_KEY,
    PAIR_SEQUENCE_KEYS,
    SOURCE_ID_KEY,
)
from data_pipeline.cache import dataset_fingerprint
from data_pipeline.pairs import to_pair, tokenize_pair_batch
from data_pipeline.parallel import BATCH_SIZE, map_arrow_batches, release_mapped_pages
from data_pipeline.schema import MESSAGES_KEY, TEXT_KEY, TOOLS_KEY, to_canonical, to_text
from data_pipeline.sources import DataFormatError, iter_raw_records, parse_record, resolve_files
from data_pipeline.stats import DatasetStats, SourceStats
from data_pipeline.templates import load_chat_tokenizer
from data_pipeline.text import PRETRAIN_BLOCKS_PACKED, encode_documents, iter_blocks
from data_pipeline.tokenize import (
    CONVERSATION_KEY,
    NUM_TRAINABLE_KEY,
    REASONING_NOT_RENDERED_KEY,
    REASONING_TURNS_KEY,
    REFUSAL_KEY,
    REFUSAL_REASON_KEY,
    TRUNCATED_KEY,
    UNTRAINED_TURNS_KEY,
    TokenizeOptions,
    ToolCallsNotRendered,
    check_assistant_mask,
    tokenize_batch,
)
from modeling.loading import resolve_tokenizer_path

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = (INPUT_IDS_KEY, ATTENTION_MASK_KEY, LABELS_KEY)
# A prepared pair's sequences (`PairCollator` makes the model inputs of them) and its longer length.
PAIR_KEYS = (*PAIR_SEQUENCE_KEYS, LENGTH_KEY)
# Carried beside the model inputs, for per-source metrics and for naming a bad batch's samples.
SAMPLE_KEYS = (SOURCE_ID_KEY, ORIGIN_KEY)
COPIES_KEY = "copies"
TRAIN_DIR, VALIDATION_DIR = "train", "validation"
# Each prepared set's rows, an Arrow stream file in its directory.
ROWS_FILE = "rows.arrow"
# Rows gathered at a time from shuffled positions: the kernel maps 64 KB around each place a row's columns are read,
# so this bounds the pages held before `release_mapped_pages` hands them back (200 documents, 8 buffers each, mapped
# about 100 MB), at one /proc read (about 2 ms) per batch.
_GATHER_BATCH_ROWS = 200
# Dialogues searched at a time by the template probe (a few MB of JSON).
_SCAN_BATCH_ROWS = 10 * BATCH_SIZE
# What the validation share is drawn from (`stats.json`'s `validation_split`): chat records, raw-text documents, or
# the blocks they were cut into when the documents are too few for the share.
VALIDATION_BY_RECORD, VALIDATION_BY_DOCUMENT, VALIDATION_BY_BLOCK = "records", "documents", "blocks"
VALIDATION_BY_PAIR = "pairs"
# Located warnings per source under `skip`; the counts cover the rest.
_SKIP_WARNINGS_PER_SOURCE = 3
# Columns of the conversion step: each record's bytes and place, then its canonical JSON or why it is bad.
RAW_KEY, FILE_ID_KEY, LINE_KEY = "raw", "file_id", "line"
REASON_KEY, PROBLEM_KEY, DROPPED_COLUMNS_KEY = "error_reason", "error", "dropped_columns"
_RAW_SCHEMA = pa.schema([(RAW_KEY, pa.binary()), (FILE_ID_KEY, pa.int32()), (LINE_KEY, pa.int64())])
# Record bytes gathered before they are written to the raw-records file: bounds the reading step's memory.
_RAW_BATCH_BYTES = 16 << 20


@dataclass
class PreparedData:
    """The training set, the validation set (or None) and their report."""

    train: Dataset
    validation: Dataset | None
    stats: DatasetStats

    def save(self, directory: Path) -> None:
        for name, part in ((TRAIN_DIR, self.train), (VALIDATION_DIR, self.validation)):
            if part is not None:
                _write_rows(part, directory / name / ROWS_FILE)
        self.stats.save(directory)

    @classmethod
    def load(cls, directory: Path) -> PreparedData:
        validation_file = directory / VALIDATION_DIR / ROWS_FILE
        validation = Dataset.from_file(str(validation_file)) if validation_file.is_file() else None
        return cls(Dataset.from_file(str(directory / TRAIN_DIR / ROWS_FILE)), validation, DatasetStats.load(directory))


def _write_rows(dataset: Dataset, path: Path) -> None:
    """`dataset`'s rows, in its order (the split, shuffle and repetition by index applied), batch by batch into an
    Arrow file that `Dataset.from_file` maps.

    Not `save_to_disk`: a batch of shuffled rows is gathered from pages all over the memory-mapped source files
    (one batch of 1,000 mapped nearly all of a 120 MB file, the kernel reading around each row), and those pages stay
    in this process's RSS until they are unmapped; handed back after each batch, the write holds one batch's pages.
    """
    path.parent.mkdir(parents=True)
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for table in dataset.with_format("arrow").iter(_GATHER_BATCH_ROWS):
            writer = writer or pa.ipc.new_stream(sink, table.schema)
            writer.write_table(table)
            release_mapped_pages()
        if writer is not None:
            writer.close()


def load_canonical(
    specs: list[SourceSpec],
    on_error: str = "raise",
    seed: int = 0,
    num_proc: int = 1,
    sample_by: str = SAMPLE_BY_LINE,
) -> tuple[Dataset, DatasetStats]:
    """Read, check and sample every source.

    Each file's records are found here; parsing, checking and conversion run across `num_proc` processes.

    Args:
        specs: the checked `data.sources` entries (`DataConfig.specs`).
        on_error: `raise` stops at the first bad record; `skip` counts it under its reason.
        seed: seeds the sampling by `weight`.
        num_proc: conversion workers.
        sample_by: how a `.txt` file becomes documents (`data.sample_by`).

    Returns:
        The canonical rows in file and line order (`conversation` JSON, a dialogue or for `pairs` sources a pair,
        or the document's `text` for raw-text sources), `source_id`, `origin`, and the number of `copies` each gets
        in training, and the accounting.

    Raises:
        DataFormatError: a bad record under `raise`, or a file that cannot be read to its end.
        ValueError: a bad `on_error`, files that hold no record at all, or sources of different kinds (raw text,
            pairs, chat) together.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"data.on_error={on_error!r} is not one of {list(ON_ERROR_CHOICES)}")
    kinds = {source_kind(spec) for spec in specs}
    if len(kinds) > 1:
        raise ValueError(f"data.sources: sources of kinds {sorted(kinds)} cannot be trained in one run")
    (kind,) = kinds
    content_key = TEXT_KEY if kind == TEXT_FORMAT else CONVERSATION_KEY
    files = [
        _SourceFile(path, spec, f"{index}:{path}")
        for index, spec in enumerate(specs)
        for path in resolve_files(spec, index)
    ]
    stats = DatasetStats()
    for file in files:
        stats.sources.setdefault(str(file.path), SourceStats())
    source_ids = {name: i for i, name in enumerate(stats.sources)}
    raw, blank_rows = _raw_rows(files, sample_by)
    for file, blank in zip(files, blank_rows, strict=True):
        if blank:  # datasets' text loader gives them as rows: counted as records, dropped for their lack of text
            stats.sources[str(file.path)].records += blank
            stats.sources[str(file.path)].drop("blank_row", blank)
    if not len(raw):
        raise ValueError(f"data.sources: no record in {', '.join(str(file.path) for file in files)}")
    converted = map_arrow_batches(
        raw, partial(_convert_batch, files=files, source_ids=source_ids, kind=kind), num_proc, "Checking"
    )
    del raw
    columns = converted.with_format("arrow").select_columns([FILE_ID_KEY, LINE_KEY, REASON_KEY, PROBLEM_KEY])[:]
    file_ids = columns[FILE_ID_KEY].to_numpy()
    valid = pc.is_null(columns[REASON_KEY]).to_numpy(zero_copy_only=False)
    _account_bad_records(columns, np.flatnonzero(~valid), files, stats, on_error)
    _count_dropped_columns(converted, files, stats)

    rows_per_file = np.bincount(file_ids, minlength=len(files))
    file_starts = np.concatenate([[0], np.cumsum(rows_per_file)])
    chosen, copies = [], []
    for file_id, file in enumerate(files):
        source_stats = stats.sources[str(file.path)]
        source_stats.records += int(rows_per_file[file_id])
        begin, end = file_starts[file_id], file_starts[file_id + 1]
        positions = np.flatnonzero(valid[begin:end]) + begin
        file_copies = _sample(len(positions), file.spec, seed, file.salt, source_stats)
        positions = positions[: len(file_copies)]
        chosen.append(positions[file_copies > 0])
        copies.append(file_copies[file_copies > 0])
    indices = np.concatenate([np.zeros(0, np.int64), *chosen])
    all_copies = np.zeros(len(converted), np.int64)
    all_copies[indices] = np.concatenate([np.zeros(0, np.int64), *copies])
    # The column goes on before the selection: `add_column` on a selection would first rewrite every row it keeps.
    canonical = converted.add_column(COPIES_KEY, all_copies)
    if len(indices) < len(converted):
        canonical = canonical.select(indices)
    return canonical.select_columns([content_key, SOURCE_ID_KEY, ORIGIN_KEY, COPIES_KEY]), stats


@dataclass(frozen=True)
class _SourceFile:
    """One file of a `data.sources` entry; `salt` (entry index and path) seeds its sampling."""

    path: Path
    spec: SourceSpec
    salt: str


def _raw_rows(files: list[_SourceFile], sample_by: str) -> tuple[Dataset, list[int]]:
    """Every record's bytes, file and line, streamed batch by batch into an Arrow file under `datasets`' temporary
    cache directory and memory-mapped from there: reading a corpus holds one batch, not the corpus. Also the
    blank rows of each file (`.txt` rows of whitespace only), which are not records to convert."""
    path = Path(tempfile.mkdtemp(prefix="raw-", dir=get_temporary_cache_files_directory())) / "raw.arrow"
    blank_rows = [0] * len(files)
    batch: tuple[list[bytes], list[int], list[int]] = ([], [], [])
    batch_bytes = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _RAW_SCHEMA) as writer:

        def write_batch() -> None:
            raw, file_ids, lines = batch
            # Built in Arrow directly: `Dataset.from_dict` would infer and check the type of every value.
            columns = [pa.array(raw, pa.binary()), pa.array(file_ids, pa.int32()), pa.array(lines, pa.int64())]
            writer.write_batch(pa.record_batch(columns, schema=_RAW_SCHEMA))
            for column in batch:
                column.clear()

        for file_id, file in enumerate(files):
            for line, record in iter_raw_records(file.path, sample_by):
                if record is None:
                    blank_rows[file_id] += 1
                    continue
                batch[0].append(record)
                batch[1].append(file_id)
                batch[2].append(line)
                batch_bytes += len(record)
                if batch_bytes >= _RAW_BATCH_BYTES:
                    write_batch()
                    batch_bytes = 0
        write_batch()
    return Dataset.from_file(str(path)), blank_rows


def _chat_content(record: Any, file: _SourceFile, line: int) -> tuple[str, list[str]]:
    canonical, dropped_columns = to_canonical(record, file.path, line, file.spec.format, file.spec.fields)
    # Tool schemas and call arguments differ from record to record: one JSON string per dialogue keeps Arrow from
    # having to unify their types (the `datasets` schema-mismatch crash on mixed sources).
    return json.dumps(
        {key: canonical[key] for key in (MESSAGES_KEY, TOOLS_KEY) if key in canonical}, ensure_ascii=False
    ), dropped_columns


def _pair_content(record: Any, file: _SourceFile, line: int) -> tuple[str, list[str]]:
    pair, dropped_columns = to_pair(record, file.path, line, file.spec.fields)
    return json.dumps(pair, ensure_ascii=False), dropped_columns


def _text_content(record: Any, file: _SourceFile, line: int) -> tuple[str, list[str]]:
    return to_text(record, file.path, line, file.spec.fields)


# Each record kind (`config.schema.source_kind`): the column its content goes to, and the conversion into it.
_RECORD_CONTENT = {
    TEXT_FORMAT: (TEXT_KEY, _text_content),
    PAIRS_FORMAT: (CONVERSATION_KEY, _pair_content),
    "chat": (CONVERSATION_KEY, _chat_content),
}


def _convert_batch(batch: pa.Table, files: list[_SourceFile], source_ids: dict[str, int], kind: str) -> pa.Table:
    """Parse, check and convert raw records of one `kind`: the canonical JSON (the document's text under
    `TEXT_KEY`), or the reason and problem of a bad record."""
    content_key, convert = _RECORD_CONTENT[kind]
    contents, origins, reasons, problems, dropped, sample_sources, lines = [], [], [], [], [], [], []
    for raw, file_id, line in zip(
        batch.column(RAW_KEY).to_pylist(),
        batch.column(FILE_ID_KEY).to_pylist(),
        batch.column(LINE_KEY).to_pylist(),
        strict=True,
    ):
        file = files[file_id]
        sample_sources.append(source_ids[str(file.path)])
        origins.append(f"{file.path}:{line}")
        try:
            content, dropped_columns = convert(parse_record(file.path, line, raw), file, line)
        except DataFormatError as e:
            lines.append(e.line)  # where in the record: a bad byte of a .txt document is on a line of its own
            contents.append(None)
            reasons.append(e.reason)
            problems.append(e.problem)
            dropped.append([])
            continue
        lines.append(line)
        contents.append(content)
        reasons.append(None)
        problems.append(None)
        dropped.append(dropped_columns)
    return pa.table(
        {
            FILE_ID_KEY: batch.column(FILE_ID_KEY),
            LINE_KEY: pa.array(lines, pa.int64()),
            SOURCE_ID_KEY: pa.array(sample_sources, pa.int32()),
            content_key: pa.array(contents, pa.string()),
            ORIGIN_KEY: pa.array(origins, pa.string()),
            REASON_KEY: pa.array(reasons, pa.string()),
            PROBLEM_KEY: pa.array(problems, pa.string()),
            DROPPED_COLUMNS_KEY: pa.array(dropped, pa.list_(pa.string())),
        }
    )


def _account_bad_records(
    columns: pa.Table, bad: np.ndarray, files: list[_SourceFile], stats: DatasetStats, on_error: str
) -> None:
    """Raise on the first bad record under `raise`; count each one under its reason under `skip`."""
    for row in columns.take(bad).to_pylist():
        path = files[row[FILE_ID_KEY]].path
        error = DataFormatError(path, row[LINE_KEY], row[PROBLEM_KEY], row[REASON_KEY])
        if on_error == "raise":
            raise error
        source_stats = stats.sources[str(path)]
        if sum(source_stats.dropped.values()) < _SKIP_WARNINGS_PER_SOURCE:
            logger.warning("Skipped %s (data.on_error=skip)", error)
        source_stats.drop(error.reason)


def _count_dropped_columns(converted: Dataset, files: list[_SourceFile], stats: DatasetStats) -> None:
    table = converted.with_format("arrow")
    dropped = table[DROPPED_COLUMNS_KEY]
    names = pc.list_flatten(dropped)
    if not len(names):
        return
    file_ids = table[FILE_ID_KEY].take(pc.list_parent_indices(dropped))
    counts = pa.table({FILE_ID_KEY: file_ids, "column": names}).group_by([FILE_ID_KEY, "column"])
    for row in counts.aggregate([("column", "count")]).sort_by("column").to_pylist():
        columns = stats.sources[str(files[row[FILE_ID_KEY]].path)].dropped_columns
        columns[row["column"]] = columns.get(row["column"], 0) + row["column_count"]


def _sample(records: int, spec: SourceSpec, seed: int, salt: str, stats: SourceStats) -> np.ndarray:
    """The copies of each of a file's first valid records: capped at `max_samples`, then `floor(weight)` copies
    plus one for a seeded share."""
    if spec.max_samples is not None and records > spec.max_samples:
        stats.drop("max_samples", records - spec.max_samples)
        records = spec.max_samples
    whole = math.floor(spec.weight)
    extra = round((spec.weight - whole) * records)
    copies = np.full(records, whole, dtype=np.int64)
    copies[random.Random(f"{seed}:{salt}").sample(range(records), extra)] += 1
    if (unsampled := int((copies == 0).sum())) > 0:
        stats.drop("weight", unsampled)
    return copies


def build_prepared(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Read, tokenise, account and split, without any cache (see `build_datasets`); raw text is cut into blocks
    around the split (`_split_text`), pairs are tokenised into two sequences each (`data_pipeline.pairs`)."""
    num_proc, share = data.num_proc, data.validation_split_percentage / 100.0
    canonical, stats = load_canonical(data.specs, data.on_error, seed, num_proc, data.sample_by)
    if not len(canonical):
        raise ValueError(f"data.sources: every record was dropped, nothing is left to tokenise:\n{stats.summary()}")
    if data.raw_text:
        documents = map_arrow_batches(canonical, partial(encode_documents, tokenizer=tokenizer), num_proc, "Tokenising")
        _account_documents(documents, stats, data)
        train, validation = _split_text(documents, share, seed, data, stats)
    else:
        _probe_template(canonical, tokenizer, data.on_error)
        tokenize, account, unit, columns = (
            (tokenize_pair_batch, _account_pairs, VALIDATION_BY_PAIR, PAIR_KEYS)
            if data.pairs
            else (tokenize_batch, _account, VALIDATION_BY_RECORD, MODEL_INPUT_KEYS)
        )
        tokenized = map_arrow_batches(
            canonical,
            partial(tokenize, tokenizer=tokenizer, options=TokenizeOptions.from_data(data)),
            num_proc,
            "Tokenising",
        )
        account(tokenized, stats, data.truncation, data.on_error)
        kept = np.flatnonzero(_column(tokenized, NUM_TRAINABLE_KEY) > 0)
        train_rows, validation_rows = _split(kept, share, seed, stats, unit)
        train = _Rows(tokenized, _repeat(tokenized, train_rows), columns)
        validation = _Rows(tokenized, validation_rows, columns) if validation_rows is not None else None
    for part in (train, validation) if validation is not None else (train,):
        samples = np.bincount(_column(part.dataset, SOURCE_ID_KEY)[part.rows], minlength=len(stats.sources))
        for source, count in zip(stats.sources.values(), samples.tolist(), strict=True):
            source.samples += count
    stats.train_samples = len(train.rows)
    stats.validation_samples = len(validation.rows) if validation is not None else 0
    return PreparedData(train.select(), validation.select() if validation is not None else None, stats)


class _Rows(NamedTuple):
    """Rows of a memory-mapped dataset, by index: the split, the shuffle and the repetition by weight are index
    arrays, and the rows themselves are only read when the prepared set is written (or trained on)."""

    dataset: Dataset
    rows: np.ndarray
    columns: tuple[str, ...] = MODEL_INPUT_KEYS
    """The columns a prepared row keeps besides `SAMPLE_KEYS`: the model inputs, or a pair's sequences."""

    def select(self) -> Dataset:
        return self.dataset.select_columns([*self.columns, *SAMPLE_KEYS]).select(self.rows)


def _split(
    rows: np.ndarray, share: float, seed: int, stats: DatasetStats, unit: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """A seeded `share` of `rows` held out, shuffled: the indices `Dataset.train_test_split(test_size=share,
    seed=seed)` would select (the validation count rounded up), drawn here as index arrays so that no row is read.
    No validation set when `share` is 0 or holding it out would leave no training row (a warning says so)."""
    if share == 0:
        return rows, None
    validation_count, train_count = math.ceil(share * len(rows)), math.floor((1 - share) * len(rows))
    if train_count < 1:
        logger.warning(
            "data.validation_split_percentage=%g of %d %s leaves nothing to train on, so there is no validation set "
            "(give more data, or set data.validation_split_percentage=0)",
            100 * share,
            len(rows),
            unit,
        )
        return rows, None
    permutation = np.random.default_rng(seed).permutation(len(rows))
    stats.validation_split = unit
    return rows[permutation[validation_count : validation_count + train_count]], rows[permutation[:validation_count]]


def _repeat(dataset: Dataset, train_rows: np.ndarray) -> np.ndarray:
    """Training rows repeated by their `copies` (a source's `weight`); validation rows are never repeated."""
    copies = _column(dataset, COPIES_KEY)[train_rows]
    return np.repeat(train_rows, copies) if (copies > 1).any() else train_rows


def _split_text(
    documents: Dataset, share: float, seed: int, data: DataConfig, stats: DatasetStats
) -> tuple[_Rows, _Rows | None]:
    """Encoded documents into training and validation blocks.

    By document when the validation share comes to one document at least (no document then has blocks on both
    sides): each part is cut into blocks on its own. Otherwise (a few long documents, a single book) the documents
    are cut into blocks first and the share is drawn from the blocks, so one long `.txt` file still gets a
    validation set; a training block is repeated by the `copies` of the document its first token belongs to.
    """
    stats.pretrain_blocks = data.pretrain_blocks
    every_document = np.arange(len(documents))
    if share > 0 and len(documents) * share >= 1:
        train_rows, validation_rows = _split(every_document, share, seed, stats, VALIDATION_BY_DOCUMENT)
        assert validation_rows is not None  # one document at least is held out
        train = _blocks(documents, _repeat(documents, train_rows), data, stats)
        validation = _blocks(documents, validation_rows, data, stats)
        return _Rows(train, np.arange(len(train))), _Rows(validation, np.arange(len(validation)))
    blocks = _blocks(documents, every_document, data, stats)
    train_rows, validation_rows = _split(np.arange(len(blocks)), share, seed, stats, VALIDATION_BY_BLOCK)
    train = _Rows(blocks, _repeat(blocks, train_rows))
    return train, _Rows(blocks, validation_rows) if validation_rows is not None else None


def _blocks(documents: Dataset, rows: np.ndarray, data: DataConfig, stats: DatasetStats) -> Dataset:
    """The encoded documents `rows`, in that order, as samples of at most `data.max_length` tokens (each with its
    document's `source_id`, `origin` and `copies`), cut batch by batch into an Arrow file: memory holds a batch of
    documents, not the part."""
    columns = documents.select_columns([INPUT_IDS_KEY, *SAMPLE_KEYS, COPIES_KEY])
    batches = (
        columns.select(rows[start : start + _GATHER_BATCH_ROWS]).with_format("arrow")[:]
        for start in range(0, len(rows), _GATHER_BATCH_ROWS)
    )
    path = Path(tempfile.mkdtemp(prefix="blocks-", dir=get_temporary_cache_files_directory())) / "blocks.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for blocks, short_blocks in iter_blocks(batches, data.max_length, data.pretrain_blocks):
            writer = writer or pa.ipc.new_stream(sink, blocks.schema)
            writer.write_table(blocks)
            stats.short_blocks += short_blocks
            release_mapped_pages()  # the pages of the documents read, as `_write_rows` does
        if writer is not None:
            writer.close()
    return Dataset.from_file(str(path))


def _account_documents(documents: Dataset, stats: DatasetStats, data: DataConfig) -> None:
    """Per source: the documents kept, their tokens (all trained), and those longer than `data.max_length` that
    `pretrain_blocks=packed` cuts into several samples."""
    columns = documents.with_format("arrow").select_columns([INPUT_IDS_KEY, SOURCE_ID_KEY])[:]
    source_ids = columns[SOURCE_ID_KEY].to_numpy()
    lengths = pc.list_value_length(columns[INPUT_IDS_KEY]).to_numpy()
    cut = (lengths > data.max_length) & (data.pretrain_blocks == PRETRAIN_BLOCKS_PACKED)

    per_source = partial(_per_source, source_ids, len(stats.sources))

    sums = zip(
        stats.sources.values(), per_source(np.ones(len(lengths))), per_source(lengths), per_source(cut), strict=True
    )
    for source, n_kept, n_tokens, n_cut in sums:
        source.kept += n_kept
        source.tokens += n_tokens
        source.trainable_tokens += n_tokens
        source.split_documents += n_cut


def prepare_dataset(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[Path, bool]:
    """Build the dataset into `<data.cache_dir>/<fingerprint>` unless a matching one is there.

    Returns:
        The prepared directory and whether this call built it.
    """
    if data.cache_dir is None:
        raise ValueError("data.cache_dir is null: there is no cache to prepare the dataset into; give a directory")
    files = [(spec, resolve_files(spec, index)) for index, spec in enumerate(data.specs)]
    # Every option that changes the result: the tokenisation ones come from TokenizeOptions, so a new one is keyed.
    options = {
        **dataclasses.asdict(TokenizeOptions.from_data(data)),
        "validation_split_percentage": data.validation_split_percentage,
        "seed": seed,
        "on_error": data.on_error,
    }
    if data.raw_text:  # the sources' `text` format is keyed with them; how text becomes samples is keyed here
        options["pretrain_blocks"] = data.pretrain_blocks
        options["sample_by"] = data.sample_by
    directory = Path(data.cache_dir) / dataset_fingerprint(files, tokenizer, options)

    built = build_once(directory, lambda temporary: build_prepared(data, tokenizer, seed).save(temporary))
    return directory, built


def build_datasets(
    data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[Dataset, Dataset | None, DatasetStats]:
    """The training set, the validation set (or None) and the data report.

    Args:
        data: the sources and every preparation option; `data.cache_dir` null builds in memory.
        tokenizer: its chat template gives the assistant mask (checked on a probe dialogue first).
        seed: the split and the weighted sampling.
    """
    if data.cache_dir is None:
        prepared = build_prepared(data, tokenizer, seed)
        return prepared.train, prepared.validation, prepared.stats
    directory, built = prepare_dataset(data, tokenizer, seed)
    logger.info("%s the prepared dataset %s", "Wrote" if built else "Reusing", directory)
    prepared = PreparedData.load(directory)
    return prepared.train, prepared.validation, prepared.stats


def _column(dataset: Dataset, name: str) -> np.ndarray:
    """One scalar column as numpy, through Arrow (an indices mapping, after a split, is applied)."""
    return dataset.with_format("arrow")[name].to_numpy()


def _per_source(source_ids: np.ndarray, num_sources: int, values: np.ndarray) -> list[int]:
    """`values` (one per sample) summed per source, as whole numbers: the per-source counts of stats.json."""
    return np.bincount(source_ids, weights=values, minlength=num_sources).astype(np.int64).tolist()


def _probe_template(canonical: Dataset, tokenizer: PreTrainedTokenizerBase, on_error: str) -> None:
    """The start-up probe of the chat template (`check_assistant_mask`), with the first record that has tool calls
    (or else tools) as its example of the data's tools. A template that drops tool calls refuses each record with
    calls by its file and line (or skips and counts them under `skip`, as a warning says here)."""
    example = None
    # As keys of the canonical JSON: in a message's text the quotes would be escaped.
    for key in ('"tool_calls"', f'"{TOOLS_KEY}"'):
        if (found := _first_containing(canonical, key)) is not None:
            dialogue = json.loads(found)
            example = (dialogue[MESSAGES_KEY], dialogue.get(TOOLS_KEY))
            break
    try:
        check_assistant_mask(tokenizer, example)
    except ToolCallsNotRendered as e:
        if on_error == "skip":
            logger.warning("%s: the records with tool calls are skipped and counted (data.on_error=skip)", e)


def _first_containing(canonical: Dataset, key: str) -> str | None:
    """The first canonical dialogue whose JSON contains `key`, searched a batch at a time: one search of the whole
    column would leave every page of the corpus's dialogues in this process's RSS (`release_mapped_pages`)."""
    for batch in canonical.select_columns([CONVERSATION_KEY]).with_format("arrow").iter(_SCAN_BATCH_ROWS):
        conversations = batch.column(CONVERSATION_KEY)
        found = np.flatnonzero(pc.match_substring(conversations, key).to_numpy(zero_copy_only=False))
        release_mapped_pages()
        if len(found):
            return conversations[int(found[0])].as_py()
    return None


def _account_refusals(columns: pa.Table, refused: np.ndarray, stats: DatasetStats, on_error: str) -> None:
    """Raise on the first record the chat template refuses under `raise`; count each one under its reason under
    `skip`, with a located warning for the first few of each source."""
    names = list(stats.sources)
    for row in columns.select([ORIGIN_KEY, SOURCE_ID_KEY, REFUSAL_REASON_KEY, REFUSAL_KEY]).take(refused).to_pylist():
        if on_error == "raise":
            raise ValueError(f"{row[ORIGIN_KEY]}: {row[REFUSAL_KEY]}")
        source_stats = stats.sources[names[row[SOURCE_ID_KEY]]]
        if sum(source_stats.dropped.values()) < _SKIP_WARNINGS_PER_SOURCE:
            logger.warning("Skipped %s: %s (data.on_error=skip)", row[ORIGIN_KEY], row[REFUSAL_KEY])
        source_stats.drop(row[REFUSAL_REASON_KEY])


def _account(tokenized: Dataset, stats: DatasetStats, truncation: str, on_error: str = "raise") -> None:
    """Per source: kept, truncated, tokens and trainable tokens, and the samples dropped: refused by the chat
    template (stops the run under `data.on_error=raise`), with nothing to train, or too long
    (`data.truncation=drop`)."""
    columns = tokenized.with_format("arrow")[:]
    refused = pc.is_valid(columns[REFUSAL_REASON_KEY]).to_numpy(zero_copy_only=False)
    _account_refusals(columns, np.flatnonzero(refused), stats, on_error)
    source_ids = columns[SOURCE_ID_KEY].to_numpy()
    trainable = columns[NUM_TRAINABLE_KEY].to_numpy()
    truncated = columns[TRUNCATED_KEY].to_numpy(zero_copy_only=False)
    tokens = pc.list_value_length(columns[INPUT_IDS_KEY]).to_numpy()
    untrained_turns = columns[UNTRAINED_TURNS_KEY].to_numpy()
    reasoning_turns = columns[REASONING_TURNS_KEY].to_numpy()
    reasoning_not_rendered = columns[REASONING_NOT_RENDERED_KEY].to_numpy()
    kept = trainable > 0

    per_source = partial(_per_source, source_ids, len(stats.sources))

    sums = zip(
        stats.sources.values(),
        per_source(kept),
        per_source(kept & truncated),
        per_source(np.where(kept, tokens, 0)),
        per_source(np.where(kept, trainable, 0)),
        per_source(~kept & truncated),
        per_source(~kept & ~truncated & ~refused),
        per_source(untrained_turns),
        per_source(np.where(kept, reasoning_turns, 0)),
        per_source(np.where(kept, reasoning_not_rendered, 0)),
        strict=True,
    )
    for source, n_kept, n_truncated, n_tokens, n_trainable, cut_empty, empty, untrained, reasoning, unrendered in sums:
        source.untrained_turns += untrained
        source.reasoning_turns += reasoning
        source.reasoning_not_rendered += unrendered
        source.kept += n_kept
        source.truncated += n_truncated
        source.tokens += n_tokens
        source.trainable_tokens += n_trainable
        too_long = "longer_than_max_length" if truncation == "drop" else "no_trainable_tokens_after_truncation"
        for reason, count in (
            (too_long, cut_empty),
            ("no_trainable_tokens", empty),
        ):
            if count:
                source.drop(reason, count)


def _account_pairs(tokenized: Dataset, stats: DatasetStats, truncation: str, on_error: str = "raise") -> None:
    """Per source: the pairs kept and truncated, the tokens of both sequences and their labelled tokens, the
    assistant turns left untrained, and the pairs dropped: refused (by the chat template, or rendered with two
    different prompts; stops the run under `data.on_error=raise`), with an empty reply on either side, or too long."""
    read = [*PAIR_SEQUENCE_KEYS[::2], SOURCE_ID_KEY, ORIGIN_KEY, NUM_TRAINABLE_KEY, TRUNCATED_KEY, UNTRAINED_TURNS_KEY]
    columns = tokenized.select_columns([*read, REFUSAL_REASON_KEY, REFUSAL_KEY]).with_format("arrow")[:]
    refused = pc.is_valid(columns[REFUSAL_REASON_KEY]).to_numpy(zero_copy_only=False)
    _account_refusals(columns, np.flatnonzero(refused), stats, on_error)
    source_ids = columns[SOURCE_ID_KEY].to_numpy()
    trainable = columns[NUM_TRAINABLE_KEY].to_numpy()
    truncated = columns[TRUNCATED_KEY].to_numpy(zero_copy_only=False)
    tokens = sum(pc.list_value_length(columns[key]).to_numpy() for key in PAIR_SEQUENCE_KEYS[::2])
    kept = trainable > 0
    per_source = partial(_per_source, source_ids, len(stats.sources))
    too_long = "longer_than_max_length" if truncation == "drop" else "no_trainable_tokens_after_truncation"
    sums = zip(
        stats.sources.values(),
        per_source(kept),
        per_source(kept & truncated),
        per_source(np.where(kept, tokens, 0)),
        per_source(trainable),
        per_source(columns[UNTRAINED_TURNS_KEY].to_numpy()),
        per_source(~kept & truncated & ~refused),
        per_source(~kept & ~truncated & ~refused),
        strict=True,
    )
    for source, n_kept, n_truncated, n_tokens, n_trainable, untrained, cut_empty, empty in sums:
        source.kept += n_kept
        source.truncated += n_truncated
        source.tokens += n_tokens
        source.trainable_tokens += n_trainable
        source.untrained_turns += untrained
        for reason, count in ((too_long, cut_empty), ("no_trainable_tokens", empty)):
            if count:
                source.drop(reason, count)
    stats.pairs = True


def prepare_run(run: RunConfig) -> tuple[Path, bool, PreTrainedTokenizerBase]:
    """Prepare (or find) the dataset of a composed run, as `train.py` would.

    Returns:
        The prepared directory, whether this call built it, and the run's tokenizer.
    """
    tokenizer = load_chat_tokenizer(run, resolve_tokenizer_path(run.model))
    directory, built = prepare_dataset(run.data, tokenizer, run.training.seed)
    return directory, built, tokenizer


def main(argv: list[str] | None = None) -> None:
    """Prepare the dataset for a set of overrides; the last line printed is its directory."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():  # a data or template problem: one line, no traceback (HYDRA_FULL_ERROR=1 keeps it)
        directory, built, _ = prepare_run(load_run_config(sys.argv[1:] if argv is None else argv))
    # A CLI: the table for the user, the directory last so that scripts can take it with `tail -n 1`.
    print(DatasetStats.load(directory).summary())  # noqa: T201
    print("built" if built else "reused (already prepared)")  # noqa: T201
    print(directory.resolve())  # noqa: T201


if __name__ == "__main__":
    main()
