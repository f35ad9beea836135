"""Arrow-batch maps across forked worker processes: the conversion and tokenisation steps of `prepare`.

This does what `Dataset.map(function, batched=True, num_proc=N)` does for those two steps, without its pool
machinery: `datasets` pickles each shard of an in-memory table and the function with its arguments (the tokenizer)
to every job, and reports progress through a manager process, which on 2 cores cost a tenth of the preparation
(docs/benchmarks.md). Here the workers are forked after the input and the function are in place, so they inherit
both untouched (copy-on-write; the Arrow buffers are only read), each maps one contiguous share of the rows batch
by batch and streams the resulting tables to its own Arrow file under `datasets`' temporary cache directory (removed
when the process exits, as its own map results are), and the result is those files memory-mapped in order: the
rows keep their order and memory stays bounded by a batch per worker. Progress is a shared row counter that this
process reads: a tqdm bar on a terminal, a log line every `PROGRESS_LOG_SECONDS` otherwise (a `nohup` log).

An exception in a worker stops the others and is raised here as it was raised there (a bad record's
`file:line: problem` keeps its type and text).

Memory-mapped Arrow files are read without copying, but every page a process has read stays in its resident memory
(RSS) for as long as the file is mapped: a pass over a prepared corpus would leave the whole of it resident in
the process that made it. `release_mapped_pages` (called by each worker after each batch, and by the steps of
`prepare` that read rows) hands those pages back with `madvise(MADV_DONTNEED)`: they stay in the kernel's page
cache, and a later read maps them again without I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, concatenate_datasets
from datasets.fingerprint import get_temporary_cache_files_directory
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
# Fewer rows than this per worker are not worth a process.
ROWS_PER_WORKER = 1000
PROGRESS_LOG_SECONDS = 30.0
_POLL_SECONDS = 0.2
_TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"
_MADV_DONTNEED = 4  # Linux's value (asm-generic/mman-common.h)

# What the forked workers inherit: set just before the fork, cleared after.
_job: _Job | None = None


class _Job:
    def __init__(self, dataset: Dataset, function: Callable[[pa.Table], pa.Table], directory: Path) -> None:
        self.dataset = dataset.with_format("arrow")
        self.function = function
        self.directory = directory
        self.rows_done = multiprocessing.Value("q", 0)  # shared memory: the forked workers add, this process reads

    def output_path(self, worker: int) -> Path:
        return self.directory / f"{worker:05d}.arrow"

    def error_path(self, worker: int) -> Path:
        return self.directory / f"{worker:05d}.error"

    def run(self, worker: int, start: int, end: int, rows_done: Callable[[int], None]) -> None:
        """Map rows [start, end) batch by batch into this worker's Arrow stream file, telling `rows_done` the
        rows of each batch written."""
        writer, schema = None, None
        with pa.OSFile(str(self.output_path(worker)), "wb") as sink:
            for begin in range(start, end, BATCH_SIZE):
                stop = min(begin + BATCH_SIZE, end)
                table = self.function(self.dataset[begin:stop])
                if writer is None:
                    writer, schema = pa.ipc.new_stream(sink, table.schema), table.schema
                elif table.schema != schema:
                    # A batch whose column came out all null, say, gets the first batch's types.
                    table = table.cast(schema)
                writer.write_table(table)
                release_mapped_pages()
                rows_done(stop - begin)
            if writer is not None:
                writer.close()

    def count_rows(self, rows: int) -> None:
        with self.rows_done.get_lock():
            self.rows_done.value += rows


def map_arrow_batches(dataset: Dataset, function: Callable[[pa.Table], pa.Table], num_proc: int, desc: str) -> Dataset:
    """`function` over `dataset` in Arrow batches of `BATCH_SIZE` rows, on at most `num_proc` processes (one per
    `ROWS_PER_WORKER` rows; this process alone when that makes one), the results in row order.

    Raises:
        Whatever `function` raised, in whichever worker.
    """
    global _job
    rows = len(dataset)
    if not rows:
        raise ValueError(f"{desc}: no rows to map")
    workers = max(1, min(num_proc, rows // ROWS_PER_WORKER))
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1  # not on Linux clusters; on such a platform one process is slower, not wrong
    directory = Path(tempfile.mkdtemp(prefix="map-", dir=get_temporary_cache_files_directory()))
    job = _job = _Job(dataset, function, directory)
    bounds = [rows * worker // workers for worker in range(workers + 1)]
    progress = _Progress(desc, rows, workers)
    try:
        if workers == 1:
            job.run(0, 0, rows, lambda batch_rows: progress.update(progress.done + batch_rows))
        else:
            _run_forked(job, bounds, progress)
    finally:
        _job = None
        progress.close()
    parts = [Dataset.from_file(str(path)) for path in map(job.output_path, range(workers)) if path.stat().st_size]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def release_mapped_pages() -> None:
    """Drop from this process's resident memory the pages it has read of the memory-mapped Arrow files (`*.arrow`).

    Only read-only file mappings are touched, so nothing is lost: the addresses stay valid, and the next read of a
    page maps it again from the page cache. Without /proc (not Linux) this does nothing.
    """
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            regions = [line.split(maxsplit=5) for line in maps]
        libc = ctypes.CDLL(None, use_errno=True)
        for fields in regions:
            if len(fields) == 6 and fields[5].rstrip("\n").endswith(".arrow") and fields[1].startswith("r-"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _worker_main(worker: int, start: int, end: int) -> None:
    assert _job is not None, "map_arrow_batches forks its workers after setting the job"
    try:
        _job.run(worker, start, end, _job.count_rows)
    except BaseException as error:
        text = "".join(traceback.format_exception(error))
        try:
            payload = pickle.dumps((error, text))
        except Exception:  # an exception that cannot be pickled still reaches the parent as its traceback
            payload = pickle.dumps((RuntimeError(text), text))
        _job.error_path(worker).write_bytes(payload)
        sys.stderr.flush()
        os._exit(1)


def _run_forked(job: _Job, bounds: list[int], progress: _Progress) -> None:
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_worker_main, args=(worker, bounds[worker], bounds[worker + 1]), daemon=True)
        for worker in range(len(bounds) - 1)
    ]
    try:
        with _one_tokenizer_thread_per_worker():
            for process in processes:
                process.start()
        running = list(processes)
        while running and all(process.exitcode in (None, 0) for process in processes):
            multiprocessing.connection.wait([process.sentinel for process in running], timeout=_POLL_SECONDS)
            running = [process for process in running if process.is_alive()]
            progress.update(job.rows_done.value)
        progress.update(job.rows_done.value)
    finally:
        stopped = [process.is_alive() for process in processes]  # by us, below: their exit codes say nothing
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    # A worker's exception, else a worker that died on its own (killed, out of memory).
    for worker in range(len(processes)):
        if job.error_path(worker).exists():
            error, text = pickle.loads(job.error_path(worker).read_bytes())
            logger.debug("Worker %d of %s failed:\n%s", worker, job.directory, text)
            raise error
    for worker, process in enumerate(processes):
        if process.exitcode != 0 and not stopped[worker]:
            raise RuntimeError(
                f"a data preparation worker ({worker + 1} of {len(processes)}) ended with exit code "
                f"{process.exitcode} without an error (killed, out of memory?)"
            )


@contextlib.contextmanager
def _one_tokenizer_thread_per_worker() -> Iterator[None]:
    """N workers each tokenise on one core: the Rust tokenizer's own thread pool in each would oversubscribe the
    cores. Set for the fork only (this process keeps its setting), which also spares each worker the tokenizers
    library's "process just got forked" warning when this process has used its threads already."""
    before = os.environ.get(_TOKENIZERS_PARALLELISM)
    os.environ[_TOKENIZERS_PARALLELISM] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_TOKENIZERS_PARALLELISM]
        else:
            os.environ[_TOKENIZERS_PARALLELISM] = before


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line every `PROGRESS_LOG_SECONDS` and one at the end."""

    def __init__(self, desc: str, total: int, workers: int) -> None:
        self.desc, self.total, self.workers = desc, total, workers
        self.start = self.last_log = time.monotonic()
        self.done = 0
        self.bar: Any = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=f"{desc} ({workers} proc)" if workers > 1 else desc, unit=" rows")

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        elif time.monotonic() - self.last_log >= PROGRESS_LOG_SECONDS:
            self.last_log = time.monotonic()
            self._log(done)
        self.done = done

    def _log(self, done: int) -> None:
        seconds = time.monotonic() - self.start
        logger.info(
            "%s: %s/%s rows (%.0f%%), %d worker%s, %.0f s",
            self.desc,
            f"{done:,}",
            f"{self.total:,}",
            100 * done / max(self.total, 1),
            self.workers,
            "s" if self.workers > 1 else "",
            seconds,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done == self.total and time.monotonic() - self.start >= PROGRESS_LOG_SECONDS:
            self._log(self.done)
