"""data_pipeline.parallel: the forked Arrow-batch map gives the rows a single process gives, in order, raises a
worker's exception as it was raised, leaves no worker behind, and shows progress in a log without a terminal."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

import data_pipeline.parallel as parallel
from data_pipeline.parallel import BATCH_SIZE, map_arrow_batches
from data_pipeline.prepare import build_datasets
from tests.helpers import SAMPLE_SOURCES, data_config

ROWS = 3 * BATCH_SIZE + 517  # shares that do not fall on batch boundaries


def _rows(count: int = ROWS) -> Dataset:
    return Dataset.from_dict({"value": list(range(count)), "text": [f"row {i}" for i in range(count)]})


def _squares_with_pid(batch: pa.Table) -> pa.Table:
    values = batch.column("value")
    return pa.table(
        {
            "value": values,
            "square": pc.multiply(values, values),
            # Which process mapped the row, and a column that is all null in some batches (cast to the first's type).
            "pid": pa.array([os.getpid()] * len(batch), pa.int64()),
            "note": pa.array([None if v % 2000 >= 1000 else "x" for v in values.to_pylist()]),
        }
    )


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_rows_come_back_in_order_from_every_worker(num_proc: int) -> None:
    mapped = map_arrow_batches(_rows(), _squares_with_pid, num_proc, "Squaring")
    table = mapped.with_format("arrow")[:]
    assert table.column("value").to_pylist() == list(range(ROWS))
    assert table.column("square").to_pylist() == [v * v for v in range(ROWS)]
    assert table.schema.field("note").type == pa.string()
    pids = set(table.column("pid").to_pylist())
    assert len(pids) == num_proc and (os.getpid() in pids) == (num_proc == 1)
    assert not multiprocessing.active_children()


def test_a_selected_and_shuffled_input_is_mapped_in_its_own_order() -> None:
    order = np.random.default_rng(0).permutation(ROWS)[: ROWS - 100]
    mapped = map_arrow_batches(_rows().select(order), _squares_with_pid, 2, "Squaring")
    assert mapped["value"] == order.tolist()


def test_few_rows_stay_in_this_process() -> None:
    mapped = map_arrow_batches(_rows(1500), _squares_with_pid, 8, "Squaring")
    assert set(mapped["pid"]) == {os.getpid()}


def _fails_at_row(batch: pa.Table, row: int = 2600) -> pa.Table:
    if row in batch.column("value").to_pylist():
        raise ValueError(f"data.jsonl:{row}: a problem with this record")
    return batch


def test_a_worker_exception_is_raised_with_its_type_and_text_and_no_worker_is_left() -> None:
    with pytest.raises(ValueError, match=r"^data\.jsonl:2600: a problem with this record$"):
        map_arrow_batches(_rows(), _fails_at_row, 2, "Checking")
    assert not multiprocessing.active_children()


class _Unpicklable(Exception):
    def __reduce__(self):
        raise pickle.PicklingError("no")


def _raises_unpicklable(batch: pa.Table) -> pa.Table:
    raise _Unpicklable("the tokenizer broke")


def test_an_exception_that_cannot_be_pickled_arrives_as_its_traceback() -> None:
    with pytest.raises(RuntimeError, match="_Unpicklable: the tokenizer broke"):
        map_arrow_batches(_rows(), _raises_unpicklable, 2, "Tokenising")


def _killed(batch: pa.Table) -> pa.Table:
    if 0 in batch.column("value").to_pylist():
        os._exit(9)  # as the kernel's out-of-memory killer would leave it: no exception, no error file
    return batch


def test_a_worker_that_dies_without_an_exception_is_reported() -> None:
    with pytest.raises(RuntimeError, match=r"worker \(1 of 2\) ended with exit code 9"):
        map_arrow_batches(_rows(), _killed, 2, "Tokenising")
    assert not multiprocessing.active_children()


def test_progress_is_logged_without_a_terminal(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(parallel, "PROGRESS_LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger=parallel.__name__):
        map_arrow_batches(_rows(), _squares_with_pid, 2, "Squaring")
    lines = [record.getMessage() for record in caplog.records]
    assert lines and all(line.startswith("Squaring: ") for line in lines)
    assert lines[-1].startswith(f"Squaring: {ROWS:,}/{ROWS:,} rows (100%), 2 workers")


def test_an_empty_input_is_refused() -> None:
    with pytest.raises(ValueError, match="Squaring: no rows"):
        map_arrow_batches(_rows(0), _squares_with_pid, 2, "Squaring")


def test_preparation_gives_the_same_rows_and_report_on_any_worker_count(
    chatml_tokenizer: PreTrainedTokenizerBase,
) -> None:
    prepared = {}
    for num_proc in (1, 3):
        data = data_config(SAMPLE_SOURCES, max_length=96, num_proc=num_proc, validation_split_percentage=5.0)
        train, validation, stats = build_datasets(data, chatml_tokenizer, seed=0)
        prepared[num_proc] = (train.to_dict(), validation.to_dict(), stats.to_dict())
    assert prepared[1] == prepared[3]


def _parallelism_setting(batch: pa.Table) -> pa.Table:
    setting = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    return pa.table({"value": batch.column("value"), "setting": pa.array([setting] * len(batch))})


def test_forked_workers_tokenise_on_one_thread_each_and_this_process_keeps_its_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    mapped = map_arrow_batches(_rows(), _parallelism_setting, 2, "Tokenising")
    assert set(mapped["setting"]) == {"false"}
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    map_arrow_batches(_rows(), _parallelism_setting, 2, "Tokenising")
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def resident_file_mb() -> float:
    """This process's resident pages of mapped files, in MB."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")
def test_the_pages_read_of_a_memory_mapped_arrow_file_are_handed_back_and_still_read(tmp_path) -> None:
    # A memory-mapped file's pages stay in the reading process's RSS: a pass over a prepared corpus left all of it
    # resident. Released, they leave the RSS and the data reads the same (mapped again from the page cache).
    path = tmp_path / "rows.arrow"
    values = np.arange(16 << 20, dtype=np.int64)  # 128 MB
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("x", pa.int64())])) as writer:
        for chunk in np.split(values, 16):
            writer.write_batch(pa.record_batch([pa.array(chunk)], names=["x"]))
    dataset = Dataset.from_file(str(path))
    before = resident_file_mb()
    total = pc.sum(dataset.with_format("arrow")[:]["x"]).as_py()
    read = resident_file_mb()
    assert read - before > 100
    parallel.release_mapped_pages()
    assert resident_file_mb() - before < 20
    assert pc.sum(dataset.with_format("arrow")[:]["x"]).as_py() == total == int(values.sum())
