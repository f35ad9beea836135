"""Reading chat files: JSONL or a JSON array, each record with its line number.

Errors name the file and line so a user can open the record: a broken line
in a 2 GB JSONL is found in seconds. Records of a JSON array are located by
the line on which each element starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataFormatError(ValueError):
    """A record that cannot be used, located as `file:line`."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


def check_source_paths(sources: list[str]) -> list[Path]:
    """Every source must exist before anything expensive starts."""
    paths = []
    for index, source in enumerate(sources):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"data.sources[{index}]: no such file {source!r} "
                f"(relative paths start at the launch directory {Path.cwd()})"
            )
        paths.append(path)
    return paths


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, record)` for a JSONL file or a JSON array file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, text_line(path.read_bytes()[: e.start]), f"invalid UTF-8 ({e.reason})") from e
    if text.lstrip().startswith("["):
        yield from _read_json_array(path, text)
    else:
        yield from _read_jsonl(path, text)


def text_line(prefix: bytes | str) -> int:
    return prefix.count(b"\n" if isinstance(prefix, bytes) else "\n") + 1


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, line_number, f"invalid JSON ({e.msg} at column {e.colno})") from e


def _read_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        position = _skip_whitespace(text, position)
        if position >= len(text):
            raise DataFormatError(path, text_line(text[:position]), "JSON array is not closed with ']'")
        if text[position] == "]":
            return
        line_number = text_line(text[:position])
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                path, line_number, f"invalid JSON in the record starting here ({e.msg} at line {e.lineno})"
            ) from e
        yield line_number, record
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == ",":
            position += 1


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
