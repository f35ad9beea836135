"""Where records come from: `data.sources` entries, the files they name, and reading those files line by line.

A source entry is checked into a `config.sources.SourceSpec` by the config schema; here its path becomes files:
the file itself, a sorted glob, or a directory's `*.jsonl`, `*.json`, `*.jsonl.gz` and `*.json.gz` files (and, for
a `format: text` source, its `*.txt` and `*.txt.gz` files). Files are JSONL or a JSON array, either of them
optionally gzip-compressed; a UTF-8 BOM is accepted. A `.txt` file (raw text, for continued pre-training) holds
documents as `datasets.load_dataset("text", sample_by=...)` reads it (`data.sample_by`): one per line (the default),
per paragraph (text between blank lines) or the whole file. JSONL files and `.txt` files read by line or paragraph
are streamed: reading holds a record in memory, not the file.

Reading never hides a problem: `iter_records` yields each record with its line number, or a `DataFormatError`
for a line that is not valid UTF-8 or JSON, so the caller either stops on it (`data.on_error=raise`) or counts
it (`skip`). A JSON array that cannot be parsed, or a file that is not valid UTF-8 as a whole array, raises
even under `skip`: the records after the break cannot be counted, and nothing is dropped uncounted. Data
preparation splits reading in two: `iter_raw_records` finds the records' bytes in the preparing process, and
`parse_record` parses each one in a worker.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from config.schema import SAMPLE_BY, SAMPLE_BY_DOCUMENT, SAMPLE_BY_LINE, SAMPLE_BY_PARAGRAPH
from config.sources import TEXT_FORMAT, TEXT_SUFFIXES, SourceSpec

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
UTF8_BOM = b"\xef\xbb\xbf"
# Characters read at a time when splitting a `.txt` file into paragraphs: a paragraph may span chunks.
_TEXT_CHUNK_CHARS = 1 << 20


class DataFormatError(ValueError):
    """A record that cannot be used, located as `file:line`, with a short `reason` used for counting."""

    def __init__(self, path: str | Path, line: int, problem: str, reason: str = "invalid_record") -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem, self.reason = str(path), line, problem, reason


def resolve_files(spec: SourceSpec, index: int) -> list[Path]:
    """The files of one source: the file itself, a sorted glob, or a directory's data files.

    Raises:
        FileNotFoundError: nothing matches, naming `data.sources[i]`.
    """
    path = Path(spec.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        suffixes = DATA_SUFFIXES + TEXT_SUFFIXES if spec.format == TEXT_FORMAT else DATA_SUFFIXES
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if not files:
            raise FileNotFoundError(
                f"data.sources[{index}]: directory {spec.path!r} holds no {'/'.join(suffixes)} file"
                + ("" if spec.format == TEXT_FORMAT else " ({path: <dir>, format: text} reads its .txt files)")
            )
        return files
    if glob.has_magic(spec.path):
        files = sorted(Path(p) for p in glob.glob(spec.path, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data.sources[{index}]: the glob {spec.path!r} matches no file")
        return files
    raise FileNotFoundError(
        f"data.sources[{index}]: no such file {spec.path!r} (relative paths start at the launch directory {Path.cwd()})"
    )


def check_source_paths(specs: list[SourceSpec]) -> list[Path]:
    """Every source must name existing files before anything expensive starts.

    Returns:
        All files, in source order.
    """
    return [file for index, spec in enumerate(specs) for file in resolve_files(spec, index)]


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, record)` for a JSONL or JSON array file (gzip or not).

    A JSONL line that is not valid UTF-8 or JSON is yielded as a `DataFormatError` in place of its record.

    Raises:
        DataFormatError: a JSON array that is broken or not valid UTF-8 (the rest cannot be counted).
    """
    for line_number, raw in iter_raw_records(path):
        try:
            yield line_number, parse_record(path, line_number, raw)
        except DataFormatError as e:
            yield line_number, e


def iter_raw_records(path: Path, sample_by: str = SAMPLE_BY_LINE) -> Iterator[tuple[int, bytes | None]]:
    """Yield `(line_number, JSON bytes)` for each record of a file, unparsed: `parse_record` reads one.

    The bytes of a JSONL line are not checked here, so that the (costly) parsing can run in worker processes; a
    JSON array is parsed here, as its records can only be found by parsing it. A `.txt` file's records are its
    documents as `sample_by` says (`_text_rows`), each at the line where it starts.

    Args:
        path: a JSONL, JSON array or `.txt` file, gzip-compressed or not.
        sample_by: how a `.txt` file becomes documents: `line`, `paragraph` or `document`.

    Yields:
        The line number and bytes of each record. For a `.txt` file a blank row (one that holds whitespace only) is
        yielded with None: `datasets`' text loader gives it as a row, but it holds nothing to train; the caller
        counts it.

    Raises:
        DataFormatError: a JSON array that is broken or not valid UTF-8 (the rest cannot be counted).
    """
    with gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb") as stream:
        if is_text_file(path):
            yield from _text_rows(stream, sample_by)
            return
        lines = enumerate(stream, start=1)
        for line_number, raw in lines:
            if line_number == 1:
                raw = raw.removeprefix(UTF8_BOM)
            if not raw.strip():
                continue
            if raw.lstrip().startswith(b"["):  # the first record opens a JSON array: read it whole
                data = b"\n" * (line_number - 1) + raw + stream.read()
                yield from _json_array_records(path, _decode_array(path, data))
                return
            yield line_number, raw.rstrip(b"\r\n")
            break
        for line_number, raw in lines:
            if raw.strip():
                yield line_number, raw.rstrip(b"\r\n")


def _decode_array(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, text_line(data[: e.start]), f"invalid UTF-8 ({e.reason})", "invalid_utf8") from e


def _text_rows(stream: BinaryIO, sample_by: str) -> Iterator[tuple[int, bytes | None]]:
    """A `.txt` file's documents as `datasets`' text loader reads them (`datasets/packaged_modules/text`), each at
    its first line: `line` gives every line, its line break removed; `paragraph` the text between `\n\n`
    separators, empty ones left out; `document` the whole file. All see universal newlines (`\r\n` and `\r` read
    as `\n`), as the loader's text-mode `open` does; a whitespace-only row is yielded as None. Bytes that are not
    UTF-8 pass through unchanged (`surrogateescape`), for `parse_record` to locate."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=None)

    def row(line_number: int, content: str) -> tuple[int, bytes | None]:
        return line_number, content.encode("utf-8", "surrogateescape") if content.strip() else None

    if sample_by == SAMPLE_BY_DOCUMENT:
        yield row(1, text.read())
        return
    if sample_by == SAMPLE_BY_LINE:
        for line_number, line in enumerate(text, start=1):
            yield row(line_number, line.removesuffix("\n"))
        return
    if sample_by != SAMPLE_BY_PARAGRAPH:
        raise ValueError(f"data.sample_by={sample_by!r} is not one of {list(SAMPLE_BY)}")
    line_number, rest = 1, ""
    while chunk := text.read(_TEXT_CHUNK_CHARS):
        *paragraphs, rest = (rest + chunk + text.readline()).split("\n\n")
        for paragraph in paragraphs:
            if paragraph:
                yield row(line_number, paragraph)
            line_number += paragraph.count("\n") + 2
    if rest:
        yield row(line_number, rest)


def parse_record(path: str | Path, line_number: int, raw: bytes) -> Any:
    """The JSON value of one record from `iter_raw_records`; a `.txt` file's text as a str.

    Raises:
        DataFormatError: the bytes are not valid UTF-8 or not valid JSON, located at `path:line_number`.
    """
    if is_text_file(path):
        return decode_text_file(path, raw, line_number)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, line_number, f"invalid UTF-8 ({e.reason})", "invalid_utf8") from e
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, line_number, f"invalid JSON ({e.msg} at column {e.colno})", "invalid_json") from e


def is_text_file(path: str | Path) -> bool:
    """A raw-text file (`.txt`, `.txt.gz`): documents (`data.sample_by`), not JSON."""
    return str(path).endswith(TEXT_SUFFIXES)


def decode_text_file(path: str | Path, raw: bytes, first_line: int = 1) -> str:
    """The text of a `.txt` document's bytes, the document starting at line `first_line` of its file.

    Raises:
        DataFormatError: not valid UTF-8, located at the line of the first bad byte.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + text_line(raw[: e.start]) - 1
        raise DataFormatError(path, line, f"invalid UTF-8 ({e.reason})", "invalid_utf8") from e


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """`iter_records` that raises on the first unreadable line."""
    for line_number, record in iter_records(path):
        if isinstance(record, DataFormatError):
            raise record
        yield line_number, record


def text_line(prefix: bytes | str) -> int:
    """The 1-based line number at the end of `prefix`."""
    return prefix.count(b"\n" if isinstance(prefix, bytes) else "\n") + 1


def _json_array_records(path: Path, text: str) -> Iterator[tuple[int, bytes]]:
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line_number, counted_to = 1, 0
    while True:
        position = _skip_whitespace(text, position)
        if position >= len(text):
            raise DataFormatError(path, text_line(text[:position]), "JSON array is not closed with ']'", "invalid_json")
        if text[position] == "]":
            return
        # Counted from the previous record on: a count from the start would make a large array quadratic.
        line_number += text.count("\n", counted_to, position)
        counted_to = position
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                path,
                line_number,
                f"invalid JSON in the record starting here ({e.msg} at line {e.lineno}); "
                "the rest of the array cannot be read, so this stops even under data.on_error=skip",
                "invalid_json",
            ) from e
        yield line_number, text[position:end].encode("utf-8")
        position = _skip_whitespace(text, end)
        if position < len(text) and text[position] == ",":
            position += 1


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
