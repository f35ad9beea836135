"""Every bundled task's held-out set is held out: no held-out prompt word (the letters the task works on, the
numbers it adds) and no held-out reply appears anywhere in that task's training files, so a held-out answer can
only be computed, not recalled. Checked on the files as shipped."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.addition import ADDITION_DIR
from embedded.paths import SAMPLE_DIR
from embedded.preference import PREFERENCE_DIR, generate_pairs

TASKS = {
    "letters": (SAMPLE_DIR / "heldout.jsonl", [SAMPLE_DIR / "chat_letters.jsonl", SAMPLE_DIR / "reverse_alpaca.json"]),
    "addition": (
        ADDITION_DIR / "heldout.jsonl",
        [ADDITION_DIR / "additions_chat.jsonl", ADDITION_DIR / "additions_alpaca.json"],
    ),
}
SUM = re.compile(r"(\d+) \+ (\d+)")


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed record, however nested."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def training_text(paths: list[Path]) -> str:
    parsed = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        parsed += json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    return "\n".join(s for record in parsed for s in strings(record))


def heldout_items(messages: list[dict[str, str]]) -> list[str]:
    """What must not be seen in training: the word or question the prompt asks about, the numbers it adds (in
    either order), and every reply."""
    prompt = messages[0]["content"].splitlines()[-1]
    operands = [f"{a} + {b}" for m in SUM.finditer(prompt) for a, b in (m.groups(), m.groups()[::-1])]
    return [prompt, *operands, *(m["content"] for m in messages if m["role"] == "assistant")]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_heldout_prompt_word_or_reply_appears_in_the_training_files(task: str) -> None:
    heldout_path, training_paths = TASKS[task]
    text = training_text(training_paths)
    dialogues = [json.loads(line)["messages"] for line in heldout_path.read_text(encoding="utf-8").splitlines()]
    assert len(dialogues) == 60
    seen = [
        item
        for messages in dialogues
        for item in heldout_items(messages)
        if re.search(rf"(?<![\w]){re.escape(item)}(?![\w])", text)
    ]
    assert not seen, f"{task}: held-out prompts or replies found in the training files: {seen[:10]}"


def test_the_check_finds_a_heldout_reply_copied_into_training(tmp_path: Path) -> None:
    """The check itself can fail: a training file holding one held-out reply is caught."""
    heldout_path, (chat_path, alpaca_path) = TASKS["letters"]
    first = json.loads(heldout_path.read_text().splitlines()[0])["messages"]
    leaked = tmp_path / "chat.jsonl"
    leaked.write_text(chat_path.read_text() + json.dumps({"messages": first}) + "\n")
    text = training_text([leaked, alpaca_path])
    assert any(re.search(rf"(?<![\w]){re.escape(item)}(?![\w])", text) for item in heldout_items(first))


def test_no_heldout_preference_prompt_word_or_reply_appears_in_the_training_pairs() -> None:
    """The preference demo (`embedded.preference`): no held-out prompt word, chosen or rejected reply in training."""
    read = {name: PREFERENCE_DIR / f"{name}.jsonl" for name in ("train", "heldout")}
    pairs = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in read.items()}
    assert pairs == generate_pairs()  # the files are what the module generates
    text = training_text([read["train"]])
    heldout = [(p["question"].splitlines()[-1], p["chosen"], p["rejected"]) for p in pairs["heldout"]]
    assert len(heldout) == 60 and all(chosen != rejected for _, chosen, rejected in heldout)
    seen = [item for items in heldout for item in items if re.search(rf"(?<![\w]){re.escape(item)}(?![\w])", text)]
    assert not seen, f"preference: held-out prompts or replies found in the training pairs: {seen[:10]}"
