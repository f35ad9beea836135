"""LLaMA-Factory's record formats: `tool_call` content parts (each one of the assistant turn's function calls, as
JSON text) and the v1 format's per-message `loss_weight`. Its demo files are prepared in test_template_outcomes.py."""

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


def test_a_v1_loss_weight_of_zero_leaves_the_turn_untrained() -> None:
    # LLaMA-Factory's v1_sft_demo.jsonl weights each message; 0 keeps a turn as context only.
    turns = [
        ("user", 0.0, "hi"),
        ("assistant", 0.0, "Hello."),
        ("user", 0.0, "Who are you?"),
        ("assistant", 1.0, "A bot."),
    ]
    record = {
        "messages": [
            {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": weight}
            for role, weight, text in turns
        ]
    }
    canonical, dropped = to_canonical(record, Path("v1_sft_demo.jsonl"), 1)
    assert [message.get("train", True) for message in canonical["messages"]] == [True, False, True, True]
    assert dropped == []
