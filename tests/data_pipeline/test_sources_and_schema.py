"""Reading files and converting every supported schema, with file:line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.prepare import load_canonical
from data_pipeline.schema import to_canonical
from data_pipeline.sources import DataFormatError, check_source_paths, read_records


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_json_array_give_line_numbers(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "a.jsonl", '{"x": 1}\n\n{"x": 2}\n')
    array = write(tmp_path / "b.json", '[\n  {"x": 1},\n  {"x": 2,\n   "y": 3}\n]\n')
    assert list(read_records(jsonl)) == [(1, {"x": 1}), (3, {"x": 2})]
    assert list(read_records(array)) == [(2, {"x": 1}), (3, {"x": 2, "y": 3})]


def test_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"x": 1}\n')
    assert list(read_records(path)) == [(1, {"x": 1})]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('{"x": 1}\n{"x": \n', 2, "invalid JSON"),
        ('[\n {"x": 1},\n {"x": 2\n', 3, "invalid JSON"),
        ('[\n {"x": 1},\n', 3, "not closed"),
    ],
)
def test_broken_json_names_file_and_line(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(DataFormatError) as error:
        list(read_records(path))
    assert error.value.line == line and problem in str(error.value) and str(path) in str(error.value)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"x": 1}\n{"x": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: invalid UTF-8"):
        list(read_records(path))


def test_missing_source_names_index_and_path() -> None:
    with pytest.raises(FileNotFoundError, match=r"data.sources\[1\]: no such file 'missing.jsonl'"):
        check_source_paths([__file__, "missing.jsonl"])


EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]


@pytest.mark.parametrize(
    "record",
    [
        {"messages": EXPECTED, "id": 7},
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]
        },
        {"system": "Be brief.", "instruction": "Hi", "input": "", "output": "Hello"},
    ],
    ids=["chatml", "sharegpt", "alpaca"],
)
def test_every_schema_becomes_the_canonical_messages(record: dict) -> None:
    canonical = to_canonical(record, Path("f.jsonl"), 4)
    assert canonical["messages"] == EXPECTED
    assert canonical["source"] == "f.jsonl"


def test_alpaca_input_joins_the_instruction() -> None:
    canonical = to_canonical({"instruction": "Reverse.", "input": "a b", "output": "b a"}, Path("f"), 1)
    assert canonical["messages"][0] == {"role": "user", "content": "Reverse.\na b"}


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"text": "hi"}, "unknown record format"),
        ([1, 2], "unknown record format"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"content": "x"}]}, "has no 'role'"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]},
            "system message may only come first",
        ),
    ],
)
def test_bad_records_raise_with_file_and_line(record: object, problem: str) -> None:
    with pytest.raises(DataFormatError, match=rf"chats.jsonl:12: .*{problem}"):
        to_canonical(record, Path("chats.jsonl"), 12)


def test_load_canonical_counts_records_per_source(tmp_path: Path) -> None:
    chat = write(tmp_path / "c.jsonl", "".join(json.dumps({"messages": EXPECTED}) + "\n" for _ in range(3)))
    alpaca = write(tmp_path / "a.json", json.dumps([{"instruction": "i", "output": "o"}] * 2))
    records, stats = load_canonical([str(chat), str(alpaca)])
    assert len(records) == 5
    assert stats.sources[str(chat)].records == 3 and stats.sources[str(alpaca)].records == 2
