"""Bad input never passes silently, and every supported format mixes into one run.

The malformed corpus holds one kind of bad record per line after a good one: under `data.on_error=raise` each
kind stops with its file and line, under `skip` each is counted under its reason and kept + dropped = read.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from data_pipeline.prepare import build_datasets, load_canonical
from data_pipeline.sources import DataFormatError
from dft.loss import IGNORE_INDEX

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
USER, REPLY = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


def chat(*messages: dict, **extra: object) -> bytes:
    return json.dumps({"messages": list(messages), **extra}).encode()


BAD_RECORDS = [
    ("invalid_json", b'{"messages": [{"role": "user"'),
    ("invalid_utf8", b'{"messages": "caf\xe9"}'),
    ("not_an_object", b"[1, 2]"),
    ("unknown_format", b'{"text": "just text"}'),
    ("missing_messages", b'{"messages": []}'),
    ("bad_message", chat("hello", REPLY)),
    ("unknown_role", chat({"role": "robot", "content": "x"}, REPLY)),
    ("unknown_role", json.dumps({"conversations": [{"from": "alien", "value": "x"}]}).encode()),
    ("bad_content", chat({"role": "user", "content": {"nested": 1}}, REPLY)),
    ("bad_content", chat({"role": "user", "content": None}, REPLY)),
    ("non_text_part", chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, REPLY)),
    ("no_assistant", chat(USER)),
    ("wrong_turn_order", chat(USER, USER, REPLY)),
    ("wrong_turn_order", chat(USER, REPLY, {"role": "tool", "content": "42"}, REPLY)),
    ("system_not_first", chat(USER, {"role": "system", "content": "s"}, REPLY)),
    ("ends_without_reply", chat(USER, REPLY, USER)),
    ("empty_assistant", chat(USER, {"role": "assistant", "content": "  "})),
    ("bad_tool_calls", chat(USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]})),
    (
        "bad_tool_calls",
        chat(USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}),
    ),
    ("bad_tools", chat(USER, REPLY, tools="not json")),
    ("bad_message", chat(USER, {"role": "assistant", "content": "a", "loss": "no"})),
]


def test_the_corpus_has_at_least_15_kinds() -> None:
    assert len({reason for reason, _ in BAD_RECORDS}) >= 15


@pytest.mark.parametrize(("reason", "line"), BAD_RECORDS, ids=[f"{i}-{r}" for i, (r, _) in enumerate(BAD_RECORDS)])
def test_each_bad_record_raises_with_its_file_and_line(tmp_path: Path, reason: str, line: bytes) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")
    with pytest.raises(DataFormatError, match=rf"^{path}:3: ") as error:
        load_canonical([str(path)], on_error="raise")
    assert error.value.reason == reason and error.value.line == 3


def test_skip_counts_every_bad_record_under_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([json.dumps(GOOD).encode()] + [line for _, line in BAD_RECORDS]))
    records, stats = load_canonical([str(path)], on_error="skip")
    source = stats.sources[str(path)]
    expected: dict[str, int] = {}
    for reason, _ in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    assert len(records) == 1 and source.records == len(BAD_RECORDS) + 1
    assert source.dropped == expected


def test_a_broken_json_array_stops_even_under_skip(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n {"instruction": "i", "output": "o"},\n {"instruction": \n]')
    with pytest.raises(DataFormatError, match=r"a.json:3: invalid JSON .* even under data.on_error=skip"):
        load_canonical([str(path)], on_error="skip")


def write_mixed_corpus(directory: Path) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    array = [
        {"instruction": "Reverse.", "input": "a b", "output": "b a", "system": "Be terse.", "history": [["Hi", "Yo"]]},
        {"prompt": "2+2?", "completion": "4", "id": 1},
        {"instruction": "Say ok.", "output": "ok", "meta": {"lang": "en"}},
    ]
    (directory / "alpaca_and_pc.json").write_text(json.dumps(array, indent=1))
    lines = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "score": 3},
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
                {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "value": "two"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "joined"}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "1+2?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "3", "tool_call_id": "c1"},
                {"role": "assistant", "content": "3"},
            ],
            "tools": tools,
        },
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "not trained", "loss": 0},
                {"from": "human", "value": "1+2?"},
                {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1}})},
                {"from": "observation", "value": "3"},
                {"from": "gpt", "value": "trained"},
            ],
            "tools": json.dumps(tools),
        },
    ]
    (directory / "chats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (directory / "more.jsonl.gz").write_bytes(gzip.compress((json.dumps(lines[0]) + "\n").encode()))


def test_every_format_mixes_into_one_run(tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    write_mixed_corpus(tmp_path)
    train, validation, stats = build_datasets([str(tmp_path)], chatml_tokenizer, 256, 1, 0.0, seed=0)
    assert validation is None and len(train) == stats.train_samples == 8
    assert [Path(name).name for name in stats.sources] == ["alpaca_and_pc.json", "chats.jsonl", "more.jsonl.gz"]
    for source in stats.sources.values():
        assert source.kept == source.records and not source.dropped
    assert stats.sources[str(tmp_path / "chats.jsonl")].dropped_columns == {"score": 1}
    assert stats.sources[str(tmp_path / "alpaca_and_pc.json")].dropped_columns == {"id": 1, "meta": 1}
    trained = [chatml_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in train["labels"]]
    assert "Yob a" in "".join(trained).replace("<|im_end|>", "")
    sharegpt = next(text for text in trained if "trained" in text)
    assert "not trained" not in sharegpt and sharegpt.endswith("trained<|im_end|>")
    assert any(text.startswith("joined") for text in trained)
    summary = stats.summary()
    assert "chats.jsonl" in summary and "columns ignored" in summary and "train samples: 8" in summary


def test_a_dialogue_with_no_trained_turn_is_dropped_and_counted(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = tmp_path / "c.jsonl"
    unflagged = {"messages": [USER, REPLY]}
    flagged = {"messages": [USER, {**REPLY, "train": False}]}
    path.write_text(json.dumps(unflagged) + "\n" + json.dumps(flagged) + "\n")
    train, _, stats = build_datasets([str(path)], chatml_tokenizer, 64, 1, 0.0, seed=0, on_error="skip")
    assert len(train) == 1 and stats.sources[str(path)].dropped == {"no_trainable_tokens": 1}
