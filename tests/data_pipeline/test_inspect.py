"""`data_pipeline.inspect` shows exactly the assistant replies as trained."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from data_pipeline.inspect import render_marked
from data_pipeline.tokenize import TokenizeOptions, tokenize_dialogue
from tests.helpers import run_module

DIALOGUE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Later"},
]


def inspect(overrides: list[str]) -> str:
    """`python -m data_pipeline.inspect <overrides>`, which must succeed: its output."""
    result = run_module("data_pipeline.inspect", overrides)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_trained_tokens_are_marked(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    row = tokenize_dialogue(DIALOGUE, chatml_tokenizer, TokenizeOptions(128))
    text = render_marked(row["input_ids"], row["labels"], chatml_tokenizer)
    assert text == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Hello<|im_end|>⟧\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n⟦Later<|im_end|>⟧\n"
    )


def test_inspect_command_prints_marked_samples(tmp_path: Path) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text(json.dumps({"messages": DIALOGUE}) + "\n")
    overrides = [
        f"data.sources=[{source}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_split_percentage=0",
    ]
    stdout = inspect(overrides)
    assert "⟦Hello<|im_end|>⟧" in stdout and "⟦Later<|im_end|>⟧" in stdout


def test_inspect_shows_both_sides_of_a_preference_pair(tmp_path: Path) -> None:
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"question": "Hi", "chosen": "Hello", "rejected": "Go away"}) + "\n")
    overrides = [
        "training.objective=reward",
        f"data.sources=[{source}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_split_percentage=0",
    ]
    stdout = inspect(overrides)
    assert "--- sample 0 chosen" in stdout and "--- sample 0 rejected" in stdout
    assert "⟦Hello<|im_end|>⟧" in stdout and "⟦Go away<|im_end|>⟧" in stdout
