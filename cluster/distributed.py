"""The process edges of a run: the launcher's flags in; a clean exit out (a user's error: `core.errors`)."""

from __future__ import annotations

import os
import sys
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
