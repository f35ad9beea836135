"""What sits on top of the decoder, and the `transformers` auto class that builds it.

`CAUSAL_LM`: the language-model head (SFT, pre-training, DPO). `SCORE`: one scalar read at each sequence's last
token that is not padding, a reward model (`AutoModelForSequenceClassification` with `num_labels=1`); its config
must carry the pad id to find that token (a causal LM's config often has none).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

CAUSAL_LM, SCORE = "causal_lm", "score"
MODEL_HEADS = (CAUSAL_LM, SCORE)


def auto_model_class(head: str) -> Any:
    """The auto class that loads a model with `head`."""
    if head not in MODEL_HEADS:
        raise ValueError(f"model head {head!r} is not one of {list(MODEL_HEADS)}")
    return AutoModelForSequenceClassification if head == SCORE else AutoModelForCausalLM


def head_config(head: str, pad_token_id: int | None) -> dict[str, Any]:
    """The config values a `head` needs beyond the checkpoint's (keyword arguments of `from_pretrained`)."""
    return {"num_labels": 1, "pad_token_id": pad_token_id} if head == SCORE else {}


def head_of(model: Any) -> str:
    """`SCORE` for a model with a sequence-classification head (what `auto_model_class(SCORE)` builds), else
    `CAUSAL_LM`."""
    return SCORE if type(model).__name__.endswith("ForSequenceClassification") else CAUSAL_LM
