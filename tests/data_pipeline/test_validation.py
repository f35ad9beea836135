"""Bad input never passes silently, and every supported format mixes into one run.

The malformed corpus holds one kind of bad record per line after a good one: under `data.on_error=raise` each
kind stops with its file and line, under `skip` each is counted under its reason and kept + dropped = read.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from config.sources import parse_sources
from core.keys import IGNORE_INDEX
from data_pipeline.prepare import build_datasets, load_canonical
from data_pipeline.sources import DataFormatError
from tests.helpers import QWEN_STYLE_TOOLS_TEMPLATE, data_config, write_mixed_corpus

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
        load_canonical(parse_sources([str(path)]), on_error="raise")
    assert error.value.reason == reason and error.value.line == 3


def test_skip_counts_every_bad_record_under_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([json.dumps(GOOD).encode()] + [line for _, line in BAD_RECORDS]))
    records, stats = load_canonical(parse_sources([str(path)]), on_error="skip")
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
        load_canonical(parse_sources([str(path)]), on_error="skip")


def test_every_format_mixes_into_one_run(tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    write_mixed_corpus(tmp_path)
    data = data_config([str(tmp_path)], max_length=256, num_proc=1, validation_split_percentage=0.0)
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = QWEN_STYLE_TOOLS_TEMPLATE  # renders the corpus' tool calls
    train, validation, stats = build_datasets(data, tokenizer, seed=0)
    assert validation is None and len(train) == stats.train_samples == 8
    assert [Path(name).name for name in stats.sources] == ["alpaca_and_pc.json", "chats.jsonl", "more.jsonl.gz"]
    for source in stats.sources.values():
        assert source.kept == source.records and not source.dropped
    assert stats.sources[str(tmp_path / "chats.jsonl")].dropped_columns == {"score": 1}
    assert stats.sources[str(tmp_path / "alpaca_and_pc.json")].dropped_columns == {"id": 1, "meta": 1}
    trained = [tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in train["labels"]]
    assert "Yob a" in "".join(trained).replace("<|im_end|>", "")
    sharegpt = next(text for text in trained if "trained" in text)
    assert "not trained" not in sharegpt and sharegpt.endswith("trained<|im_end|>")
    assert any(text.startswith("joined") for text in trained)
    summary = stats.summary()
    assert "chats.jsonl" in summary and "columns ignored" in summary and "train samples: 8" in summary


def test_tool_calls_a_template_does_not_render_are_refused_or_skipped_and_counted(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    # The embedded ChatML template writes no tool calls: its two records with calls would train an empty turn.
    write_mixed_corpus(tmp_path)
    chats = tmp_path / "chats.jsonl"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(chats))}:3: messages\[1\]: the chat template does not "):
        build_datasets(data_config([str(chats)], num_proc=1), chatml_tokenizer, seed=0)
    data = data_config([str(chats)], num_proc=1, validation_split_percentage=0.0, on_error="skip")
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    assert stats.sources[str(chats)].dropped == {"tool_calls_not_rendered": 2}
    assert len(train) == stats.sources[str(chats)].kept == 2


def test_a_dialogue_with_no_trained_turn_is_dropped_and_counted(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = tmp_path / "c.jsonl"
    unflagged = {"messages": [USER, REPLY]}
    flagged = {"messages": [USER, {**REPLY, "train": False}]}
    path.write_text(json.dumps(unflagged) + "\n" + json.dumps(flagged) + "\n")
    data = data_config([str(path)], max_length=64, num_proc=1, validation_split_percentage=0.0, on_error="skip")
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    assert len(train) == 1 and stats.sources[str(path)].dropped == {"no_trainable_tokens": 1}
