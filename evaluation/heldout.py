"""Held-out evaluation: greedy generations, exact match and the reference reply's NLL.

A held-out file is ChatML JSONL whose last message in each dialogue is the reference assistant reply. For each
dialogue the model generates a reply to the preceding messages (greedy, from the chat template's generation
prompt, stopping at the tokenizer's end-of-turn), and the reply counts as correct when it equals the reference
after stripping whitespace. The teacher-forced NLL is the mean cross-entropy of the reference reply's tokens.

Those tokens are the ones training would label: each dialogue goes through `data_pipeline.tokenize`'s
`tokenize_dialogue` with the run's own options (`data.system_message`, `data.train_reasoning`) and every assistant
turn but the last marked untrained, so the reply is found the same way for every template the data pipeline
accepts: `{% generation %}` markers, or derived from the template by prefix rendering (every released template).
A dialogue whose reply gets no token is refused with its line, never averaged in as zero.

Generation is batched: prompts of similar length together, padded on the left (a decoder continues from the last
position, so padding must come first), the tokenizer's padding side restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.files import write_atomic
from core.keys import IGNORE_INDEX, INPUT_IDS_KEY, LABELS_KEY
from data_pipeline.schema import TRAIN_KEY
from data_pipeline.sources import read_records
from data_pipeline.tokenize import TokenizeOptions, template_messages, tokenize_dialogue

logger = logging.getLogger(__name__)


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
    """Mean cross-entropy (nats) per reference reply token, over every dialogue's reply tokens."""
    reply_tokens: int = 0
    generations: list[Generation] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of the pass (generation and NLL)."""


@dataclass(frozen=True)
class HeldoutDialogue:
    """One held-out dialogue, where it came from (`file:line`) and its messages (the last one the reference)."""

    origin: str
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class EncodedDialogue:
    origin: str
    prompt_ids: list[int]
    """The chat template's rendering of the messages before the reply, with its generation prompt."""
    input_ids: list[int]
    labels: list[int]
    """The reference reply's tokens (and its end-of-turn token) as training labels them; IGNORE_INDEX elsewhere."""


def load_heldout(path: str | Path, max_samples: int) -> list[HeldoutDialogue]:
    dialogues = []
    for line_number, record in read_records(Path(path)):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{path}:{line_number}: a held-out dialogue must end with an assistant message")
        dialogues.append(HeldoutDialogue(f"{path}:{line_number}", messages))
    return dialogues[:max_samples]


def encode_heldout(
    dialogue: HeldoutDialogue, tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions
) -> EncodedDialogue:
    """The generation prompt and the labelled dialogue, with the reply's tokens found as training finds them.

    Raises:
        ValueError: the template leaves the reference reply without a token (named by its `file:line`).
    """
    *context, reference = dialogue.messages
    # Only the final reply is scored: earlier assistant turns are context, as `loss: 0` turns are in training.
    messages = [{**m, TRAIN_KEY: False} if m["role"] == "assistant" else m for m in context] + [reference]
    # Held-out dialogues are scored whole: truncation is a training-time choice.
    tokenized = tokenize_dialogue(messages, tokenizer, replace(options, max_length=10**9))
    labels = tokenized[LABELS_KEY]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            f"{dialogue.origin}: the chat template leaves the reference reply without a trained token, so its NLL "
            f"cannot be measured (prompt {context[-1].get('content')!r}); check the template with "
            "`python -m data_pipeline.inspect` on this file"
        )
    prompt = template_messages(context, tokenizer, options.merge_system)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return EncodedDialogue(dialogue.origin, list(prompt_ids[INPUT_IDS_KEY]), tokenized[INPUT_IDS_KEY], labels)


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def greedy_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Each prompt's greedy continuation up to the end-of-turn token, decoded; batched with left padding.

    The prompts are taken in order of length so a batch pads little; the replies come back in the given order.
    """
    replies: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in _batches(order, batch_size):
            padded = tokenizer.pad({INPUT_IDS_KEY: [prompts[i] for i in batch]}, return_tensors="pt").to(model.device)
            output = model.generate(
                **padded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, padded[INPUT_IDS_KEY].shape[1] :]
            for i, tokens in zip(batch, new_tokens, strict=True):
                replies[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return replies


@torch.no_grad()
def reply_nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoded: list[EncodedDialogue], batch_size: int = 16
) -> tuple[float, int]:
    """The summed cross-entropy (nats) of every labelled token, and their count: teacher-forced, batched."""
    total, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for batch in _batches(order, batch_size):
        width = max(len(encoded[i].input_ids) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: positions of the real tokens are unchanged
            n = len(encoded[i].input_ids)
            input_ids[row, :n] = torch.tensor(encoded[i].input_ids)
            labels[row, :n] = torch.tensor(encoded[i].labels)
            attention_mask[row, :n] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        targets = labels[:, 1:].to(model.device)
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += token_nll.item()
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def evaluate_heldout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogues: list[HeldoutDialogue],
    max_new_tokens: int,
    options: TokenizeOptions,
    batch_size: int = 16,
) -> HeldoutResult:
    """Greedy replies and exact match, and the reference replies' NLL, in batches of `batch_size` dialogues."""
    start = time.monotonic()
    was_training = model.training
    model.eval()
    encoded = [encode_heldout(dialogue, tokenizer, options) for dialogue in dialogues]
    replies = greedy_replies(model, tokenizer, [e.prompt_ids for e in encoded], max_new_tokens, batch_size)
    nll_sum, nll_count = reply_nll(model, tokenizer, encoded, batch_size)
    model.train(was_training)
    generations = [
        Generation(d.messages[-2].get("content") or "", d.messages[-1].get("content") or "", reply)
        for d, reply in zip(dialogues, replies, strict=True)
    ]
    seconds = time.monotonic() - start
    logger.info("Held-out pass: %d prompts in %.1f s (batches of %d)", len(dialogues), seconds, batch_size)
    return HeldoutResult(
        accuracy=sum(g.correct for g in generations) / max(len(generations), 1),
        nll=nll_sum / nll_count if nll_count else float("nan"),
        reply_tokens=nll_count,
        generations=generations,
        seconds=seconds,
    )


HELDOUT_TEXT, HELDOUT_JSON = "heldout.txt", "heldout.json"
# Bump when what a pass computes changes in a way the baseline key does not capture.
BASELINE_VERSION = 1


def baseline_key(
    model_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    heldout_file: str | Path,
    settings: dict[str, Any],
) -> str | None:
    """What a base model's held-out pass depends on, hashed: the model directory's files (names, sizes, modification
    times), the chat template, the held-out file's bytes, the pass's settings and torch's thread count (float32
    sums, hence the last digits, move with it). None for a model that is not a local directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_dir)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps(tokenizer.chat_template, sort_keys=True).encode())
    digest.update(Path(heldout_file).read_bytes())
    extra = {**settings, "threads": torch.get_num_threads(), "version": BASELINE_VERSION}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def load_result(path: Path) -> HeldoutResult:
    record = json.loads(path.read_text())
    return HeldoutResult(**{**record, "generations": [Generation(**g) for g in record["generations"]]})


def save_result(result: HeldoutResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(result), indent=1) + "\n")


def comparison_record(before: HeldoutResult, after: HeldoutResult) -> dict[str, Any]:
    """The numbers of `format_comparison`, for programs (`heldout.json`; `python -m evaluation.compare` reads it)."""
    return {
        "prompts": len(before.generations),
        "reply_tokens": before.reply_tokens,
        "before": {"exact_match": before.accuracy, "nll": before.nll, "seconds": round(before.seconds, 2)},
        "after": {"exact_match": after.accuracy, "nll": after.nll, "seconds": round(after.seconds, 2)},
        "generations": [
            {"prompt": b.prompt, "reference": b.reference, "before": b.generated, "after": a.generated}
            for b, a in zip(before.generations, after.generations, strict=True)
        ],
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
        f"held-out assistant NLL:            before {before.nll:.3f}  after {after.nll:.3f}"
        f"  ({before.reply_tokens} reply tokens)",
    ]
    return "\n".join(lines)


def _mark(generation: Generation) -> str:
    return f"{generation.generated.strip()!r} {'ok' if generation.correct else 'x'}"
