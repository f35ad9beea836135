"""Regenerate the bundled sample data and the shipped tokenizer.

    python -m embedded.generate

Writes, deterministically:
  data/sample/chat_letters.jsonl      ChatML `messages`, rotation and two-turn follow-ups
  data/sample/reverse_alpaca.json     Alpaca `instruction/input/output` JSON array, word reversal
  data/sample/heldout.jsonl           held-out dialogues of all three tasks, never trained on
  data/addition/                      the released-model demo's additions (embedded/addition.py)
  embedded/assets/tokenizer/          the byte-level BPE with the ChatML template
"""

from __future__ import annotations

import json
import random

from core.files import write_atomic
from embedded.addition import write_addition
from embedded.paths import SAMPLE_DIR, TOKENIZER_DIR
from embedded.tasks import Message, follow_up, reversal, rotation, sample_dialogue, to_alpaca
from embedded.tokenizer import save_tokenizer, train_tokenizer

HELDOUT_PER_TASK = 20
CHAT_SAMPLES = 2400
ALPACA_SAMPLES = 1200


def _word(messages: list[Message]) -> str:
    return messages[0]["content"].split("\n")[1]


def generate_samples() -> dict[str, list]:
    """Held-out dialogues first, each on its own word; training dialogues never use a held-out word."""
    rng = random.Random(1234)
    heldout: list[list[Message]] = []
    heldout_words: set[str] = set()
    for task in (reversal, rotation, follow_up):
        drawn = 0
        while drawn < HELDOUT_PER_TASK:
            dialogue = task(rng)
            if _word(dialogue) not in heldout_words:
                heldout_words.add(_word(dialogue))
                heldout.append(dialogue)
                drawn += 1

    chat, alpaca = [], []
    while len(chat) < CHAT_SAMPLES:
        dialogue = rng.choice((rotation, follow_up))(rng)
        if _word(dialogue) not in heldout_words:
            chat.append({"messages": dialogue})
    while len(alpaca) < ALPACA_SAMPLES:
        dialogue = reversal(rng)
        if _word(dialogue) not in heldout_words:
            alpaca.append(to_alpaca(dialogue))
    return {"heldout": [{"messages": m} for m in heldout], "chat": chat, "alpaca": alpaca}


def tokenizer_corpus(n: int = 4000) -> list[str]:
    rng = random.Random(99)
    return [
        "\n".join(m["content"] for m in sample_dialogue(rng))
        + "\nuser\nassistant\nsystem\nYou are a helpful assistant."
        for _ in range(n)
    ]


def main() -> None:
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    samples = generate_samples()
    write_atomic(SAMPLE_DIR / "chat_letters.jsonl", "".join(json.dumps(r) + "\n" for r in samples["chat"]))
    write_atomic(SAMPLE_DIR / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in samples["heldout"]))
    write_atomic(SAMPLE_DIR / "reverse_alpaca.json", json.dumps(samples["alpaca"], indent=1) + "\n")
    save_tokenizer(train_tokenizer(tokenizer_corpus()), TOKENIZER_DIR)
    write_addition()


if __name__ == "__main__":
    main()
