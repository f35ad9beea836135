"""LLaMA-Factory's `tool_call` content parts: each is one of the assistant turn's function calls, as JSON text."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.schema import to_canonical
from data_pipeline.sources import DataFormatError

CALL = '{"name": "get_weather", "arguments": {"city": "Lyon"}}'


def assistant(*parts: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Weather in Lyon and Oslo?"}]},
            {"role": "assistant", "content": list(parts)},
            {"role": "tool", "content": [{"type": "text", "value": "clear, snow"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "Clear in Lyon, snow in Oslo."}]},
        ]
    }


def test_tool_call_parts_become_the_turns_calls_beside_its_reasoning() -> None:
    record = assistant(
        {"type": "reasoning", "value": "Two cities: two calls."},
        {"type": "tool_call", "value": CALL},
        {"type": "tool_call", "value": CALL.replace("Lyon", "Oslo")},
    )
    canonical, _ = to_canonical(record, Path("demo.jsonl"), 3)
    turn = canonical["messages"][1]
    assert turn["content"] == "" and turn["reasoning_content"] == "Two cities: two calls."
    assert [call["function"] for call in turn["tool_calls"]] == [
        {"name": "get_weather", "arguments": {"city": "Lyon"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
    ]


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        ({"type": "tool_call", "value": "{oops"}, r"messages\[1\]\.content\[0\]: the tool call is not valid JSON"),
        ({"type": "tool_call", "value": '{"arguments": {}}'}, r"messages\[1\]\.tool_calls\[0\] needs a function"),
    ],
)
def test_a_bad_tool_call_part_is_refused_with_its_place(part: dict, problem: str) -> None:
    with pytest.raises(DataFormatError, match=rf"^demo\.jsonl:3: {problem}") as refused:
        to_canonical(assistant(part), Path("demo.jsonl"), 3)
    assert refused.value.reason == "bad_tool_calls"


def test_a_tool_call_part_in_a_user_turn_is_not_a_call() -> None:
    record = assistant({"type": "text", "value": "Looking."})
    record["messages"][0]["content"].append({"type": "tool_call", "value": CALL})
    with pytest.raises(DataFormatError, match=r"messages\[0\]\.content\[1\]: only an assistant turn has tool calls"):
        to_canonical(record, Path("demo.jsonl"), 3)
