"""The prepared-dataset cache: its fingerprint, and one builder per fingerprint at a time.

A prepared dataset lives in `<cache_dir>/<fingerprint>/`. The fingerprint hashes everything that changes the
result: `DATASET_CACHE_VERSION`, the bytes (not the dates) of every source file with its path and source
options, the tokenizer (its full serialised pipeline or vocabulary, special tokens and chat template), and the
options of `build_datasets`. Worker counts do not change the result and are left out.

`cached_build` takes a file lock per fingerprint: on a multi-rank launch one process builds while the others
wait on the lock (no collective call, so no distributed timeout), then all read the same directory. The build
writes into a temporary directory renamed into place, so a crashed build never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from transformers import PreTrainedTokenizerBase

from data_pipeline.sources import SourceSpec

logger = logging.getLogger(__name__)

# Bump when reading, conversion, tokenisation or the saved layout change what a given input produces.
DATASET_CACHE_VERSION = "sft_chat_v4"
_HASH_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides the token ids: the tokenizer pipeline (or vocabulary), special tokens, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(tokenizer.all_special_tokens)
    parts = [type(tokenizer).__name__, pipeline, special, tokenizer.chat_template or ""]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def dataset_fingerprint(
    sources: list[tuple[SourceSpec, list[Path]]], tokenizer: PreTrainedTokenizerBase, options: dict[str, Any]
) -> str:
    """The cache key of a prepared dataset.

    Args:
        sources: every source with its resolved files.
        tokenizer: the tokenizer, template included.
        options: every other option that changes the result (max length, split, seed, error policy).
    """
    key = {
        "version": DATASET_CACHE_VERSION,
        "sources": [
            {**spec.as_key(), "files": [[str(path), file_digest(path)] for path in files]} for spec, files in sources
        ],
        "tokenizer": tokenizer_digest(tokenizer),
        "options": options,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def cached_build(cache_dir: str | Path, fingerprint: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return `<cache_dir>/<fingerprint>`, calling `build(temporary_dir)` first unless it exists.

    Returns:
        The directory and whether this call built it.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / fingerprint
    if target.is_dir():
        return target, False
    lock = FileLock(str(cache_dir / f"{fingerprint}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Another process is preparing %s: waiting for it", target)
        lock.acquire()
    try:
        if target.is_dir():
            return target, False
        temporary = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{fingerprint}.tmp-"))
        try:
            build(temporary)
            os.rename(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    finally:
        lock.release()
    return target, True
