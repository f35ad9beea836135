"""Rank-aware logging: one readable console for many ranks, and every rank's full log in a file.

Rank 0 logs INFO to the console; other ranks log WARNING and above, prefixed
with their rank, so eight ranks do not print eight copies of every line.
Every rank writes its full log to `<output_dir>/logs/rank<N>.log`. Before the
process group exists the rank is read from the launcher's `RANK` variable.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import transformers

from core.ranks import get_rank

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    # Library warnings (FutureWarnings, the Trainer's notes to itself) are not the user's to act on mid-run: every
    # rank keeps them in its own log file, the console shows the run.
    console.addFilter(lambda record: record.name != "py.warnings")
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
    return log_path
