"""The bundled preference demo: pairs on the letters tasks, for `training.objective=reward|dpo` on the embedded model.

    python -m embedded.preference

writes `data/preference/train.jsonl` and `data/preference/heldout.jsonl` in the seed users' reward-model format,
`{"question", "chosen", "rejected"}`. The question is a reversal or rotation prompt of `embedded.tasks` (the tasks
the embedded base is pre-trained on and the SFT demo trains), `chosen` its correct reply and `rejected` a plausible
wrong one: another permutation of the same letters (the other task's answer, the word unchanged, or a rotation the
other way), so the two replies differ only in the order of the letters and the base's own task knowledge decides
which one it prefers. Held-out pairs are drawn on letter sets of their own, as `embedded.generate` holds out the SFT
dialogues: every reply of a pair is a permutation of its prompt's letters, so no held-out prompt word and no
held-out reply (chosen or rejected) appears in the training pairs.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

from core.files import write_atomic
from embedded.paths import REPO_ROOT
from embedded.tasks import LETTERS, REVERSE_INSTRUCTION, ROTATE_INSTRUCTION, WORD_LENGTH

PREFERENCE_DIR = REPO_ROOT / "data" / "preference"
TRAIN_PAIRS = 1200
HELDOUT_PAIRS = 60
HELDOUT_LETTER_SETS = 10
SEED = 4321


def _spell(letters: list[str] | tuple[str, ...]) -> str:
    return " ".join(letters)


# Each task: its instruction, its correct answer, and the plausible wrong answers a rejected reply is drawn from.
_TASKS = {
    REVERSE_INSTRUCTION: (
        lambda w: w[::-1],
        (lambda w: w[1:] + w[:1], lambda w: list(w), lambda w: w[-1:] + w[:-1]),
    ),
    ROTATE_INSTRUCTION: (
        lambda w: w[1:] + w[:1],
        (lambda w: w[::-1], lambda w: list(w), lambda w: w[-1:] + w[:-1]),
    ),
}


def preference_pair(rng: random.Random, letters: list[str]) -> dict[str, Any] | None:
    """A pair on the word `letters` for a drawn task, or None when no wrong answer differs from the right one."""
    instruction = rng.choice(sorted(_TASKS))
    correct, wrong_answers = _TASKS[instruction]
    chosen = correct(letters)
    wrong = [answer for answer in (w(letters) for w in wrong_answers) if answer != chosen]
    if not wrong:
        return None
    return {
        "question": f"{instruction}\n{_spell(letters)}",
        "chosen": _spell(chosen),
        "rejected": _spell(rng.choice(wrong)),
    }


def generate_pairs() -> dict[str, list[dict[str, Any]]]:
    """Training pairs on most letter sets, held-out pairs on `HELDOUT_LETTER_SETS` sets of three letters."""
    rng = random.Random(SEED)
    words = [list(word) for word in itertools.product(LETTERS, repeat=WORD_LENGTH)]
    distinct = sorted({tuple(sorted(word)) for word in words if len(set(word)) == WORD_LENGTH})
    heldout_sets = set(rng.sample(distinct, HELDOUT_LETTER_SETS))
    heldout_words = [word for word in words if tuple(sorted(word)) in heldout_sets]
    training_words = [word for word in words if tuple(sorted(word)) not in heldout_sets]

    def pairs(candidates: list[list[str]], count: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < count:
            if (pair := preference_pair(rng, rng.choice(candidates))) is not None:
                out.append(pair)
        return out

    return {"train": pairs(training_words, TRAIN_PAIRS), "heldout": pairs(heldout_words, HELDOUT_PAIRS)}


def main() -> None:
    PREFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    for name, records in generate_pairs().items():
        write_atomic(PREFERENCE_DIR / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
