"""Files that appear whole or not at all: atomic writes and directories built once under a lock.

A reader (a `tail -f`, another rank, a resumed job) never sees half a file or half a directory: each is written
under a temporary name in the same directory, flushed to disk, then renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make the renames inside `path` durable: without it a node crash can undo a rename that already returned."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `path` through a temporary file in its directory, fsync it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def build_once(target: str | Path, build: Callable[[Path], None]) -> bool:
    """Make sure the directory `target` exists, calling `build(temporary_dir)` to create it unless it does.

    Several processes (ranks, or two jobs sharing a cache) may call this at once: one builds under a file lock
    (`<target>.lock`) into a temporary directory beside `target` and renames it into place; the others wait for
    the lock and find it done. A build that fails leaves nothing behind.

    Returns:
        Whether this call built it.
    """
    target = Path(target)
    if target.is_dir():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.with_name(f"{target.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Another process is building %s: waiting for it", target)
        lock.acquire()
    try:
        if target.is_dir():
            return False
        temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            build(temporary)
            os.rename(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    finally:
        lock.release()
    return True
