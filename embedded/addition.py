"""The released-model demo's task: adding two two-digit numbers, answered as the whole equation.

`embedded:smollm2-135m` (a released 135M instruct model) answers "What is 37 + 45?" with a paragraph of
working ("To add 37 and 45, we need to ...") and often the wrong sum; fine-tuning teaches it the terse
`37 + 45 = 82` and makes its sums more reliable. The reply restates the operands so that every reply is a string
of its own: a held-out reply can then be checked absent from the training files, not only its prompt.

Held-out dialogues are drawn first; no training record (ChatML or Alpaca) uses a held-out pair of operands, in
either order, so neither a held-out prompt nor its reply appears anywhere in the training files
(tests/embedded/test_bundled_tasks.py checks the files as shipped).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from core.files import write_atomic
from embedded.paths import REPO_ROOT

ADDITION_DIR = REPO_ROOT / "data" / "addition"
INSTRUCTION = "Add the two numbers."
HELDOUT_SAMPLES, CHAT_SAMPLES, ALPACA_SAMPLES = 60, 800, 400

Pair = tuple[int, int]


def question(pair: Pair) -> str:
    return f"What is {pair[0]} + {pair[1]}?"


def equation(pair: Pair) -> str:
    return f"{pair[0]} + {pair[1]} = {pair[0] + pair[1]}"


def _pair(rng: random.Random) -> Pair:
    return rng.randint(10, 99), rng.randint(10, 99)


def _unordered(pair: Pair) -> frozenset[int]:
    return frozenset(pair)


def generate_addition() -> dict[str, list]:
    """Held-out dialogues on pairs of their own, then ChatML and Alpaca training records on the other pairs."""
    rng = random.Random(2024)
    heldout: dict[frozenset[int], Pair] = {}
    while len(heldout) < HELDOUT_SAMPLES:
        pair = _pair(rng)
        heldout.setdefault(_unordered(pair), pair)

    def training_pairs(n: int) -> list[Pair]:
        pairs = []
        while len(pairs) < n:
            pair = _pair(rng)
            if _unordered(pair) not in heldout:
                pairs.append(pair)
        return pairs

    return {
        "heldout": [
            {"messages": [{"role": "user", "content": question(p)}, {"role": "assistant", "content": equation(p)}]}
            for p in heldout.values()
        ],
        "chat": [
            {"messages": [{"role": "user", "content": question(p)}, {"role": "assistant", "content": equation(p)}]}
            for p in training_pairs(CHAT_SAMPLES)
        ],
        "alpaca": [
            {"instruction": INSTRUCTION, "input": f"{p[0]} + {p[1]}", "output": equation(p)}
            for p in training_pairs(ALPACA_SAMPLES)
        ],
    }


def write_addition(directory: Path = ADDITION_DIR) -> None:
    samples = generate_addition()
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "additions_chat.jsonl", "".join(json.dumps(r) + "\n" for r in samples["chat"]))
    write_atomic(directory / "additions_alpaca.json", json.dumps(samples["alpaca"], indent=1) + "\n")
    write_atomic(directory / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in samples["heldout"]))
