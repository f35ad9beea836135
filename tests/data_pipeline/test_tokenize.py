"""Assistant-only labels: decoding the labelled tokens gives exactly the assistant replies, and the batch path
(`tokenize_dialogues`) gives token for token what `apply_chat_template` does (`tokenize_dialogue`)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from config.sources import parse_sources
from core.keys import IGNORE_INDEX
from data_pipeline.prepare import build_datasets, load_canonical
from data_pipeline.tokenize import (
    NUM_TRAINABLE_KEY,
    REFUSAL_KEY,
    REFUSAL_REASON_KEY,
    TOKENIZED_KEYS,
    Dialogue,
    TokenizeOptions,
    check_assistant_mask,
    tokenize_dialogue,
    tokenize_dialogues,
)
from tests.helpers import QWEN_STYLE_TOOLS_TEMPLATE, SAMPLE_SOURCES, data_config, write_mixed_corpus

DIALOGUE = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 3+4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Now add 2."},
    {"role": "assistant", "content": "9"},
]

# A Llama-3 style layout (headers, <|eot_id|>), written with generation markers.
LLAMA3_STYLE_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen_style_tokenizer(chatml_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = QWEN_STYLE_TOOLS_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def llama3_style_tokenizer(chatml_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_STYLE_TEMPLATE
    return tokenizer


def labelled_text(row: dict, tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])


@pytest.mark.parametrize("name", ["chatml", "llama3_style"])
def test_labels_cover_every_assistant_turn_and_nothing_else(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    row = tokenize_dialogue(DIALOGUE, tokenizer, TokenizeOptions(512))
    end_of_turn = tokenizer.eos_token
    assert labelled_text(row, tokenizer) == f"7{end_of_turn}9{end_of_turn}"
    assert len(row["labels"]) == len(row["input_ids"]) == len(row["attention_mask"])
    trained = [i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX]
    assert all(row["labels"][i] == row["input_ids"][i] for i in trained)
    check_assistant_mask(tokenizer)


@pytest.mark.parametrize("name", ["chatml", "llama3_style"])
def test_a_turn_flagged_not_trained_gets_no_label(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    flagged = [dict(m) for m in DIALOGUE]
    flagged[2]["train"] = False
    row = tokenize_dialogue(flagged, tokenizer, TokenizeOptions(512))
    assert labelled_text(row, tokenizer) == f"9{tokenizer.eos_token}"


def test_flags_a_marked_template_cannot_honour_refuse_that_record_only(
    chatml_tokenizer: PreTrainedTokenizerBase,
) -> None:
    # Generation markers around the last reply only: one run for two turns, so a flag cannot say which to clear.
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = (
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if loop.last %}{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
        "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{{- '\\n' }}{%- endfor %}"
    )
    flagged = [dict(m) for m in DIALOGUE]
    flagged[2]["train"] = False
    columns = tokenize_dialogues([(flagged, None), (DIALOGUE, None)], tokenizer, TokenizeOptions(512))
    assert columns[REFUSAL_REASON_KEY].to_pylist() == ["chat_template_refused", None]
    (problem, _) = columns[REFUSAL_KEY].to_pylist()
    assert (
        problem.startswith("the chat template's assistant mask has 1 runs for 2 assistant turns")
        and "\n" not in problem
    )
    assert columns[NUM_TRAINABLE_KEY].to_pylist()[0] == 0 and columns[NUM_TRAINABLE_KEY].to_pylist()[1] > 0


def test_tools_reach_a_template_that_uses_them(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = (
        "{%- if tools %}{{- '<|im_start|>system\\n' + (tools | map(attribute='function.name') | join(',')) }}"
        "{{- '<|im_end|>\\n' }}{%- endif %}" + chatml_tokenizer.chat_template
    )
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    row = tokenize_dialogue(DIALOGUE[1:3], tokenizer, TokenizeOptions(512), tools=tools)
    assert "lookup" in tokenizer.decode(row["input_ids"]) and labelled_text(row, tokenizer) == "7<|im_end|>"


def test_truncation_keeps_the_start_and_counts_trainable_tokens(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    full = tokenize_dialogue(DIALOGUE, chatml_tokenizer, TokenizeOptions(512))
    first_reply_end = next(i for i, t in enumerate(full["labels"]) if t != IGNORE_INDEX) + 2
    cut = tokenize_dialogue(DIALOGUE, chatml_tokenizer, TokenizeOptions(first_reply_end))
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][:first_reply_end]
    assert cut["num_trainable_tokens"] == 2 and full["num_trainable_tokens"] == 4


def test_build_datasets_on_the_sample_files(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    data = data_config(SAMPLE_SOURCES, max_length=128, num_proc=2, validation_split_percentage=5.0)
    train, validation, stats = build_datasets(data, chatml_tokenizer, seed=0)
    records = sum(s.records for s in stats.sources.values())
    assert records == len(train) + len(validation)
    assert all(s.kept + sum(s.dropped.values()) == s.records for s in stats.sources.values())
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels", "source_id", "origin"}
    assert abs(len(validation) - 0.05 * records) <= 1
    # Each sample names its source (by position in the report) and the file:line it was read from.
    names = list(stats.sources)
    for row in train.select(range(0, len(train), 7)):
        path, line = row["origin"].rsplit(":", 1)
        assert names[row["source_id"]] == path
        assert 1 <= int(line) <= sum(1 for _ in open(path, "rb"))


def test_samples_truncated_to_nothing_trainable_are_dropped_and_counted(
    chatml_tokenizer: PreTrainedTokenizerBase,
) -> None:
    # 12 tokens keep the ChatML prompt of a two-turn addition but cut every reply.
    data = data_config(SAMPLE_SOURCES[:1], max_length=12, num_proc=1, validation_split_percentage=0.0)
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    source = stats.sources[SAMPLE_SOURCES[0]]
    assert source.dropped.get("no_trainable_tokens_after_truncation", 0) > 0
    assert source.kept + sum(source.dropped.values()) == source.records == 2400
    assert len(train) == source.kept
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in train["labels"])


def assert_batch_matches_reference(
    dialogues: list[Dialogue], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> None:
    columns = tokenize_dialogues(dialogues, tokenizer, TokenizeOptions(max_length))
    assert set(columns) == set(TOKENIZED_KEYS)
    for i, (messages, tools) in enumerate(dialogues):
        expected = tokenize_dialogue(messages, tokenizer, TokenizeOptions(max_length), tools)
        got = {key: columns[key][i].as_py() for key in TOKENIZED_KEYS}
        assert got == expected, f"dialogue {i} differs from apply_chat_template: {messages}"


def canonical_dialogues(sources: list[str]) -> list[Dialogue]:
    rows, _ = load_canonical(parse_sources(sources), on_error="raise")
    dialogues = [json.loads(conversation) for conversation in rows["conversation"]]
    return [(dialogue["messages"], dialogue.get("tools")) for dialogue in dialogues]


@pytest.mark.parametrize("name", ["chatml", "llama3_style", "qwen_style"])
@pytest.mark.parametrize("max_length", [10**6, 40])
def test_batch_matches_apply_chat_template_on_the_sample_data(
    name: str, max_length: int, request: pytest.FixtureRequest
) -> None:
    dialogues = canonical_dialogues(SAMPLE_SOURCES)
    # Every third record keeps the test quick and still covers both files, 1-2 turn dialogues and truncation.
    assert_batch_matches_reference(dialogues[::3], request.getfixturevalue(f"{name}_tokenizer"), max_length)


@pytest.mark.parametrize("name", ["chatml", "llama3_style", "qwen_style"])
def test_batch_matches_apply_chat_template_on_tools_and_every_format(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    write_mixed_corpus(tmp_path)
    dialogues = canonical_dialogues([str(tmp_path)])
    assert any(tools for _, tools in dialogues) and any("tool_calls" in m for d, _ in dialogues for m in d)
    assert any(m.get("train") is False for d, _ in dialogues for m in d)
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    for max_length in (10**6, 24):
        assert_batch_matches_reference(dialogues, tokenizer, max_length)


def random_text(rng: random.Random) -> str:
    # Spaces and newlines at the edges of replies (trimmed from byte-level offsets), digits split one by one,
    # multi-byte characters, and a special token written inside the content.
    pieces = ["a", "b c", " ", "  ", "\n", "\n\n", "7", "42", "é", "日本", "🙂", "<|im_end|>", "x\ty", "?!"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))


@pytest.mark.parametrize("name", ["chatml", "llama3_style", "qwen_style"])
def test_batch_matches_apply_chat_template_on_random_dialogues(name: str, request: pytest.FixtureRequest) -> None:
    rng = random.Random(0)
    dialogues = []
    for _ in range(150):
        messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            reply = {"role": "assistant", "content": random_text(rng)}
            if rng.random() < 0.2:
                reply["train"] = False
            messages += [{"role": "user", "content": random_text(rng)}, reply]
        dialogues.append((messages, None))
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    for max_length in (10**6, 30):
        assert_batch_matches_reference(dialogues, tokenizer, max_length)
