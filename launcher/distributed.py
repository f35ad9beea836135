"""Rank-aware logging and the few distributed helpers the entry point needs.

Rank 0 logs INFO to the console; other ranks log WARNING and above, prefixed
with their rank, so eight ranks do not print eight copies of every line.
Every rank writes its full log to `<output_dir>/logs/rank<N>.log`. Before the
process group exists the rank is read from the launcher's `RANK` variable.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist
import transformers

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    return get_rank() == 0


def accept_launcher_local_rank() -> None:
    """Move the deepspeed launcher's `--local_rank=N` into `LOCAL_RANK`: Hydra rejects unknown flags."""
    kept = []
    args = iter(sys.argv[1:])
    for arg in args:
        if arg.startswith("--local_rank="):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        elif arg == "--local_rank":
            os.environ["LOCAL_RANK"] = next(args)
        else:
            kept.append(arg)
    sys.argv[1:] = kept


def setup_logging(output_dir: str | Path) -> Path:
    """Console on rank 0 (warnings elsewhere), and a full per-rank file log. Returns the file's path."""
    rank = get_rank()
    log_path = Path(output_dir) / "logs" / f"rank{rank}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "" if rank == 0 else f"[rank {rank}] "

    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(prefix + LOG_FORMAT))
    if rank != 0:
        # Library warnings (deprecations, ...) are the same on every rank: rank 0 shows them once,
        # the others keep them in their own log file only.
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


def teardown() -> None:
    """Barrier then destroy: exiting without it aborted about one run in twelve (see shared FACTS)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
