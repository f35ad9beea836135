"""Synthetic, learnable chat tasks for the embedded default.

Three letter-permutation tasks on three-letter words over a six-letter alphabet:
reversal, left rotation, and a two-turn dialogue (reverse, then "now rotate it
left") whose second answer depends on the first. A few-hundred-thousand-parameter
model learns them on two CPU cores in a minute, and they suit DFT: even an
untrained answer puts probability ~1/3 on each of the word's letters, so no
target token starts at `p ~ 0` (DFT's gradient is that of `-p`).

Every generator is a pure function of a `random.Random`, so the bundled files,
the held-out prompts and the base model's pre-training corpus are reproducible;
held-out dialogues are removed from the training files by `embedded.generate`.
"""

from __future__ import annotations

import random
from typing import Any

LETTERS = "abcdef"
WORD_LENGTH = 3
# Shared with the Alpaca rendering so both bundled schemas teach one prompt format.
REVERSE_INSTRUCTION = "Reverse the word."
ROTATE_INSTRUCTION = "Rotate the word left."
FOLLOW_UP = "Now rotate it left."

Message = dict[str, str]


def random_letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(WORD_LENGTH)]


def _spell(letters: list[str]) -> str:
    # Space-separated so each letter is one token whatever BPE merges.
    return " ".join(letters)


def reversal(rng: random.Random, letters: list[str] | None = None) -> list[Message]:
    letters = letters or random_letters(rng)
    return [
        {"role": "user", "content": f"{REVERSE_INSTRUCTION}\n{_spell(letters)}"},
        {"role": "assistant", "content": _spell(letters[::-1])},
    ]


def rotation(rng: random.Random, letters: list[str] | None = None) -> list[Message]:
    letters = letters or random_letters(rng)
    return [
        {"role": "user", "content": f"{ROTATE_INSTRUCTION}\n{_spell(letters)}"},
        {"role": "assistant", "content": _spell(letters[1:] + letters[:1])},
    ]


def follow_up(rng: random.Random, letters: list[str] | None = None) -> list[Message]:
    letters = letters or random_letters(rng)
    reversed_letters = letters[::-1]
    return [
        {"role": "user", "content": f"{REVERSE_INSTRUCTION}\n{_spell(letters)}"},
        {"role": "assistant", "content": _spell(reversed_letters)},
        {"role": "user", "content": FOLLOW_UP},
        {"role": "assistant", "content": _spell(reversed_letters[1:] + reversed_letters[:1])},
    ]


TASKS = {"reversal": reversal, "rotation": rotation, "follow_up": follow_up}


def sample_dialogue(rng: random.Random, task: str | None = None) -> list[Message]:
    """One dialogue of `task`, or of a uniformly drawn task when `task` is None."""
    name = task if task is not None else rng.choice(sorted(TASKS))
    return TASKS[name](rng)


def to_alpaca(messages: list[Message]) -> dict[str, Any]:
    """Render a single-turn dialogue whose prompt is `instruction\\ninput` as an Alpaca record."""
    instruction, word = messages[0]["content"].split("\n")
    return {"instruction": instruction, "input": word, "output": messages[1]["content"]}
