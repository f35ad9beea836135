"""The canonical chat schema and the conversions into it.

Every record, whatever tool wrote it, becomes `{"messages": [{"role", "content"}, ...],
"source": <file>}` with roles `system`, `user`, `assistant`. Detected per record:

- ChatML / OpenAI: `{"messages": [{"role": ..., "content": ...}]}`
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`
- Alpaca: `{"instruction": ..., "input": ..., "output": ...}` (+ optional `system`)

A record that fits none, or breaks the turn structure, raises `DataFormatError`
with its file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.sources import DataFormatError

MESSAGES_KEY = "messages"
SOURCE_KEY = "source"
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

Message = dict[str, str]


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if MESSAGES_KEY in record:
        return "chatml"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def to_canonical(record: Any, path: Path, line: int) -> dict[str, Any]:
    """Convert one record of any supported format and check its turn structure."""
    record_format = detect_format(record)
    if record_format == "chatml":
        messages = _from_chatml(record[MESSAGES_KEY], path, line)
    elif record_format == "sharegpt":
        messages = _from_sharegpt(record["conversations"], path, line)
    elif record_format == "alpaca":
        messages = _from_alpaca(record, path, line)
    else:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataFormatError(
            path, line, f"unknown record format (keys {keys}); expected 'messages', 'conversations' or Alpaca keys"
        )
    _check_turns(messages, path, line)
    return {MESSAGES_KEY: messages, SOURCE_KEY: str(path)}


def _text(value: Any, path: Path, line: int, where: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(path, line, f"{where}: content must be a string, got {type(value).__name__}")
    return value


def _from_chatml(messages: Any, path: Path, line: int) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(path, line, "'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise DataFormatError(path, line, f"messages[{i}] has no 'role'")
        out.append({"role": message["role"], "content": _text(message.get("content"), path, line, f"messages[{i}]")})
    return out


def _from_sharegpt(turns: Any, path: Path, line: int) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(path, line, "'conversations' must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise DataFormatError(path, line, f"conversations[{i}]: unknown speaker {speaker!r}")
        out.append(
            {"role": SHAREGPT_ROLES[speaker], "content": _text(turn.get("value"), path, line, f"conversations[{i}]")}
        )
    return out


def _from_alpaca(record: dict[str, Any], path: Path, line: int) -> list[Message]:
    instruction = _text(record["instruction"], path, line, "instruction")
    extra_input = record.get("input") or ""
    prompt = f"{instruction}\n{_text(extra_input, path, line, 'input')}" if extra_input else instruction
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], path, line, "system")})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(record["output"], path, line, "output")})
    return messages


def _check_turns(messages: list[Message], path: Path, line: int) -> None:
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise DataFormatError(path, line, f"messages[{i}]: unknown role {message['role']!r}; expected {ROLES}")
        if message["role"] == "system" and i != 0:
            raise DataFormatError(path, line, f"messages[{i}]: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(path, line, "no assistant message: nothing to train on")
