"""Reading files, resolving `data.sources` entries and converting every supported schema, with file:line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from config.sources import SourceSpec, parse_sources
from data_pipeline.prepare import load_canonical
from data_pipeline.schema import to_canonical
from data_pipeline.sources import DataFormatError, check_source_paths, read_records, resolve_files


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
        check_source_paths(parse_sources([__file__, "missing.jsonl"]))


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
    canonical, _ = to_canonical(record, Path("f.jsonl"), 4)
    assert canonical["messages"] == EXPECTED
    assert canonical["source"] == "f.jsonl"


def test_alpaca_input_joins_the_instruction() -> None:
    canonical, _ = to_canonical({"instruction": "Reverse.", "input": "a b", "output": "b a"}, Path("f"), 1)
    assert canonical["messages"][0] == {"role": "user", "content": "Reverse.\na b"}


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"text": "hi"}, "unknown record format"),
        ([1, 2], "must be a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"content": "x"}]}, "with a 'role'"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
        (
            {"messages": [{"role": "user", "content": {"a": 3}}, {"role": "assistant", "content": "y"}]},
            "must be a string or a list of text parts",
        ),
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
    records, stats = load_canonical(parse_sources([str(chat), str(alpaca)]))
    assert len(records) == 5
    assert stats.sources[str(chat)].records == 3 and stats.sources[str(alpaca)].records == 2


def test_gzip_jsonl_and_json_array(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl.gz"
    jsonl.write_bytes(gzip.compress(b'{"x": 1}\n{"x": 2}\n'))
    array = tmp_path / "b.json.gz"
    array.write_bytes(gzip.compress(b'[{"x": 1},\n {"x": 2}]'))
    assert list(read_records(jsonl)) == [(1, {"x": 1}), (2, {"x": 2})]
    assert list(read_records(array)) == [(1, {"x": 1}), (2, {"x": 2})]


def test_sources_may_be_files_globs_directories_and_mappings(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.json", "c.jsonl.gz", "notes.txt"):
        (tmp_path / name).write_text("[]")
    specs = parse_sources(
        [str(tmp_path / "a.json"), str(tmp_path / "*.jsonl"), str(tmp_path), {"path": str(tmp_path), "weight": 2}]
    )
    assert specs[3] == SourceSpec(path=str(tmp_path), weight=2.0)
    assert resolve_files(specs[1], 1) == [tmp_path / "b.jsonl"]
    assert [p.name for p in resolve_files(specs[2], 2)] == ["a.json", "b.jsonl", "c.jsonl.gz"]
    with pytest.raises(FileNotFoundError, match=r"data.sources\[0\]: the glob .* matches no file"):
        check_source_paths(parse_sources([str(tmp_path / "*.parquet")]))


def test_field_mapping_renames_odd_columns() -> None:
    record = {"question": "Hi", "answer": "Hello", "id": 3}
    canonical, dropped = to_canonical(record, Path("f"), 1, "alpaca", {"instruction": "question", "output": "answer"})
    assert canonical["messages"][-1] == {"role": "assistant", "content": "Hello"} and dropped == ["id"]
    canonical, _ = to_canonical({"dialog": EXPECTED}, Path("f"), 1, "auto", {"messages": "dialog"})
    assert canonical["messages"] == EXPECTED


def test_max_samples_and_weight_are_deterministic_and_counted(tmp_path: Path) -> None:
    chat = write(tmp_path / "c.jsonl", "".join(json.dumps({"messages": EXPECTED, "n": i}) + "\n" for i in range(10)))
    capped, stats = load_canonical(parse_sources([{"path": str(chat), "max_samples": 4, "weight": 2.5}]), seed=1)
    assert len(capped) == 4 and sum(r["copies"] for r in capped) == 10
    assert capped["origin"] == [f"{chat}:{line}" for line in range(1, 5)]  # the first valid records, in order
    assert sorted({r["copies"] for r in capped}) == [2, 3]
    assert stats.sources[str(chat)].dropped == {"max_samples": 6}
    half, stats = load_canonical(parse_sources([{"path": str(chat), "weight": 0.5}]), seed=1)
    again, _ = load_canonical(parse_sources([{"path": str(chat), "weight": 0.5}]), seed=1)
    assert len(half) == 5 and half[:] == again[:] and stats.sources[str(chat)].dropped == {"weight": 5}
    assert stats.sources[str(chat)].dropped_columns == {"n": 10}
