"""`data.truncation`: what a sample longer than `data.max_length` keeps, and how each choice is counted.

The case that motivates it: a long prompt (tool schemas, a long system message) before a short answer. Keeping
the start cuts the whole answer off; keeping the end keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from config.schema import DataConfig
from core.keys import IGNORE_INDEX, INPUT_IDS_KEY, LABELS_KEY
from data_pipeline.prepare import build_datasets, prepare_dataset
from data_pipeline.tokenize import (
    NUM_TRAINABLE_KEY,
    TRUNCATED_KEY,
    TokenizeOptions,
    tokenize_dialogue,
    tokenize_dialogues,
)

LONG_PROMPT = [
    {"role": "system", "content": "Rules: " + " ".join(f"rule{i} is binding." for i in range(60))},
    {"role": "user", "content": "Reverse the word.\nabc"},
    {"role": "assistant", "content": "c b a"},
]
SHORT = [{"role": "user", "content": "Reverse the word.\nab"}, {"role": "assistant", "content": "b a"}]
MAX_LENGTH = 64


def row_of(messages: list[dict], tokenizer: PreTrainedTokenizerBase, truncation: str) -> dict:
    options = TokenizeOptions(MAX_LENGTH, truncation)
    columns = tokenize_dialogues([(messages, None)], tokenizer, options)
    row = {key: column[0].as_py() for key, column in columns.items()}
    assert row == tokenize_dialogue(messages, tokenizer, options)  # batch = reference
    return row


def test_keep_start_keep_end_and_drop_on_a_long_prompt(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    full = tokenize_dialogue(LONG_PROMPT, chatml_tokenizer, TokenizeOptions(10**6))
    assert len(full[INPUT_IDS_KEY]) > 2 * MAX_LENGTH and full[NUM_TRAINABLE_KEY] > 0

    start = row_of(LONG_PROMPT, chatml_tokenizer, "keep_start")
    assert start[INPUT_IDS_KEY] == full[INPUT_IDS_KEY][:MAX_LENGTH] and start[NUM_TRAINABLE_KEY] == 0

    end = row_of(LONG_PROMPT, chatml_tokenizer, "keep_end")
    assert end[INPUT_IDS_KEY] == full[INPUT_IDS_KEY][-MAX_LENGTH:] and end[LABELS_KEY] == full[LABELS_KEY][-MAX_LENGTH:]
    assert end[NUM_TRAINABLE_KEY] == full[NUM_TRAINABLE_KEY] and end[TRUNCATED_KEY]
    trained = [label for label in end[LABELS_KEY] if label != IGNORE_INDEX]
    assert chatml_tokenizer.decode(trained) == "c b a<|im_end|>"

    dropped = row_of(LONG_PROMPT, chatml_tokenizer, "drop")
    assert dropped[INPUT_IDS_KEY] == [] and dropped[NUM_TRAINABLE_KEY] == 0 and dropped[TRUNCATED_KEY]

    for truncation in ("keep_start", "keep_end", "drop"):  # a sample that fits is never touched
        assert row_of(SHORT, chatml_tokenizer, truncation) == tokenize_dialogue(
            SHORT, chatml_tokenizer, TokenizeOptions(10**6)
        )


@pytest.mark.parametrize(
    ("truncation", "kept", "truncated", "dropped"),
    [
        ("keep_start", 1, 0, {"no_trainable_tokens_after_truncation": 2}),
        ("keep_end", 3, 2, {}),
        ("drop", 1, 0, {"longer_than_max_length": 2}),
    ],
)
def test_each_choice_is_counted_per_source(
    chatml_tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
    truncation: str,
    kept: int,
    truncated: int,
    dropped: dict[str, int],
) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (LONG_PROMPT, SHORT, LONG_PROMPT)))
    data = DataConfig(sources=[str(path)], max_length=MAX_LENGTH, num_proc=1, truncation=truncation, cache_dir=None)
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    (source,) = stats.sources.values()
    assert (source.records, source.kept, source.truncated, source.dropped) == (3, kept, truncated, dropped)
    assert source.kept + sum(source.dropped.values()) == source.records
    assert len(train) == kept and all(len(ids) <= MAX_LENGTH for ids in train[INPUT_IDS_KEY])


def test_the_truncation_choice_is_part_of_the_cache_key(
    chatml_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": LONG_PROMPT}) + "\n" + json.dumps({"messages": SHORT}) + "\n")
    directories = {
        truncation: prepare_dataset(
            DataConfig(
                sources=[str(path)],
                max_length=MAX_LENGTH,
                num_proc=1,
                truncation=truncation,
                cache_dir=str(tmp_path / "cache"),
            ),
            chatml_tokenizer,
            seed=0,
        )[0]
        for truncation in ("keep_start", "keep_end")
    }
    assert directories["keep_start"] != directories["keep_end"]


def test_an_unknown_truncation_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data.truncation='keep_middle' is not one of"):
        DataConfig(sources=["chats.jsonl"], truncation="keep_middle")
