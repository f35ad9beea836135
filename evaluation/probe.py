"""Is a model pre-trained at all? Its average p(correct) on prepared samples, against the 1/vocab of a random one.

DFT weights each token's cross-entropy by the model's own detached p(correct), so its gradient is that of `-p`:
on a model that gives every token p ~ 1/vocab (a random initialisation) it barely moves (measured on the embedded
tiny Qwen2: 300 DFT steps from random init raised the held-out NLL from 6.3 to 12.0, where CE lowered it to 2.9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, PreTrainedTokenizerBase

from core.keys import IGNORE_INDEX

# A model counts as untrained when its average p(correct) is below this many times 1/vocab. A random
# initialisation scores about 1 (its logits are nearly flat); any pre-trained LM scores orders of magnitude more
# on chat data (the embedded base: 0.37 with 318 tokens, i.e. 118 times 1/vocab; released LLMs: 0.3-0.7 over
# 32k-256k tokens, 10^4 times and more).
UNTRAINED_TIMES_UNIFORM = 10.0


@torch.no_grad()
def average_p_correct(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], batch_size: int = 8
) -> float:
    """Mean over the trainable tokens of `rows` (prepared samples: `input_ids`, `labels`) of p(correct)."""
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate([{k: row[k] for k in ("input_ids", "labels")} for row in rows[start : start + batch_size]])
        labels = batch["labels"][:, 1:].to(model.device)
        inputs = {key: batch[key].to(model.device) for key in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits
        log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        valid = labels != IGNORE_INDEX
        p_correct = log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0].exp()
        total += float(p_correct[valid].sum())
        count += int(valid.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no trainable token in the probe's samples")
    return total / count


def untrained_message(p_correct: float, vocab_size: int, model_name: str, samples: int) -> str | None:
    """Why DFT cannot train this model, or None when it looks pre-trained."""
    if p_correct >= UNTRAINED_TIMES_UNIFORM / vocab_size:
        return None
    return (
        f"{model_name} looks untrained: its average p(correct) on {samples} prepared samples is {p_correct:.2e}, "
        f"{p_correct * vocab_size:.1f} times 1/vocab (1/{vocab_size}). DFT weights each token's loss by p, so its "
        "gradient is that of -p and barely moves such a model: start from a pre-trained model (or compare "
        "loss.type=ce arms only)"
    )
