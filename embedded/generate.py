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

import itertools
import json
import random

from core.files import write_atomic
from embedded.addition import write_addition
from embedded.paths import SAMPLE_DIR, TOKENIZER_DIR
from embedded.tasks import LETTERS, WORD_LENGTH, Message, follow_up, reversal, rotation, sample_dialogue, to_alpaca
from embedded.tokenizer import save_tokenizer, train_tokenizer

HELDOUT_PER_TASK = 20
# 10 of the 20 sets of three different letters: their 60 words, 20 per task.
HELDOUT_LETTER_SETS = 10
CHAT_SAMPLES = 2400
ALPACA_SAMPLES = 1200


def _word(messages: list[Message]) -> str:
    return messages[0]["content"].split("\n")[1]


def _letters(word: str) -> tuple[str, ...]:
    """A word's letters as a multiset: every answer of every task on the word is a permutation of them."""
    return tuple(sorted(word.split()))


def generate_samples() -> dict[str, list]:
    """Held-out dialogues on words of their own letter sets; training dialogues on the other letter sets.

    Each task's answers are permutations of the prompt word's letters (reversal, rotation, and rotation after
    reversal), so holding out whole letter sets keeps every held-out prompt word and every held-out reply out of
    the training files: a held-out answer cannot be recalled from training, only computed.
    """
    rng = random.Random(1234)
    distinct = sorted({_letters(" ".join(w)) for w in itertools.product(LETTERS, repeat=WORD_LENGTH)})
    distinct = [letters for letters in distinct if len(set(letters)) == WORD_LENGTH]
    heldout_sets = set(rng.sample(distinct, HELDOUT_LETTER_SETS))
    heldout_words = [" ".join(p) for letters in sorted(heldout_sets) for p in itertools.permutations(letters)]
    rng.shuffle(heldout_words)
    heldout = [
        {"messages": task(rng, word.split())}
        for i, task in enumerate((reversal, rotation, follow_up))
        for word in heldout_words[i * HELDOUT_PER_TASK : (i + 1) * HELDOUT_PER_TASK]
    ]

    def training_dialogue(tasks: tuple) -> list[Message]:
        while _letters(_word(dialogue := rng.choice(tasks)(rng))) in heldout_sets:
            pass
        return dialogue

    chat = [{"messages": training_dialogue((rotation, follow_up))} for _ in range(CHAT_SAMPLES)]
    alpaca = [to_alpaca(training_dialogue((reversal,))) for _ in range(ALPACA_SAMPLES)]
    return {"heldout": heldout, "chat": chat, "alpaca": alpaca}


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
