"""Synthetic, learnable chat tasks for the embedded default.

Three small task families that a few-hundred-thousand-parameter model can learn
on two CPU cores in a minute: addition of small numbers, reversing a short
word, and a two-turn follow-up ("now add k") that needs the previous answer.
Every generator is a pure function of a `random.Random`, so the bundled files,
the held-out prompts and the base model's pre-training corpus are reproducible
and disjoint (they are drawn with different seeds and the held-out prompts are
removed from the training files by `embedded.generate`).
"""

from __future__ import annotations

import random
from typing import Any

LETTERS = "abcdefghij"
MAX_OPERAND = 29
# Shared with the Alpaca rendering so both bundled schemas teach one prompt format.
REVERSE_INSTRUCTION = "Reverse the word."

Message = dict[str, str]


def addition(rng: random.Random) -> list[Message]:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return [
        {"role": "user", "content": f"What is {a}+{b}?"},
        {"role": "assistant", "content": str(a + b)},
    ]


def random_letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(3, 4))]


def reversal(rng: random.Random) -> list[Message]:
    # Letters are space-separated so each is one token whatever BPE merges.
    letters = random_letters(rng)
    return [
        {"role": "user", "content": f"{REVERSE_INSTRUCTION}\n{' '.join(letters)}"},
        {"role": "assistant", "content": " ".join(reversed(letters))},
    ]


def follow_up(rng: random.Random) -> list[Message]:
    a, b, k = rng.randint(0, 9), rng.randint(0, 9), rng.randint(1, 9)
    return [
        {"role": "user", "content": f"What is {a}+{b}?"},
        {"role": "assistant", "content": str(a + b)},
        {"role": "user", "content": f"Now add {k}."},
        {"role": "assistant", "content": str(a + b + k)},
    ]


TASKS = {"addition": addition, "reversal": reversal, "follow_up": follow_up}


def sample_dialogue(rng: random.Random, task: str | None = None) -> list[Message]:
    """One dialogue of `task`, or of a uniformly drawn task when `task` is None."""
    name = task if task is not None else rng.choice(sorted(TASKS))
    return TASKS[name](rng)


def to_alpaca(messages: list[Message]) -> dict[str, Any]:
    """Render a single-turn reversal dialogue as an Alpaca record."""
    instruction, word = messages[0]["content"].split("\n")
    return {"instruction": instruction, "input": word, "output": messages[1]["content"]}
