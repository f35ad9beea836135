"""A user's mistake at the command line ends the run with one line, not a traceback.

`train.py`, `python -m data_pipeline.prepare` and `python -m data_pipeline.inspect` read what the user gave (config,
paths, data, the chat template) inside `exit_on_user_error`: the `ValueError` or `FileNotFoundError` that says what
is wrong and the fix is printed as one `ERROR` line and the process exits with `USER_ERROR_EXIT`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

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
