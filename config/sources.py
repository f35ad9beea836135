"""`data.sources` entries, checked: what the config schema validates and the data pipeline reads.

A source entry is a path, a glob, a directory (its `*.jsonl`, `*.json`, `*.jsonl.gz` and `*.json.gz` files,
sorted; with `format: text` its `*.txt` and `*.txt.gz` files too), or a mapping `{path, weight, max_samples, format,
fields}`; `parse_sources` checks each one into a `SourceSpec` and names `data.sources[i]` in every error. A `.txt`
path with `format: auto` reads as `text` (raw text, for continued pre-training).
Finding and reading the files is `data_pipeline.sources`' concern.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `text`: raw text for continued pre-training (`training.objective=pretrain`); `pairs`: preference pairs, a prompt
# with a chosen and a rejected reply (`training.objective=reward|dpo`, layout detected per record); every other
# one a chat format.
TEXT_FORMAT = "text"
PAIRS_FORMAT = "pairs"
FORMATS = ("auto", "chatml", "sharegpt", "alpaca", "prompt_completion", TEXT_FORMAT, PAIRS_FORMAT)
# Files that hold one raw-text document each.
TEXT_SUFFIXES = (".txt", ".txt.gz")
# The record keys a `fields` mapping may rename to, i.e. the canonical column names of every format.
CANONICAL_FIELDS = (
    "messages",
    "tools",
    "conversations",
    "system",
    "instruction",
    "input",
    "output",
    "history",
    "prompt",
    "completion",
    "text",
    "question",
    "chosen",
    "rejected",
)
ON_ERROR_CHOICES = ("raise", "skip")
SOURCE_KEYS = ("path", "weight", "max_samples", "format", "fields")


@dataclass(frozen=True)
class SourceSpec:
    """One checked `data.sources` entry.

    Attributes:
        path: a file, a glob or a directory.
        weight: sampling weight; 2.5 keeps every record twice plus a seeded half of them once more, 0.5 keeps a
            seeded half. Deterministic with the seed.
        max_samples: keep at most this many valid records (the first ones, in file order) before weighting.
        format: `auto` detects the chat format per record; any other value of `FORMATS` forces it; `text` reads raw
            text (a `.txt` file is one document, a JSONL/JSON record's `text` field is one).
        fields: canonical column name -> the column name used by this source, e.g. `{"messages": "dialog"}`.
    """

    path: str
    weight: float = 1.0
    max_samples: int | None = None
    format: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)

    def as_key(self) -> dict[str, Any]:
        """Everything that changes what this source contributes, for the cache fingerprint."""
        return {
            "weight": self.weight,
            "max_samples": self.max_samples,
            "format": self.format,
            "fields": dict(sorted(self.fields.items())),
        }


def parse_sources(entries: list[Any]) -> list[SourceSpec]:
    """Check every `data.sources` entry and normalise it into a `SourceSpec`.

    Raises:
        ValueError: an entry of the wrong type or with a bad option, naming `data.sources[i]`.
    """
    return [_parse_source(index, entry) for index, entry in enumerate(entries)]


def _parse_source(index: int, entry: Any) -> SourceSpec:
    where = f"data.sources[{index}]"
    if isinstance(entry, (str, Path)):
        entry = {"path": str(entry)}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a path or a mapping with 'path', got {type(entry).__name__}")
    entry = dict(entry)
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {list(SOURCE_KEYS)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}.path: a file, glob or directory is required, got {path!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}.weight={weight!r} must be a number > 0 (remove the source to drop it)")
    max_samples = entry.get("max_samples")
    if max_samples is not None and (type(max_samples) is not int or max_samples < 1):
        raise ValueError(f"{where}.max_samples={max_samples!r} must be an integer >= 1 or null")
    record_format = entry.get("format") or "auto"
    if record_format not in FORMATS:
        raise ValueError(f"{where}.format={record_format!r} is not one of {list(FORMATS)}")
    if record_format == "auto" and path.endswith(TEXT_SUFFIXES):
        record_format = TEXT_FORMAT
    fields = entry.get("fields") or {}
    if not isinstance(fields, Mapping):
        raise ValueError(f"{where}.fields: expected a mapping canonical name -> column name, got {fields!r}")
    fields = dict(fields)
    for canonical, column in fields.items():
        if canonical not in CANONICAL_FIELDS:
            raise ValueError(f"{where}.fields: {canonical!r} is not a canonical field; use one of {CANONICAL_FIELDS}")
        if canonical == "text" and record_format != TEXT_FORMAT:
            raise ValueError(f"{where}.fields.text: raw text only (format: text, or training.objective=pretrain)")
        if not isinstance(column, str) or not column:
            raise ValueError(f"{where}.fields.{canonical}: the source column name must be a string, got {column!r}")
    return SourceSpec(path, float(weight), max_samples, record_format, fields)
