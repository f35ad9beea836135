"""Preference pairs (`format: pairs`, `training.objective=reward|dpo`): records into one canonical pair, pairs into
token sequences that share their prompt.

A canonical pair is `{"messages": prompt, "chosen": reply, "rejected": reply, "tools": [...] (optional)}`: the
prompt is canonical messages (`data_pipeline.schema`: an optional system message, then user/assistant history,
ending with a user turn or a tool result), each reply the messages that answer it (an assistant turn, or an
assistant turn with tool calls, their results and a final answer). The layout is detected per record:

- `{"question"|"prompt": str, "chosen": str, "rejected": str, "system": str}`: the seed users' reward-model format
  and TRL's standard one (`prompt`), optional `system`.
- TRL's conversational format: `{"chosen": [messages], "rejected": [messages]}` with an implicit prompt, the messages
  the two lists share from the start (each list then ends with its reply), or `{"prompt": [messages], "chosen":
  [assistant message(s)], "rejected": [...]}`. LLaMA-Factory's v1 `{"chosen_messages", "rejected_messages"}`
  (`v1_dpo_demo.jsonl`: content parts, `loss_weight` flags) reads as the implicit-prompt one.
- LLaMA-Factory's ranking formats: ShareGPT `{"conversations": [...], "chosen": {"from": "gpt", "value": ...},
  "rejected": {...}, "system", "tools"}` (`dpo_en_demo.json`) and Alpaca `{"instruction", "input", "chosen",
  "rejected", "system", "history"}`.

A reply is a string, a message (`{"role", "content"}` or ShareGPT `{"from", "value"}`) or a list of messages; the
messages convert as SFT records do (`data_pipeline.schema`'s converters) and a source's `fields` renames pair columns
too (`{question: query, chosen: good}`). A bad pair is a `DataFormatError` with its file and line and a counted
reason: `missing_chosen`/`missing_rejected`, `empty_reply`, `chosen_equals_rejected`, `prompts_differ` (the two
conversations share no prompt), `reply_not_assistant`, or any of the SFT record reasons.

Tokenisation renders prompt + reply as one dialogue with the chat template, for each reply, through
`data_pipeline.tokenize.tokenize_dialogues` (the SFT path): the reply's assistant tokens are labelled (end-of-turn
included), everything else is `IGNORE_INDEX`; the prompt's assistant turns are not trained. The prompt tokens (those
before the first labelled token) must be identical in both sequences; a template that renders them differently
refuses the pair (`prompt_rendered_differently`). Truncation keeps the two comparable, for `data.max_length` and
`data.truncation`, when the prompt plus the longer reply exceeds `max_length`:

- `keep_start`: the prompt is kept whole and both replies are cut at their end to `max_length - prompt`; a prompt
  of `max_length` tokens or more leaves no reply.
- `keep_end`: the prompt is cut from the left to `max_length - longer reply` tokens, but keeps at least
  `min(prompt, max_length // 2)`; both replies are then cut at their end to fit what is left.
- `drop`: the pair is dropped (`longer_than_max_length`).

Both sequences keep the same prompt tokens, and a pair left with no labelled token on either side is dropped and
counted (`no_trainable_tokens_after_truncation`). Each prepared row holds `chosen_input_ids`, `chosen_labels`,
`rejected_input_ids`, `rejected_labels`, `length` (the longer sequence) and the SFT rows' `source_id` and `origin`;
`PairCollator` (`data_pipeline.collate`) batches them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from core.keys import (
    CHOSEN_INPUT_IDS_KEY,
    CHOSEN_LABELS_KEY,
    IGNORE_INDEX,
    INPUT_IDS_KEY,
    LABELS_KEY,
    LENGTH_KEY,
    REJECTED_INPUT_IDS_KEY,
    REJECTED_LABELS_KEY,
)
from data_pipeline.schema import (
    MESSAGES_KEY,
    TOOLS_KEY,
    TRAIN_KEY,
    Message,
    _chatml_messages,
    _check_turns,
    _content,
    _from_alpaca,
    _from_sharegpt,
    _tools,
    _Where,
    rename_fields,
)
from data_pipeline.tokenize import (
    CONVERSATION_KEY,
    NUM_TRAINABLE_KEY,
    REFUSAL_KEY,
    REFUSAL_REASON_KEY,
    TRUNCATED_KEY,
    UNTRAINED_TURNS_KEY,
    TokenizeOptions,
    tokenize_dialogues,
)

CHOSEN_KEY, REJECTED_KEY = "chosen", "rejected"
REPLY_KEYS = (CHOSEN_KEY, REJECTED_KEY)
# LLaMA-Factory v1's names for the two conversations.
REPLY_ALIASES = {"chosen_messages": CHOSEN_KEY, "rejected_messages": REJECTED_KEY}
PROMPT_RENDERED_DIFFERENTLY = "prompt_rendered_differently"
# The columns each layout reads; any other column is dropped and counted.
LAYOUT_KEYS = {
    "sharegpt": ("conversations", "system", "tools", *REPLY_KEYS),
    "alpaca": ("instruction", "input", "system", "history", *REPLY_KEYS),
    "conversational": ("prompt", "tools", *REPLY_KEYS),
    "strings": ("question", "prompt", "system", "tools", *REPLY_KEYS),
}
# The pair columns of a tokenised batch, and those the accounting reads.
PAIR_COLUMNS = (CHOSEN_INPUT_IDS_KEY, CHOSEN_LABELS_KEY, REJECTED_INPUT_IDS_KEY, REJECTED_LABELS_KEY, LENGTH_KEY)
_NO_LIMIT = 10**9


def detect_pair_layout(record: dict[str, Any]) -> str:
    """The layout of a pair record from its keys (see the module doc): `sharegpt`, `alpaca`, `conversational` or
    `strings`."""
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if isinstance(record.get(CHOSEN_KEY), list) or isinstance(record.get("prompt"), list):
        return "conversational"
    return "strings"


def to_pair(
    record: Any, path: Path, line: int, fields: dict[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """One preference record into the canonical pair, checked.

    Args:
        record: the parsed JSON value.
        path: its file, for errors.
        line: its line, for errors.
        fields: canonical name -> this source's column name.

    Returns:
        `{"messages": prompt, "chosen": [messages], "rejected": [messages], "tools": [...]}` (tools only when the
        record has some) and the names of the columns the layout does not read.

    Raises:
        DataFormatError: the pair cannot be used; `reason` says why.
    """
    where = _Where(path, line)
    if not isinstance(record, dict):
        raise where.error("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    record = rename_fields(record, fields)
    record = {REPLY_ALIASES.get(key, key): value for key, value in record.items()}
    for key in REPLY_KEYS:
        if record.get(key) is None:
            raise where.error(
                f"missing_{key}",
                f"missing {key!r}: a preference pair needs a prompt and a 'chosen' and a 'rejected' reply "
                "(map other column names with the source's `fields`)",
            )
    layout = detect_pair_layout(record)
    prompt, chosen, rejected = _LAYOUTS[layout](record, where)
    tools = _tools(record, where)
    for key, reply in ((CHOSEN_KEY, chosen), (REJECTED_KEY, rejected)):
        if not reply or reply[0]["role"] != "assistant":
            found = f"starts with a {reply[0]['role']} turn" if reply else "is empty"
            raise where.error("reply_not_assistant", f"{key!r} {found}: a reply is the assistant's answer")
        if not any(m["content"].strip() or m.get("tool_calls") for m in reply if m["role"] == "assistant"):
            raise where.error("empty_reply", f"{key!r} is an empty reply: nothing to compare")
        if not any(m["role"] == "user" for m in prompt):
            raise where.error("missing_prompt", "the pair has no prompt: no user turn before the replies")
        _check_turns(prompt + reply, where)
    if chosen == rejected:
        raise where.error("chosen_equals_rejected", "'chosen' and 'rejected' are the same reply: nothing to prefer")
    pair: dict[str, Any] = {MESSAGES_KEY: prompt, CHOSEN_KEY: chosen, REJECTED_KEY: rejected}
    if tools:
        pair[TOOLS_KEY] = tools
    return pair, sorted(set(record) - set(LAYOUT_KEYS[layout]))


Replies = tuple[list[Message], list[Message], list[Message]]


def _reply(value: Any, where: _Where, key: str) -> list[Message]:
    """A reply: a string, one message (ChatML or ShareGPT) or a list of messages."""
    if isinstance(value, dict) and "from" in value:
        return _sharegpt_turns([value], where)
    if isinstance(value, dict):
        return _chatml_messages([value], where, key)
    if isinstance(value, list):
        return _chatml_messages(value, where, key)
    return [{"role": "assistant", "content": _content(value, where, key)}]


def _sharegpt_turns(turns: list[Any], where: _Where) -> list[Message]:
    return _from_sharegpt({"conversations": turns}, where)[0]


def _from_strings(record: dict[str, Any], where: _Where) -> Replies:
    key = "question" if "question" in record else "prompt"
    if key not in record:
        raise where.error("missing_prompt", "missing 'question' or 'prompt': the pair has no prompt")
    prompt: list[Message] = []
    if record.get("system"):
        prompt.append({"role": "system", "content": _content(record["system"], where, "system")})
    prompt.append({"role": "user", "content": _content(record[key], where, key)})
    return prompt, _reply(record[CHOSEN_KEY], where, CHOSEN_KEY), _reply(record[REJECTED_KEY], where, REJECTED_KEY)


def _from_conversational(record: dict[str, Any], where: _Where) -> Replies:
    chosen = _reply(record[CHOSEN_KEY], where, CHOSEN_KEY)
    rejected = _reply(record[REJECTED_KEY], where, REJECTED_KEY)
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            return _chatml_messages(prompt, where, "prompt"), chosen, rejected
        return [{"role": "user", "content": _content(prompt, where, "prompt")}], chosen, rejected
    # The implicit prompt: the messages both conversations start with, up to the last user turn or tool result.
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] not in ("user", "tool"):
        shared -= 1
    if not shared:
        first = chosen[0] if chosen else {"role": "nothing"}
        raise where.error(
            "prompts_differ",
            f"'chosen' and 'rejected' share no prompt (they differ from their first {first['role']} message on): "
            "the two replies of a pair answer the same prompt; give it once as 'prompt', or start both "
            "conversations with the same messages",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _from_sharegpt_ranking(record: dict[str, Any], where: _Where) -> Replies:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise where.error("missing_messages", "'conversations' must be a non-empty list")
    prompt = _from_sharegpt(record, where)[0]
    replies = []
    for key in REPLY_KEYS:
        value = record[key]
        reply_turns = value if isinstance(value, list) else [value]
        if all(isinstance(turn, dict) and "from" in turn for turn in reply_turns):
            # Converted with the prompt: a ShareGPT function_call turn joins the assistant turn before it.
            whole = _from_sharegpt({**record, "conversations": [*turns, *reply_turns]}, where)[0]
            replies.append(whole[len(prompt) :])
        else:
            replies.append(_reply(value, where, key))
    return prompt, replies[0], replies[1]


def _from_alpaca_ranking(record: dict[str, Any], where: _Where) -> Replies:
    dialogue, _ = _from_alpaca({**record, "output": ""}, where)
    return (
        dialogue[:-1],
        _reply(record[CHOSEN_KEY], where, CHOSEN_KEY),
        _reply(record[REJECTED_KEY], where, REJECTED_KEY),
    )


_LAYOUTS = {
    "sharegpt": _from_sharegpt_ranking,
    "alpaca": _from_alpaca_ranking,
    "conversational": _from_conversational,
    "strings": _from_strings,
}
assert set(_LAYOUTS) == set(LAYOUT_KEYS)


def untrained_prompt(prompt: list[Message]) -> list[Message]:
    """The prompt's messages with its assistant turns (history) not trained."""
    return [{**m, TRAIN_KEY: False} if m["role"] == "assistant" else m for m in prompt]


def truncate_pair(
    prompt_length: int, chosen_length: int, rejected_length: int, max_length: int, truncation: str
) -> tuple[slice, int] | None:
    """Where a pair is cut (the module doc's rule): the slice of the prompt tokens kept and the tokens each reply
    keeps at most; None when the pair is dropped (`drop` and too long)."""
    longest = max(chosen_length, rejected_length)
    if prompt_length + longest <= max_length:
        return slice(0, prompt_length), longest
    if truncation == "drop":
        return None
    if truncation == "keep_end":
        kept = max(max_length - longest, min(prompt_length, max_length // 2))
        return slice(prompt_length - kept, prompt_length), max_length - kept
    kept = min(prompt_length, max_length)
    return slice(0, kept), max_length - kept


def tokenize_pairs(
    pairs: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions
) -> dict[str, pa.Array]:
    """Tokenise canonical pairs into their two sequences, as Arrow columns (see the module doc).

    Returns:
        `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels` (int32 lists), `length`, the
        labelled tokens of both (`num_trainable_tokens`: 0 for a dropped pair), `truncated`, `untrained_turns` and
        `refusal_reason`/`refusal` (null, or why the pair, then empty, is refused).
    """
    dialogues = [
        (untrained_prompt(pair[MESSAGES_KEY]) + pair[key], pair.get(TOOLS_KEY)) for pair in pairs for key in REPLY_KEYS
    ]
    whole = dataclasses.replace(options, max_length=_NO_LIMIT, truncation="keep_start")
    columns = tokenize_dialogues(dialogues, tokenizer, whole)
    sequences = [
        (np.asarray(ids, np.int32), np.asarray(labels, np.int32))
        for ids, labels in zip(columns[INPUT_IDS_KEY].to_pylist(), columns[LABELS_KEY].to_pylist(), strict=True)
    ]
    refusal_reasons = columns[REFUSAL_REASON_KEY].to_pylist()
    refusal_problems = columns[REFUSAL_KEY].to_pylist()
    untrained = np.asarray(columns[UNTRAINED_TURNS_KEY].to_pylist(), np.int32).reshape(-1, 2).sum(axis=1)
    out: dict[str, list[Any]] = {name: [] for name in (*PAIR_COLUMNS, NUM_TRAINABLE_KEY, TRUNCATED_KEY)}
    reasons, problems = [], []
    for index in range(len(pairs)):
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sequences[2 * index : 2 * index + 2]
        both = slice(2 * index, 2 * index + 2)
        reason, problem = next(
            ((r, p) for r, p in zip(refusal_reasons[both], refusal_problems[both], strict=True) if r), (None, None)
        )
        cut = None
        truncated = False
        labelled = (chosen_labels != IGNORE_INDEX).any() and (rejected_labels != IGNORE_INDEX).any()
        if reason is None and labelled:  # a reply with nothing to train (a `loss: 0` turn) is dropped and counted
            prompt_length = _first_label(chosen_labels)
            if prompt_length != _first_label(rejected_labels) or not np.array_equal(
                chosen_ids[:prompt_length], rejected_ids[:prompt_length]
            ):
                reason, problem = (
                    PROMPT_RENDERED_DIFFERENTLY,
                    _prompt_difference(chosen_ids, rejected_ids, prompt_length, tokenizer),
                )
        if reason is None and labelled:
            lengths = (len(chosen_ids) - prompt_length, len(rejected_ids) - prompt_length)
            truncated = prompt_length + max(lengths) > options.max_length
            cut = truncate_pair(prompt_length, *lengths, options.max_length, options.truncation)
        kept = []
        if cut is not None:
            prompt_slice, reply_room = cut
            for ids, labels in ((chosen_ids, chosen_labels), (rejected_ids, rejected_labels)):
                reply = slice(prompt_length, prompt_length + reply_room)
                kept.append(
                    (
                        np.concatenate([ids[prompt_slice], ids[reply]]),
                        np.concatenate([labels[prompt_slice], labels[reply]]),
                    )
                )
        trainable = [int((labels != IGNORE_INDEX).sum()) for _, labels in kept]
        if len(kept) < 2 or min(trainable) == 0:
            kept, trainable = [(np.zeros(0, np.int32),) * 2] * 2, [0]
        (c_ids, c_labels), (r_ids, r_labels) = kept
        for name, value in zip(PAIR_COLUMNS, (c_ids, c_labels, r_ids, r_labels), strict=False):
            out[name].append(value)
        out[LENGTH_KEY].append(max(len(c_ids), len(r_ids)))
        out[NUM_TRAINABLE_KEY].append(sum(trainable))
        out[TRUNCATED_KEY].append(truncated)
        reasons.append(reason)
        problems.append(problem)
    sequence_type = pa.list_(pa.int32())
    return {
        **{name: pa.array(out[name], sequence_type) for name in PAIR_COLUMNS[:4]},
        LENGTH_KEY: pa.array(out[LENGTH_KEY], pa.int32()),
        NUM_TRAINABLE_KEY: pa.array(out[NUM_TRAINABLE_KEY], pa.int64()),
        TRUNCATED_KEY: pa.array(out[TRUNCATED_KEY], pa.bool_()),
        UNTRAINED_TURNS_KEY: pa.array(untrained, pa.int32()),
        REFUSAL_REASON_KEY: pa.array(reasons, pa.string()),
        REFUSAL_KEY: pa.array(problems, pa.string()),
    }


def _first_label(labels: np.ndarray) -> int:
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    return int(trained[0]) if len(trained) else len(labels)


def _prompt_difference(
    chosen: np.ndarray, rejected: np.ndarray, prompt_length: int, tokenizer: PreTrainedTokenizerBase
) -> str:
    common = min(len(chosen), len(rejected), prompt_length + 1)
    differ = int(np.argmax(np.append(chosen[:common] != rejected[:common], True)))
    texts = (tokenizer.decode(ids[differ : differ + 8]) for ids in (chosen, rejected))
    return (
        "the chat template renders the prompt differently before the chosen and the rejected reply (from token "
        f"{differ} on: {next(texts)!r} vs {next(texts)!r}), so the two sequences would not share their prompt; set "
        "data.chat_template to a template that renders the prompt the same whatever the reply, or "
        f"data.on_error=skip to skip such pairs (counted as {PROMPT_RENDERED_DIFFERENTLY})"
    )


def tokenize_pair_batch(batch: pa.Table, tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions) -> pa.Table:
    """One Arrow batch of canonical pairs (`conversation` JSON) tokenised (`data_pipeline.parallel.map_arrow_batches`
    runs it): the pair columns replace `conversation`, the other columns pass through."""
    pairs = [json.loads(pair) for pair in batch.column(CONVERSATION_KEY).to_pylist()]
    table = batch.drop_columns([CONVERSATION_KEY])
    for name, column in tokenize_pairs(pairs, tokenizer, options).items():
        table = table.append_column(name, column)
    return table
