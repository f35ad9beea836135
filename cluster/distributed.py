"""The process edges of a run: the launcher's flags in; a clean exit out, one line for a user's error."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

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
