"""Rank-aware logging: one readable console for many ranks, and every rank's full log in a file.

Rank 0 logs INFO to the console; other ranks log WARNING and above, prefixed
with their rank, so eight ranks do not print eight copies of every line.
Every rank writes its full log to `<output_dir>/logs/rank<N>.log`. Before the
process group exists the rank is read from the launcher's `RANK` variable.

Libraries' notes to themselves (Python warnings, DeepSpeed's logger and prints,
accelerate's remark on every DeepSpeed run with gradient accumulation) go to the
rank's file only; their errors still reach the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import transformers

from core.ranks import get_rank

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What `library_prints_to_log` captures is logged under this name.
LIBRARY_PRINTS = "library.prints"
# Loggers whose records below ERROR stay in the rank's file: not the user's to act on mid-run.
FILE_ONLY_LOGGERS = ("py.warnings", "DeepSpeed", LIBRARY_PRINTS)
# Messages of other libraries that say nothing about the user's run. accelerate's: the Trainer hands the
# gradient accumulation to DeepSpeed's config rather than to accelerate's plugin, on every DeepSpeed run.
FILE_ONLY_MESSAGES = ("Gradient accumulation steps mismatch: GradientAccumulationPlugin has",)


def on_console(record: logging.LogRecord) -> bool:
    """The console filter: the run's own records, and every library's errors."""
    if record.levelno >= logging.ERROR:
        return True
    return record.name not in FILE_ONLY_LOGGERS and not record.getMessage().startswith(FILE_ONLY_MESSAGES)


class _LinesToLog(io.TextIOBase):
    """A text stream that logs each complete line it is written."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.pending = ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info("%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.logger.info("%s", self.pending.rstrip())
        self.pending = ""


@contextlib.contextmanager
def library_prints_to_log() -> Iterator[None]:
    """Send what libraries `print` inside the block (DeepSpeed's "op built successfully") to the rank's file."""
    stream = _LinesToLog(logging.getLogger(LIBRARY_PRINTS))
    with contextlib.redirect_stdout(stream):
        yield
    stream.flush()


def setup_logging(output_dir: str | Path) -> Path:
    """Console on rank 0 (warnings elsewhere; Python warnings in the log files only), and a full per-rank file log.
    Returns the file's path."""
    rank = get_rank()
    log_path = Path(output_dir) / "logs" / f"rank{rank}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "" if rank == 0 else f"[rank {rank}] "

    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(prefix + LOG_FORMAT))
    console.addFilter(on_console)
    log_file = logging.FileHandler(log_path, encoding="utf-8")
    log_file.setLevel(logging.INFO)
    log_file.setFormatter(logging.Formatter(LOG_FORMAT))

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(console)
    root.addHandler(log_file)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # transformers logs through its own handler by default; route it through ours instead.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    # DeepSpeed logs to stdout through its own handler (on every rank, in its own format); route it through ours.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for handler in list(deepspeed_logger.handlers):
        deepspeed_logger.removeHandler(handler)
    deepspeed_logger.propagate = True
    return log_path
