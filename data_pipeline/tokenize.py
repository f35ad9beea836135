"""Chat-template tokenisation with assistant-only labels.

The loss mask comes from the tokenizer's own chat template: its
`{% generation %}` markers give `assistant_masks` through
`apply_chat_template(..., return_assistant_tokens_mask=True)`, so every
assistant turn of a multi-turn dialogue is trained (with its end-of-turn
token) and nothing else is. `check_assistant_mask` runs the template on a
probe dialogue at start-up and refuses a template whose mask is empty or does
not cover exactly the assistant replies, rather than training on nothing.

Truncation policy: a sample longer than `max_length` keeps its first
`max_length` tokens; a sample left with no trainable token is dropped by the
caller and counted.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from dft.loss import IGNORE_INDEX

INPUT_IDS_KEY, ATTENTION_MASK_KEY, LABELS_KEY = "input_ids", "attention_mask", "labels"
NUM_TRAINABLE_KEY, TRUNCATED_KEY = "num_trainable_tokens", "truncated"

PROBE_DIALOGUE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]


def tokenize_dialogue(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, Any]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    input_ids = list(encoded[INPUT_IDS_KEY])
    mask = list(encoded["assistant_masks"])
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


def tokenize_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list]:
    """`datasets.map(batched=True)` adapter around `tokenize_dialogue`."""
    rows = [tokenize_dialogue(messages, tokenizer, max_length) for messages in batch["messages"]]
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def check_assistant_mask(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a chat template whose assistant mask is empty or covers anything but the replies."""
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
