"""The process-group edges of a run: the launcher's flags in, a clean exit out."""

from __future__ import annotations

import os
import sys

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


def teardown() -> None:
    """Barrier then destroy: exiting without it aborted about one run in twelve (see shared FACTS)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
