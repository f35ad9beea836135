"""Chat-template tokenisation with assistant-only labels.

The loss mask comes from the tokenizer's own chat template: its
`{% generation %}` markers give `assistant_masks` through
`apply_chat_template(..., return_assistant_tokens_mask=True)`, so every
assistant turn of a multi-turn dialogue is trained (with its end-of-turn
token) and nothing else is. `check_assistant_mask` runs the template on a
probe dialogue at start-up and refuses a template whose mask is empty or does
not cover exactly the assistant replies, rather than training on nothing.

An assistant turn marked `train: False` in the canonical record (a `loss: 0`
flag in the source) is masked out: the template's mask has one run of tokens
per assistant turn, and the runs of untrained turns are cleared. Tools are
passed to the template when it refers to them (`tools` in its source).

Truncation policy: a sample longer than `max_length` keeps its first
`max_length` tokens; a sample left with no trainable token is dropped by the
caller and counted.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from data_pipeline.schema import MESSAGES_KEY, TOOLS_KEY, TRAIN_KEY
from dft.loss import IGNORE_INDEX

INPUT_IDS_KEY, ATTENTION_MASK_KEY, LABELS_KEY = "input_ids", "attention_mask", "labels"
NUM_TRAINABLE_KEY, TRUNCATED_KEY = "num_trainable_tokens", "truncated"
CONVERSATION_KEY = "conversation"

PROBE_DIALOGUE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]


def tokenize_dialogue(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Render one canonical dialogue with the chat template and label its trained assistant turns.

    Args:
        messages: canonical messages; an assistant turn with `train: False` gets no label.
        tokenizer: a tokenizer whose chat template has generation markers.
        max_length: tokens kept from the start.
        tools: tool schemas, passed to templates that use them.

    Returns:
        `input_ids`, `attention_mask`, `labels`, the number of trainable tokens, and whether it was truncated.
    """
    template_tools = tools if tools and TOOLS_KEY in (tokenizer.chat_template or "") else None
    encoded = tokenizer.apply_chat_template(
        messages, tools=template_tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    input_ids = list(encoded[INPUT_IDS_KEY])
    mask = list(encoded["assistant_masks"])
    untrained = [i for i, m in enumerate(m for m in messages if m["role"] == "assistant") if m.get(TRAIN_KEY) is False]
    if untrained:
        mask = _clear_turns(mask, untrained, sum(m["role"] == "assistant" for m in messages))
    truncated = len(input_ids) > max_length
    input_ids, mask = input_ids[:max_length], mask[:max_length]
    labels = [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, mask, strict=True)]
    return {
        INPUT_IDS_KEY: input_ids,
        ATTENTION_MASK_KEY: [1] * len(input_ids),
        LABELS_KEY: labels,
        NUM_TRAINABLE_KEY: sum(mask),
        TRUNCATED_KEY: truncated,
    }


def _clear_turns(mask: list[int], turns: list[int], num_assistant_turns: int) -> list[int]:
    """Zero the mask runs of the given assistant turns (the n-th run of ones is the n-th assistant turn)."""
    runs, start = [], None
    for i, value in enumerate([*mask, 0]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    if len(runs) != num_assistant_turns:
        raise ValueError(
            f"the chat template's assistant mask has {len(runs)} runs for {num_assistant_turns} assistant turns, "
            "so per-turn `loss: 0` flags cannot be honoured with this template"
        )
    mask = list(mask)
    for turn in turns:
        begin, end = runs[turn]
        mask[begin:end] = [0] * (end - begin)
    return mask


def tokenize_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list]:
    """`datasets.map(batched=True)` adapter: each row's `conversation` is canonical JSON (messages, tools)."""
    rows = []
    for conversation in batch[CONVERSATION_KEY]:
        dialogue = json.loads(conversation)
        rows.append(tokenize_dialogue(dialogue[MESSAGES_KEY], tokenizer, max_length, dialogue.get(TOOLS_KEY)))
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def check_assistant_mask(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a chat template whose assistant mask is empty or covers anything but the replies.

    Raises:
        ValueError: no chat template, an empty mask, or a mask that covers more or less than the replies.
    """
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: set one (e.g. ChatML) before training on chat data")
    row = tokenize_dialogue(PROBE_DIALOGUE, tokenizer, max_length=10**9)
    trained_ids = [label for label in row[LABELS_KEY] if label != IGNORE_INDEX]
    if not trained_ids:
        raise ValueError(
            "the chat template gives an empty assistant mask: it needs {% generation %} ... {% endgeneration %} "
            "around each assistant reply (see embedded/tokenizer.py for a ChatML example)"
        )
    trained_text = tokenizer.decode(trained_ids, skip_special_tokens=True)
    replies = [m["content"] for m in PROBE_DIALOGUE if m["role"] == "assistant"]
    if trained_text.replace("\n", "").replace(" ", "") != "".join(replies).replace(" ", ""):
        raise ValueError(
            f"the chat template's assistant mask covers {trained_text!r}, expected only the replies {replies}"
        )
