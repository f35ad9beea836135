"""The prepared-dataset cache key: what `<cache_dir>/<fingerprint>/` is named after.

A prepared dataset lives in `<cache_dir>/<fingerprint>/`. The fingerprint hashes everything that changes the
result: `DATASET_CACHE_VERSION`, the bytes (not the dates) of every source file with its path and source
options, the tokenizer (its full serialised pipeline or vocabulary, special tokens and chat template), and the
options of `build_datasets`. Worker counts do not change the result and are left out.

`data_pipeline.prepare` builds each fingerprint once (`core.files.build_once`, a file lock per fingerprint): on a
multi-rank launch one process builds while the others wait on the lock (no collective call, so no distributed
timeout), then all read the same directory; a crashed build never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from config.sources import SourceSpec

# Bump when reading, conversion, tokenisation or the saved layout change what a given input produces.
DATASET_CACHE_VERSION = "sft_chat_v6"
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
    if backend is not None:
        pipeline_json = json.loads(backend.to_str())
        # Call-time state, not the pipeline: a call with padding=True (the held-out pass's batched generation)
        # leaves the backend's padding set, and the same tokenizer would otherwise key another dataset.
        pipeline_json.pop("padding", None)
        pipeline_json.pop("truncation", None)
        pipeline = json.dumps(pipeline_json, sort_keys=True)
    else:
        pipeline = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(tokenizer.all_special_tokens)
    # Several named templates (Hermes, Command-R) are a dict of them.
    template = tokenizer.chat_template
    parts = [type(tokenizer).__name__, pipeline, special, json.dumps(template, sort_keys=True) if template else ""]
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
