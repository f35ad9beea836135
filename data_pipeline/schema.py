"""The canonical chat schema, the conversions into it, and the per-record checks.

Every record, whatever tool wrote it, becomes `{"messages": [...], "tools": [...] (optional), "source": <file>}`.
A message is `{"role", "content": str}` with roles `system`, `user`, `assistant`, `tool`, plus `tool_calls`
(`[{"type": "function", "function": {"name", "arguments": dict}}]`) on an assistant turn, `name`/`tool_call_id`
on a tool turn, and `train: False` on an assistant turn that must not be trained. Formats, detected per record
(or forced by a source's `format`):

- `chatml` (ChatML / OpenAI): `{"messages": [{"role", "content"}], "tools": [...]}`; content is a string or a
  list of text parts `{"type": "text", "text"|"value": ...}`; `developer` reads as `system`, `function` as `tool`.
  An assistant turn's `reasoning` parts are its reasoning and its `tool_call` parts (LLaMA-Factory's format: each
  the JSON text of a call, `{"name", "arguments"}`) its tool calls.
- `sharegpt`: `{"conversations": [{"from", "value"}], "system": ..., "tools": ...}` with speakers human, gpt,
  system, function_call (a JSON tool call by the assistant), observation and tool (a tool's result).
- `alpaca`: `{"instruction", "input", "output", "system", "history": [[user, assistant], ...]}`.
- `prompt_completion`: `{"prompt", "completion"}`, both strings or both lists of messages.

A turn is not trained when it carries `loss: 0`, `weight: 0`, `loss_weight: 0` (LLaMA-Factory's v1 format) or
`train: false` (a non-zero weight trains it fully: per-token weights are not supported). Columns outside the format
are dropped and counted by the caller.

Turn order (anything else is `wrong_turn_order`): an optional system message first, then a user turn; a user
turn is answered by an assistant turn (two user turns in a row are ambiguous and rejected); an assistant turn
with `tool_calls` is followed by tool results, which are followed by another tool result or an assistant turn.
A dialogue ends with an assistant turn: a trailing user or tool turn would teach nothing and is rejected rather
than silently cut. Every error is a `DataFormatError` with the file, line and a `reason` used for counting.

Raw text (`format: text`, continued pre-training) is not a dialogue: `to_text` gives one document's text, the
whole of a `.txt` file or a record's `text` field (renamed by the source's `fields`, e.g. `{text: body}`); an
empty document is refused as `empty_text`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.keys import ORIGIN_KEY
from data_pipeline.sources import DataFormatError, is_text_file

MESSAGES_KEY, TOOLS_KEY, SOURCE_KEY, TRAIN_KEY = "messages", "tools", "source", "train"
TEXT_KEY = "text"
ROLES = ("system", "user", "assistant", "tool")
CHATML_ROLE_ALIASES = {"developer": "system", "function": "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# Per-message keys that switch training of a turn off when they are 0 / false.
NO_TRAIN_FLAGS = ("loss", "weight", "loss_weight", "train")
TEXT_PART_TYPES = ("text", "input_text", "output_text")
# An assistant turn's reasoning: content parts of these types (LLaMA-Factory's `reasoning`), or one of these fields
# (`reasoning_content`: DeepSeek, Qwen3, OpenAI-compatible servers). Kept as the canonical `reasoning_content`.
REASONING_PART_TYPES = ("reasoning", "thinking")
# LLaMA-Factory's content part for one of the assistant's function calls: its JSON text.
TOOL_CALL_PART_TYPE = "tool_call"
REASONING_FIELDS = ("reasoning_content", "reasoning")
REASONING_KEY = "reasoning_content"
FORMAT_KEYS = {
    "chatml": ("messages", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion", "tools"),
}

Message = dict[str, Any]


class _Where:
    """The file and line of the record being converted, to raise located errors tersely."""

    def __init__(self, path: Path, line: int) -> None:
        self.path, self.line = path, line

    def error(self, reason: str, problem: str) -> DataFormatError:
        return DataFormatError(self.path, self.line, problem, reason)


def detect_format(record: Any) -> str | None:
    """The format of one record from its keys, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chatml"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def to_canonical(
    record: Any,
    path: Path,
    line: int,
    record_format: str = "auto",
    fields: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Convert one record into the canonical schema and check it.

    Args:
        record: the parsed JSON value.
        path: the file it came from (stored as the record's source).
        line: its line, for errors.
        record_format: `auto` or a forced format name.
        fields: canonical name -> this source's column name.

    Returns:
        The canonical record and the names of the columns dropped from it.

    Raises:
        DataFormatError: the record cannot be used; `reason` says why.
    """
    where = _Where(path, line)
    if not isinstance(record, dict):
        raise where.error("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    record = rename_fields(record, fields)
    detected = detect_format(record) if record_format == "auto" else record_format
    if detected is None:
        raise where.error(
            "unknown_format",
            f"unknown record format (keys {sorted(record)}); expected 'messages', 'conversations', Alpaca "
            "'instruction'/'output' or 'prompt'/'completion' (map other names with the source's `fields`)",
        )
    messages, tools = CONVERTERS[detected](record, where)
    _check_turns(messages, where)
    canonical: dict[str, Any] = {MESSAGES_KEY: messages, SOURCE_KEY: str(path), ORIGIN_KEY: f"{path}:{line}"}
    if tools:
        canonical[TOOLS_KEY] = tools
    return canonical, sorted(set(record) - set(FORMAT_KEYS[detected]))


def rename_fields(record: dict[str, Any], fields: dict[str, str] | None) -> dict[str, Any]:
    """The record with its columns renamed to their canonical names (a source's `fields`: canonical -> column)."""
    if not fields:
        return record
    return {canonical: record[column] for canonical, column in fields.items() if column in record} | {
        key: value for key, value in record.items() if key not in fields.values()
    }


def to_text(record: Any, path: Path, line: int, fields: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """One raw-text document: a `.txt` file's text (`parse_record` gives it as a str), or a record's `text` field.

    Args:
        record: the parsed record.
        path: the file it came from; a `.txt` file is its own document.
        line: its line, for errors.
        fields: `{"text": <this source's column>}` to read the text from another column.

    Returns:
        The text and the names of the record's other columns (dropped, counted by the caller).

    Raises:
        DataFormatError: not an object, no string `text` field, or an empty (whitespace only) document.
    """
    where = _Where(path, line)
    if is_text_file(path):
        text, dropped = record, []
    else:
        if not isinstance(record, dict):
            raise where.error("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
        column = (fields or {}).get(TEXT_KEY, TEXT_KEY)
        if column not in record:
            raise where.error(
                "missing_field",
                f"missing field {column!r} (raw text: records need a '{TEXT_KEY}' field, or the source's "
                f"`fields: {{{TEXT_KEY}: <column>}}`)",
            )
        text, dropped = record[column], sorted(key for key in record if key != column)
        if not isinstance(text, str):
            raise where.error("bad_text", f"{column!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise where.error("empty_text", "empty document: nothing to train on")
    return text, dropped


def _require(record: dict[str, Any], key: str, where: _Where) -> Any:
    if key not in record:
        raise where.error("missing_field", f"missing field {key!r}")
    return record[key]


def _content(value: Any, where: _Where, label: str, allow_empty_none: bool = False) -> str:
    """A message's content as a string: numbers are written out, text parts are joined by newlines."""
    content, _ = _content_and_reasoning(value, where, label, allow_empty_none, allow_reasoning=False)
    return content


def _content_and_reasoning(
    value: Any, where: _Where, label: str, allow_empty_none: bool = False, allow_reasoning: bool = True
) -> tuple[str, str | None]:
    """The content as a string and, apart, the text of its reasoning parts (None without any)."""
    content, reasoning, _ = _content_parts(value, where, label, allow_empty_none, allow_reasoning)
    return content, reasoning


def _content_parts(
    value: Any, where: _Where, label: str, allow_empty_none: bool = False, allow_reasoning: bool = True
) -> tuple[str, str | None, list[Any]]:
    """The content as a string and, apart, the text of its reasoning parts (None without any) and the calls of its
    `tool_call` parts (parsed JSON, checked by `_tool_calls`; only an assistant turn, `allow_reasoning`, has them)."""
    if isinstance(value, str):
        return value, None, []
    if value is None and allow_empty_none:
        return "", None, []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None, []
    if isinstance(value, list):
        texts, reasoning, calls = [], [], []
        for i, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise where.error("bad_content", f"{label}.content[{i}]: a part must be an object or a string")
            kind = part.get("type", "text")
            if kind in REASONING_PART_TYPES and not allow_reasoning:
                raise where.error("bad_content", f"{label}.content[{i}]: only an assistant turn has reasoning")
            if kind == TOOL_CALL_PART_TYPE:
                if not allow_reasoning:
                    raise where.error("bad_tool_calls", f"{label}.content[{i}]: only an assistant turn has tool calls")
                calls.append(_json_call(part.get("value", part.get("text")), where, f"{label}.content[{i}]"))
                continue
            if kind not in TEXT_PART_TYPES and kind not in REASONING_PART_TYPES:
                raise where.error(
                    "non_text_part",
                    f"{label}.content[{i}]: {part.get('type')!r} part cannot be trained by a text model; "
                    "remove it or the record",
                )
            text = part.get("text", part.get("value", part.get(kind)))
            if not isinstance(text, str):
                problem = f"{label}.content[{i}]: a {kind} part needs a string 'text' or 'value'"
                raise where.error("bad_content", problem)
            (reasoning if kind in REASONING_PART_TYPES else texts).append(text)
        return "\n".join(texts), "\n".join(reasoning) if reasoning else None, calls
    raise where.error("bad_content", f"{label}: content must be a string or a list of text parts, got {value!r:.60}")


def _json_call(value: Any, where: _Where, label: str) -> Any:
    """A call written as JSON text (a ShareGPT `function_call` value, a `tool_call` part), parsed."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise where.error("bad_tool_calls", f"{label}: the tool call is not valid JSON ({e.msg})") from e


def _reasoning_field(message: dict[str, Any], where: _Where, label: str) -> str | None:
    for field in REASONING_FIELDS:
        value = message.get(field)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise where.error("bad_content", f"{label}.{field} must be a string, got {type(value).__name__}")
        return value
    return None


def _trained(message: dict[str, Any], where: _Where, label: str) -> bool:
    for flag in NO_TRAIN_FLAGS:
        value = message.get(flag)
        if value is None:
            continue
        if not isinstance(value, (bool, int, float)):
            raise where.error("bad_message", f"{label}.{flag}={value!r} must be a number or a boolean")
        if not value:
            return False
    return True


def _arguments(value: Any, where: _Where, label: str) -> dict[str, Any]:
    # Templates render arguments with `tojson`: a JSON string would be encoded twice.
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise where.error("bad_tool_calls", f"{label}.arguments is not valid JSON ({e.msg})") from e
    if not isinstance(value, dict):
        raise where.error("bad_tool_calls", f"{label}.arguments must be an object, got {type(value).__name__}")
    return value


def _tool_calls(value: Any, where: _Where, label: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise where.error("bad_tool_calls", f"{label}.tool_calls must be a non-empty list")
    calls = []
    for i, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise where.error("bad_tool_calls", f"{label}.tool_calls[{i}] needs a function with a 'name'")
        arguments = _arguments(function.get("arguments", {}), where, f"{label}.tool_calls[{i}]")
        canonical = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            canonical["id"] = call["id"]
        calls.append(canonical)
    return calls


def _tools(record: dict[str, Any], where: _Where) -> list[dict[str, Any]] | None:
    tools = record.get(TOOLS_KEY)
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):  # LLaMA-Factory stores the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise where.error("bad_tools", f"'tools' is a string but not valid JSON ({e.msg})") from e
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise where.error("bad_tools", "'tools' must be a list of tool (function schema) objects")
    return tools


def _message(
    role: str, content: str, source: dict[str, Any], where: _Where, label: str, reasoning: str | None = None
) -> Message:
    message: Message = {"role": role, "content": content}
    if role == "assistant" and (reasoning := reasoning or _reasoning_field(source, where, label)) is not None:
        message[REASONING_KEY] = reasoning
    if role == "assistant" and not _trained(source, where, label):
        message[TRAIN_KEY] = False
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(source.get(key), str):
                message[key] = source[key]
    return message


def _chatml_messages(messages: Any, where: _Where, key: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise where.error("missing_messages", f"{key!r} must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        label = f"{key}[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise where.error("bad_message", f"{label} must be an object with a 'role'")
        role = CHATML_ROLE_ALIASES.get(message["role"], message["role"])
        if role not in ROLES:
            raise where.error("unknown_role", f"{label}: unknown role {message['role']!r}; expected {ROLES}")
        has_calls = message.get("tool_calls") not in (None, [])
        if has_calls and role != "assistant":
            raise where.error("bad_tool_calls", f"{label}: only an assistant message may have tool_calls")
        content, reasoning, part_calls = _content_parts(
            message.get("content"), where, label, allow_empty_none=has_calls, allow_reasoning=role == "assistant"
        )
        canonical = _message(role, content, message, where, label, reasoning)
        if has_calls or part_calls:
            calls = [*(message["tool_calls"] if has_calls else []), *part_calls]
            canonical["tool_calls"] = _tool_calls(calls, where, label)
        out.append(canonical)
    return out


def _from_chatml(record: dict[str, Any], where: _Where) -> tuple[list[Message], list | None]:
    return _chatml_messages(_require(record, "messages", where), where, "messages"), _tools(record, where)


def _from_sharegpt(record: dict[str, Any], where: _Where) -> tuple[list[Message], list | None]:
    turns = _require(record, "conversations", where)
    if not isinstance(turns, list) or not turns:
        raise where.error("missing_messages", "'conversations' must be a non-empty list")
    out = []
    if record.get("system"):
        out.append({"role": "system", "content": _content(record["system"], where, "system")})
    for i, turn in enumerate(turns):
        label = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise where.error("bad_message", f"{label} must be an object with 'from' and 'value'")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise where.error("unknown_role", f"{label}: unknown speaker {speaker!r}; expected {list(SHAREGPT_ROLES)}")
        if speaker == "function_call":
            call = _json_call(turn.get("value"), where, label)
            message = _message("assistant", "", turn, where, label)
            message["tool_calls"] = _tool_calls(call if isinstance(call, list) else [call], where, label)
            # A reply followed by its call is one assistant turn in the canonical schema.
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = message["tool_calls"]
                continue
            out.append(message)
            continue
        role = SHAREGPT_ROLES[speaker]
        assistant = role == "assistant"
        content, reasoning = _content_and_reasoning(turn.get("value"), where, label, allow_reasoning=assistant)
        out.append(_message(role, content, turn, where, label, reasoning))
    return out, _tools(record, where)


def _from_alpaca(record: dict[str, Any], where: _Where) -> tuple[list[Message], list | None]:
    instruction = _content(_require(record, "instruction", where), where, "instruction")
    extra_input = _content(record.get("input") or "", where, "input")
    output = _content(_require(record, "output", where), where, "output")
    messages: list[Message] = []
    if record.get("system"):
        messages.append({"role": "system", "content": _content(record["system"], where, "system")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise where.error("bad_message", "'history' must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise where.error("bad_message", f"history[{i}] must be an [instruction, response] pair")
        messages.append({"role": "user", "content": _content(pair[0], where, f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _content(pair[1], where, f"history[{i}][1]")})
    messages.append({"role": "user", "content": f"{instruction}\n{extra_input}" if extra_input else instruction})
    messages.append({"role": "assistant", "content": output})
    return messages, None


def _from_prompt_completion(record: dict[str, Any], where: _Where) -> tuple[list[Message], list | None]:
    prompt, completion = _require(record, "prompt", where), _require(record, "completion", where)
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = _chatml_messages(prompt, where, "prompt") + _chatml_messages(completion, where, "completion")
        return messages, _tools(record, where)
    return [
        {"role": "user", "content": _content(prompt, where, "prompt")},
        {"role": "assistant", "content": _content(completion, where, "completion")},
    ], _tools(record, where)


CONVERTERS: dict[str, Callable[[dict[str, Any], _Where], tuple[list[Message], list | None]]] = {
    "chatml": _from_chatml,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}

# The roles that may come right before each role (None: the dialogue's start, after an optional system).
_ALLOWED_PREVIOUS = {"user": (None, "assistant"), "assistant": ("user", "tool"), "tool": ("assistant", "tool")}


def _check_turns(messages: list[Message], where: _Where) -> None:
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if i != 0:
                raise where.error("system_not_first", f"messages[{i}]: a system message may only come first")
            continue
        if previous not in _ALLOWED_PREVIOUS[role]:
            raise where.error(
                "wrong_turn_order", f"messages[{i}]: a {role} turn cannot follow {previous or 'the start'}"
            )
        called = previous == "assistant" and "tool_calls" in messages[i - 1]
        if (role == "tool") != called and previous != "tool":
            raise where.error(
                "wrong_turn_order", f"messages[{i}]: tool results come right after an assistant's tool_calls, only"
            )
        if role == "assistant" and not message["content"].strip() and "tool_calls" not in message:
            raise where.error("empty_assistant", f"messages[{i}]: empty assistant reply")
        previous = role
    if previous is None or not any(m["role"] == "assistant" for m in messages):
        raise where.error("no_assistant", "no assistant message: nothing to train on")
    if previous != "assistant":
        raise where.error("ends_without_reply", f"the dialogue ends with a {previous} turn, not an assistant reply")
