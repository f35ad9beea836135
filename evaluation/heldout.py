"""Held-out evaluation: greedy generations, exact match and assistant NLL.

A held-out file is ChatML JSONL whose last message in each dialogue is the
reference assistant reply. For each dialogue the model generates a reply to
the preceding messages (greedy, stopping at the tokenizer's end-of-turn) and
the reply counts as correct when it equals the reference after stripping
whitespace. The teacher-forced NLL is the mean cross-entropy of the reference
reply's tokens (its assistant mask from the chat template). Both are reported
before and after training, so a run shows whether the model got better on
prompts it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data_pipeline.sources import read_records


@dataclass
class Generation:
    prompt: str
    reference: str
    generated: str

    @property
    def correct(self) -> bool:
        return self.generated.strip() == self.reference.strip()


@dataclass
class HeldoutResult:
    accuracy: float
    nll: float
    generations: list[Generation] = field(default_factory=list)


def load_heldout(path: str | Path, max_samples: int) -> list[list[dict[str, str]]]:
    dialogues = []
    for line_number, record in read_records(Path(path)):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{path}:{line_number}: a held-out dialogue must end with an assistant message")
        dialogues.append(messages)
    return dialogues[:max_samples]


@torch.no_grad()
def greedy_reply(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], max_new_tokens: int
) -> str:
    """The model's greedy continuation of `prompt_ids` up to its end-of-turn token, decoded."""
    prompt = torch.tensor([prompt_ids], device=model.device)
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)


@torch.no_grad()
def evaluate_heldout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogues: list[list[dict[str, str]]],
    max_new_tokens: int,
) -> HeldoutResult:
    was_training = model.training
    model.eval()
    generations, nll_sum, nll_count = [], 0.0, 0
    for messages in dialogues:
        prompt_ids = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(model.device)
        generated = greedy_reply(model, tokenizer, prompt_ids[0].tolist(), max_new_tokens)
        generations.append(Generation(messages[-2]["content"], messages[-1]["content"], generated))

        full = tokenizer.apply_chat_template(
            messages, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
        )
        input_ids = full["input_ids"].to(model.device)
        reply_mask = full["assistant_masks"].to(model.device).bool()
        reply_mask[:, : prompt_ids.shape[1]] = False  # only the final, reference reply
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        nll_sum += token_nll[reply_mask[:, 1:]].sum().item()
        nll_count += int(reply_mask[:, 1:].sum())
    model.train(was_training)
    accuracy = sum(g.correct for g in generations) / max(len(generations), 1)
    return HeldoutResult(accuracy=accuracy, nll=nll_sum / max(nll_count, 1), generations=generations)


HELDOUT_TEXT, HELDOUT_JSON = "heldout.txt", "heldout.json"


def comparison_record(before: HeldoutResult, after: HeldoutResult) -> dict[str, Any]:
    """The numbers of `format_comparison`, for programs (`heldout.json`; `python -m evaluation.compare` reads it)."""
    return {
        "prompts": len(before.generations),
        "before": {"exact_match": before.accuracy, "nll": before.nll},
        "after": {"exact_match": after.accuracy, "nll": after.nll},
    }


def format_comparison(before: HeldoutResult, after: HeldoutResult, show: int) -> str:
    """A plain-text before/after table: a few generations, then accuracy and NLL."""
    rows = [("prompt", "reference", "before", "after")]
    for b, a in list(zip(before.generations, after.generations, strict=True))[:show]:
        rows.append((b.prompt.replace("\n", " "), b.reference, _mark(b), _mark(a)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    n = len(before.generations)
    lines += [
        "",
        f"held-out exact match ({n} prompts): before {before.accuracy:.1%}  after {after.accuracy:.1%}",
        f"held-out assistant NLL:            before {before.nll:.3f}  after {after.nll:.3f}",
    ]
    return "\n".join(lines)


def _mark(generation: Generation) -> str:
    return f"{generation.generated.strip()!r} {'ok' if generation.correct else 'x'}"
