"""Chat-template tokenisation with assistant-only labels.

The loss mask comes from the tokenizer's own chat template: its `{% generation %}` markers give the character
spans of the assistant replies, as in `apply_chat_template(..., return_assistant_tokens_mask=True)`, so every
assistant turn of a multi-turn dialogue is trained (with its end-of-turn token) and nothing else is.
`check_assistant_mask` runs the template on a probe dialogue at start-up and refuses a template whose mask is
empty or does not cover exactly the assistant replies, rather than training on nothing.

`tokenize_dialogues` is the path data preparation takes: it renders each dialogue once with transformers'
template renderer, encodes the whole batch in one fast-tokenizer call, and turns token offsets and generation
spans into labels with numpy, returning Arrow columns. `tokenize_dialogue` is its reference, one
`apply_chat_template` call per dialogue: the tests and the start-up check hold the two token for token equal.

An assistant turn marked `train: False` in the canonical record (a `loss: 0` flag in the source) is masked out:
the template's mask has one run of tokens per assistant turn, and the runs of untrained turns are cleared.
Tools are passed to the template when it refers to them (`tools` in its source).

Truncation policy: a sample longer than `max_length` keeps its first `max_length` tokens; a sample left with
no trainable token is dropped by the caller and counted.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from core.keys import ATTENTION_MASK_KEY, IGNORE_INDEX, INPUT_IDS_KEY, LABELS_KEY
from data_pipeline.schema import MESSAGES_KEY, TOOLS_KEY, TRAIN_KEY

NUM_TRAINABLE_KEY, TRUNCATED_KEY = "num_trainable_tokens", "truncated"
CONVERSATION_KEY = "conversation"
TOKENIZED_KEYS = (INPUT_IDS_KEY, ATTENTION_MASK_KEY, LABELS_KEY, NUM_TRAINABLE_KEY, TRUNCATED_KEY)

PROBE_DIALOGUE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]

Dialogue = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]
"""Canonical messages and the dialogue's tool schemas (or None)."""


def _template_tools(tools: list[dict[str, Any]] | None, tokenizer: PreTrainedTokenizerBase) -> list | None:
    return tools if tools and TOOLS_KEY in (tokenizer.chat_template or "") else None


def _untrained_turns(messages: list[dict[str, Any]]) -> tuple[list[int], int]:
    """The indices (among assistant turns) of the turns flagged `train: False`, and the number of assistant turns."""
    assistant = [m for m in messages if m["role"] == "assistant"]
    return [i for i, m in enumerate(assistant) if m.get(TRAIN_KEY) is False], len(assistant)


def tokenize_dialogue(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The reference of `tokenize_dialogues`: one dialogue through `apply_chat_template`, labels as Python lists.

    Args:
        messages: canonical messages; an assistant turn with `train: False` gets no label.
        tokenizer: a tokenizer whose chat template has generation markers.
        max_length: tokens kept from the start.
        tools: tool schemas, passed to templates that use them.

    Returns:
        `input_ids`, `attention_mask`, `labels`, the number of trainable tokens, and whether it was truncated.
    """
    encoded = tokenizer.apply_chat_template(
        messages,
        tools=_template_tools(tools, tokenizer),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    input_ids = list(encoded[INPUT_IDS_KEY])
    mask = list(encoded["assistant_masks"])
    untrained, num_assistant_turns = _untrained_turns(messages)
    if untrained:
        mask = _clear_turns(mask, untrained, num_assistant_turns)
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
    flags = np.asarray(mask, dtype=bool)
    edges = np.diff(np.concatenate([[False], flags, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) != num_assistant_turns:
        raise ValueError(
            f"the chat template's assistant mask has {len(starts)} runs for {num_assistant_turns} assistant turns, "
            "so per-turn `loss: 0` flags cannot be honoured with this template"
        )
    for turn in turns:
        flags[starts[turn] : ends[turn]] = False
    return flags.astype(int).tolist()


def render_dialogues(
    dialogues: Sequence[Dialogue], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Each dialogue as the chat template writes it, and the character spans of its `{% generation %}` blocks.

    The same rendering `apply_chat_template` does (its template choice, special tokens as template variables,
    messages without None values), with one renderer call for all the dialogues that pass no tools.
    """
    special_tokens = tokenizer.special_tokens_map
    texts: list[str] = [""] * len(dialogues)
    spans: list[list[tuple[int, int]]] = [[] for _ in dialogues]
    groups: dict[int, tuple[list | None, list[int]]] = {}
    for i, (_, tools) in enumerate(dialogues):
        template_tools = _template_tools(tools, tokenizer)
        # Dialogues without tools share one call; a dialogue with tools renders on its own.
        groups.setdefault(-1 if template_tools is None else i, (template_tools, []))[1].append(i)
    for template_tools, indices in groups.values():
        rendered, generation_spans = render_jinja_template(
            conversations=[[_without_none(m) for m in dialogues[i][0]] for i in indices],
            tools=template_tools,
            chat_template=tokenizer.get_chat_template(None, template_tools),
            return_assistant_tokens_mask=True,
            **special_tokens,
        )
        for i, text, generation in zip(indices, rendered, generation_spans, strict=True):
            texts[i], spans[i] = text, generation
    return texts, spans


def _without_none(message: dict[str, Any]) -> dict[str, Any]:
    # apply_chat_template drops None values: templates test for a key's presence, not for None.
    return {key: value for key, value in message.items() if value is not None}


def tokenize_dialogues(
    dialogues: Sequence[Dialogue], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, pa.Array]:
    """Tokenise a batch of canonical dialogues and label their trained assistant turns, as Arrow columns.

    Token for token what `tokenize_dialogue` gives, in a fraction of its time: one fast-tokenizer call for the
    batch, and the per-token loop of `apply_chat_template` (offsets against generation spans) done with numpy.

    Args:
        dialogues: (messages, tools) pairs; an assistant turn with `train: False` gets no label.
        tokenizer: a fast tokenizer whose chat template has generation markers.
        max_length: tokens kept from the start of each dialogue.

    Returns:
        `input_ids`, `attention_mask`, `labels` (int32 and int8 lists), `num_trainable_tokens`, `truncated`.

    Raises:
        ValueError: a tokenizer without offsets (not a fast one), generation spans out of order, or `train:
            False` flags on a template whose mask does not have one run per assistant turn.
    """
    texts, spans = render_dialogues(dialogues, tokenizer)
    # What apply_chat_template does after rendering: the special tokens are written by the template.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
    if encoded.encodings is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: assistant masks need the token offsets of a "
            "`tokenizers`-backed tokenizer (load it with use_fast=True)"
        )
    lengths = np.fromiter((len(ids) for ids in encoded[INPUT_IDS_KEY]), dtype=np.int64, count=len(texts))
    token_starts = np.concatenate([[0], np.cumsum(lengths)])
    input_ids = np.fromiter(itertools.chain.from_iterable(encoded[INPUT_IDS_KEY]), dtype=np.int32)
    mask = _assistant_mask(encoded.encodings, texts, spans, lengths)
    for i, (messages, _) in enumerate(dialogues):
        untrained, num_assistant_turns = _untrained_turns(messages)
        if untrained:
            begin, end = token_starts[i], token_starts[i + 1]
            mask[begin:end] = _clear_turns(mask[begin:end], untrained, num_assistant_turns)

    kept_lengths = np.minimum(lengths, max_length)
    truncated = lengths > max_length
    if truncated.any():
        position = np.arange(len(input_ids)) - np.repeat(token_starts[:-1], lengths)
        keep = position < max_length
        input_ids, mask = input_ids[keep], mask[keep]
    offsets = np.concatenate([[0], np.cumsum(kept_lengths)])
    trained_before = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    arrow_offsets = pa.array(offsets, type=pa.int32())
    return {
        INPUT_IDS_KEY: pa.ListArray.from_arrays(arrow_offsets, pa.array(input_ids)),
        ATTENTION_MASK_KEY: pa.ListArray.from_arrays(arrow_offsets, pa.array(np.ones(len(input_ids), np.int8))),
        LABELS_KEY: pa.ListArray.from_arrays(
            arrow_offsets, pa.array(np.where(mask, input_ids, np.int32(IGNORE_INDEX)))
        ),
        NUM_TRAINABLE_KEY: pa.array(trained_before[offsets[1:]] - trained_before[offsets[:-1]]),
        TRUNCATED_KEY: pa.array(truncated),
    }


def _assistant_mask(
    encodings: list, texts: list[str], spans: list[list[tuple[int, int]]], lengths: np.ndarray
) -> np.ndarray:
    """Which tokens overlap a generation span: `apply_chat_template`'s per-token loop, vectorised.

    That loop walks each dialogue's spans in order, skipping those that end at or before the token's start,
    and marks the token when it ends after the start of the span it stopped at. With the dialogues laid end to
    end (each shifted by the lengths of the texts before it, plus one), the number of spans skipped is a
    `searchsorted` over the span ends, kept non-decreasing as the loop's index is; a token never reaches the
    next dialogue's first span, which starts after the token's own text ends.
    """
    text_starts = np.concatenate([[0], np.cumsum([len(text) + 1 for text in texts])])[:-1]
    offsets = (
        np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings)), dtype=np.int64
        ).reshape(-1, 2)
        + np.repeat(text_starts, lengths)[:, None]
    )
    shifted = [
        (start + shift, end + shift)
        for shift, spans_of in zip(text_starts.tolist(), spans, strict=True)
        for start, end in spans_of
    ]
    span_bounds = np.array(shifted, dtype=np.int64).reshape(-1, 2)
    span_starts, span_ends = span_bounds[:, 0], span_bounds[:, 1]
    # Only the ends need to be in order for the count of skipped spans to be a searchsorted.
    if not len(span_ends):
        return np.zeros(len(offsets), dtype=bool)
    if (np.diff(span_ends) < 0).any():
        raise ValueError(
            "the chat template's {% generation %} blocks end out of order (nested blocks?): "
            "give each assistant reply one block of its own"
        )
    skipped = np.maximum.accumulate(np.searchsorted(span_ends, offsets[:, 0], side="right"))
    reached = skipped < len(span_ends)
    return reached & (offsets[:, 1] > span_starts[np.minimum(skipped, len(span_ends) - 1)])


def tokenize_batch(batch: pa.Table, tokenizer: PreTrainedTokenizerBase, max_length: int) -> pa.Table:
    """`datasets.map(batched=True)` adapter on an Arrow-formatted dataset.

    Each row's `conversation` is canonical JSON (messages, tools); it is replaced by the tokenised columns and
    the other columns pass through untouched.
    """
    dialogues = []
    for conversation in batch.column(CONVERSATION_KEY).to_pylist():
        dialogue = json.loads(conversation)
        dialogues.append((dialogue[MESSAGES_KEY], dialogue.get(TOOLS_KEY)))
    table = batch.drop_columns([CONVERSATION_KEY])
    for name, column in tokenize_dialogues(dialogues, tokenizer, max_length).items():
        table = table.append_column(name, column)
    return table


def check_assistant_mask(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a chat template whose assistant mask is empty or covers anything but the replies.

    The probe dialogue goes through `tokenize_dialogues`, the path preparation takes, which must also agree
    with `apply_chat_template` (`tokenize_dialogue`) on it.

    Raises:
        ValueError: no chat template, an empty mask, or a mask that covers more or less than the replies.
        RuntimeError: the batch path and `apply_chat_template` disagree (a transformers change?).
    """
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: set one (e.g. ChatML) before training on chat data")
    columns = tokenize_dialogues([(PROBE_DIALOGUE, None)], tokenizer, max_length=10**9)
    row = {key: column[0].as_py() for key, column in columns.items()}
    reference = tokenize_dialogue(PROBE_DIALOGUE, tokenizer, max_length=10**9)
    if row != reference:
        raise RuntimeError(
            "data_pipeline.tokenize: the batch tokenisation disagrees with apply_chat_template on the probe "
            f"dialogue ({row} vs {reference}); check the installed transformers version against this module"
        )
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
