"""The process edges of a run: the launcher's flags in; a clean exit out, one line for a user's error."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


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


def init_deepspeed_distributed(timeout: timedelta | None = None) -> None:
    """`deepspeed.init_distributed`, then the name of this rank's shared-memory all-reduce buffer removed.

    With every rank on one machine and CPU tensors, DeepSpeed's all-reduce runs through a 67 MB POSIX shared-memory
    segment per rank, `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, which it never
    unlinks (`csrc/cpu/comm/shm.cpp`: nothing calls its `shared_close`), so each run left 67 MB of RAM per rank in
    /dev/shm until a reboot: 19 GB on a test machine after a day of runs, until the kernel killed a job for memory.
    Every rank maps every other's segment inside `init_distributed`; after a barrier each rank unlinks its own name.
    The mappings stay valid, and the memory is freed when the last rank exits, however it exits.
    """
    import deepspeed  # seconds to import: kept out of the commands that import this module for the exit helpers

    if timeout is None:
        deepspeed.init_distributed()  # DeepSpeed's default timeout
    else:
        deepspeed.init_distributed(timeout=timeout)
    if not dist.is_initialized():
        return
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce buffer of `rank` of this launch lives while it is named."""
    master = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{master}_{rank}"


def teardown() -> None:
    """Barrier then destroy: exiting without it aborted about one run in twelve (see shared FACTS)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


USER_ERROR_EXIT = 2


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Around the steps that read what the user gave (config, paths, data): their errors end the run with one
    `ERROR` line and exit status 2, not a traceback. `HYDRA_FULL_ERROR=1` keeps the traceback, as for Hydra's own."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if logging.getLogger().handlers:  # the console and the rank's log file
            logging.getLogger("train").error("%s", e)
        else:  # before logging is set up
            print(f"error: {e}", file=sys.stderr)  # noqa: T201
        sys.exit(USER_ERROR_EXIT)
