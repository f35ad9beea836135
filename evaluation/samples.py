"""`samples.md`: the trained model's greedy replies to validation prompts beside their references.

Works on tokenised rows (`input_ids`, `labels`) so it needs no knowledge of the
source format: the prompt is every token before the first trained one (the
chat template's assistant header included), the reference is the first
trained span (the first assistant reply and its end-of-turn token).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.keys import IGNORE_INDEX
from evaluation.heldout import greedy_replies


def split_prompt_and_reference(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return input_ids[:start], input_ids[start:end]


@torch.no_grad()
def samples_markdown(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Iterable[dict],
    max_new_tokens: int,
    batch_size: int = 16,
) -> str:
    model.eval()
    lines = [
        "# Validation samples",
        "",
        "Greedy replies of the final model to the first turn of validation dialogues.",
        "",
        "| # | prompt | reference | generated | match |",
        "|---:|---|---|---|:---:|",
    ]
    split = [split_prompt_and_reference(row["input_ids"], row["labels"]) for row in rows]
    replies = greedy_replies(model, tokenizer, [prompt_ids for prompt_ids, _ in split], max_new_tokens, batch_size)
    for index, ((prompt_ids, reference_ids), reply) in enumerate(zip(split, replies, strict=True), start=1):
        generated = reply.strip()
        reference = tokenizer.decode(reference_ids, skip_special_tokens=True).strip()
        shown_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()
        lines.append(
            f"| {index} | {_cell(shown_prompt)} | {_cell(reference)} | {_cell(generated)} | "
            f"{'yes' if generated == reference else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")
