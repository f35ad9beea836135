"""Preference pairs: every layout into one canonical pair, tokenised with a shared prompt, truncated comparably,
prepared and cached, and batched by `PairCollator`."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

import data_pipeline.prepare as prepare
from config.schema import DataConfig
from core.keys import (
    CHOSEN_INPUT_IDS_KEY,
    CHOSEN_LABELS_KEY,
    IGNORE_INDEX,
    LENGTH_KEY,
    ORIGIN_KEY,
    REJECTED_INPUT_IDS_KEY,
    REJECTED_LABELS_KEY,
    SOURCE_ID_KEY,
    SOURCE_IDS_KEY,
)
from data_pipeline.collate import PairCollator, SampleIdCollator
from data_pipeline.pairs import to_pair, tokenize_pairs, truncate_pair
from data_pipeline.sources import DataFormatError
from data_pipeline.tokenize import TokenizeOptions
from embedded.preference import PREFERENCE_DIR
from tests.helpers import data_config

LLAMAFACTORY_DIR = Path(__file__).parent / "llamafactory"
SYSTEM, QUESTION, GOOD, BAD = "Be brief.", "What is the capital of France?", "Paris.", "Lyon, I think."
PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
CANONICAL = {
    "messages": PROMPT,
    "chosen": [{"role": "assistant", "content": GOOD}],
    "rejected": [{"role": "assistant", "content": BAD}],
}
# The same pair in every layout users bring.
LAYOUTS = {
    "seed question": {"question": QUESTION, "system": SYSTEM, "chosen": GOOD, "rejected": BAD},
    "trl standard": {"prompt": QUESTION, "system": SYSTEM, "chosen": GOOD, "rejected": BAD},
    "trl implicit prompt": {
        "chosen": [*PROMPT, {"role": "assistant", "content": GOOD}],
        "rejected": [*PROMPT, {"role": "assistant", "content": BAD}],
    },
    "trl explicit prompt": {
        "prompt": PROMPT,
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    },
    "llamafactory sharegpt": {
        "conversations": [{"from": "human", "value": QUESTION}],
        "system": SYSTEM,
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
    "llamafactory alpaca": {"instruction": QUESTION, "input": "", "system": SYSTEM, "chosen": GOOD, "rejected": BAD},
    "llamafactory v1": {
        "chosen_messages": [
            {"role": "system", "content": [{"type": "text", "value": SYSTEM}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "value": QUESTION}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": GOOD}], "loss_weight": 1.0},
        ],
        "rejected_messages": [
            {"role": "system", "content": [{"type": "text", "value": SYSTEM}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "value": QUESTION}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": BAD}], "loss_weight": 1.0},
        ],
    },
}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def pairs_config(sources: list[Any], **overrides: Any) -> DataConfig:
    sources = [{"path": str(source), "format": "pairs"} if isinstance(source, Path) else source for source in sources]
    return data_config(sources, **{"num_proc": 1, "cache_dir": None, "max_length": 128, **overrides})


def labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads_into_the_same_canonical_pair(layout: str) -> None:
    pair, dropped = to_pair(LAYOUTS[layout], Path("p.jsonl"), 1)
    assert pair == CANONICAL and dropped == []


def test_fields_rename_pair_columns_and_unknown_columns_are_counted() -> None:
    record = {"query": QUESTION, "good": GOOD, "bad": BAD, "score": 3}
    pair, dropped = to_pair(record, Path("p.jsonl"), 1, {"question": "query", "chosen": "good", "rejected": "bad"})
    assert pair == {**CANONICAL, "messages": PROMPT[1:]} and dropped == ["score"]


def test_tools_and_multi_turn_history_are_kept() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    record = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": QUESTION},
        ],
        "tools": json.dumps(tools),
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    }
    pair, _ = to_pair(record, Path("p.jsonl"), 1)
    assert [m["role"] for m in pair["messages"]] == ["user", "assistant", "user"] and pair["tools"] == tools


@pytest.mark.parametrize(
    ("record", "reason", "words"),
    [
        ({"question": QUESTION, "chosen": GOOD}, "missing_rejected", "missing 'rejected'"),
        ({"question": QUESTION, "rejected": BAD}, "missing_chosen", "missing 'chosen'"),
        ({"question": QUESTION, "chosen": GOOD, "rejected": GOOD}, "chosen_equals_rejected", "the same reply"),
        ({"question": QUESTION, "chosen": GOOD, "rejected": "  "}, "empty_reply", "'rejected' is an empty reply"),
        ({"chosen": GOOD, "rejected": BAD}, "missing_prompt", "no prompt"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": GOOD}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": BAD}],
            },
            "prompts_differ",
            "share no prompt",
        ),
        (
            {"prompt": PROMPT, "chosen": [*PROMPT, {"role": "assistant", "content": GOOD}], "rejected": BAD},
            "reply_not_assistant",
            "'chosen' starts with a system turn",
        ),
    ],
)
def test_bad_pairs_are_located_errors_with_a_reason(record: dict[str, Any], reason: str, words: str) -> None:
    with pytest.raises(DataFormatError, match="^bad.jsonl:7: ") as error:
        to_pair(record, Path("bad.jsonl"), 7)
    assert error.value.reason == reason and words in str(error.value)


def test_labels_cover_exactly_each_reply_and_the_prompt_is_shared(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    history = {"role": "assistant", "content": "earlier answer"}
    pair = {**CANONICAL, "messages": [*PROMPT, history, {"role": "user", "content": "again?"}]}
    columns = tokenize_pairs([pair], chatml_tokenizer, TokenizeOptions(max_length=512))
    row = {name: column[0].as_py() for name, column in columns.items()}
    chosen_ids, rejected_ids = row[CHOSEN_INPUT_IDS_KEY], row[REJECTED_INPUT_IDS_KEY]
    for ids, labels, reply in (
        (chosen_ids, row[CHOSEN_LABELS_KEY], GOOD),
        (rejected_ids, row[REJECTED_LABELS_KEY], BAD),
    ):
        assert chatml_tokenizer.decode(labelled(ids, labels)) == f"{reply}<|im_end|>"  # the history is not trained
    prompt = len(chosen_ids) - len(chatml_tokenizer.encode(f"{GOOD}<|im_end|>\n"))
    assert prompt > 0 and chosen_ids[:prompt] == rejected_ids[:prompt]
    assert row[LENGTH_KEY] == max(len(chosen_ids), len(rejected_ids)) and row["refusal_reason"] is None


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_truncation_keeps_one_prompt_for_both_and_cuts_the_replies_to_fit(
    truncation: str, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    long_question = " ".join(f"word{i}" for i in range(40))
    pair = {
        **CANONICAL,
        "messages": [{"role": "user", "content": long_question}],
        "chosen": [{"role": "assistant", "content": " ".join(f"good{i}" for i in range(30))}],
    }
    whole = tokenize_pairs([pair], chatml_tokenizer, TokenizeOptions(max_length=10**6))
    full_chosen = whole[CHOSEN_INPUT_IDS_KEY][0].as_py()
    full_labels = whole[CHOSEN_LABELS_KEY][0].as_py()
    prompt = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)
    max_length = prompt + 10
    columns = tokenize_pairs([pair], chatml_tokenizer, TokenizeOptions(max_length, truncation))
    row = {name: column[0].as_py() for name, column in columns.items()}
    assert row["truncated"] and row["num_trainable_tokens"] > 0
    chosen, rejected = row[CHOSEN_INPUT_IDS_KEY], row[REJECTED_INPUT_IDS_KEY]
    assert len(chosen) <= max_length and len(rejected) <= max_length
    kept_prompt = next(i for i, label in enumerate(row[CHOSEN_LABELS_KEY]) if label != IGNORE_INDEX)
    assert chosen[:kept_prompt] == rejected[:kept_prompt]
    # The chosen reply keeps its start; keep_end cuts the prompt from the left to make room for it.
    assert chosen[kept_prompt:] == full_chosen[prompt : prompt + len(chosen) - kept_prompt]
    if truncation == "keep_end":
        assert kept_prompt < prompt and chosen[:kept_prompt] == full_chosen[prompt - kept_prompt : prompt]
    else:
        assert kept_prompt == prompt and chosen[:prompt] == full_chosen[:prompt]


def test_truncate_pair_rule() -> None:
    assert truncate_pair(10, 5, 3, 20, "keep_start") == (slice(0, 10), 5)  # fits: nothing cut
    assert truncate_pair(10, 15, 3, 20, "keep_start") == (slice(0, 10), 10)
    assert truncate_pair(30, 15, 3, 20, "keep_start") == (slice(0, 20), 0)  # no reply left: dropped by the caller
    assert truncate_pair(30, 5, 3, 20, "keep_end") == (slice(15, 30), 5)
    assert truncate_pair(30, 50, 3, 20, "keep_end") == (slice(20, 30), 10)  # half of max_length kept for the prompt
    assert truncate_pair(10, 15, 3, 20, "drop") is None


def test_prepare_reads_every_layout_and_counts_bad_pairs(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    bad = [{"question": QUESTION, "chosen": GOOD}, {"question": QUESTION, "chosen": GOOD, "rejected": GOOD}]
    source = write_jsonl(tmp_path / "pairs.jsonl", [*LAYOUTS.values(), *bad])
    with pytest.raises(DataFormatError, match=rf"^{source}:8: missing 'rejected'"):
        prepare.build_datasets(pairs_config([source]), chatml_tokenizer, 0)
    train, validation, stats = prepare.build_datasets(pairs_config([source], on_error="skip"), chatml_tokenizer, 0)
    counts = stats.sources[str(source)]
    assert validation is None and len(train) == len(LAYOUTS) == counts.kept
    assert counts.dropped == {"missing_rejected": 1, "chosen_equals_rejected": 1} and counts.records == 9
    rows = train.to_list()
    assert len({json.dumps([r[CHOSEN_INPUT_IDS_KEY], r[REJECTED_INPUT_IDS_KEY]]) for r in rows}) == 1  # same pair
    assert rows[0][SOURCE_ID_KEY] == 0 and rows[0][ORIGIN_KEY] == f"{source}:1"
    assert stats.pairs and "preference pairs" in stats.summary()


def test_a_pair_too_long_is_dropped_and_counted(tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    long = {"question": " ".join(["word"] * 200), "chosen": GOOD, "rejected": BAD}
    source = write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS["seed question"], long])
    for truncation, reason in (
        ("drop", "longer_than_max_length"),
        ("keep_start", "no_trainable_tokens_after_truncation"),
    ):
        train, _, stats = prepare.build_datasets(
            pairs_config([source], max_length=64, truncation=truncation), chatml_tokenizer, 0
        )
        assert len(train) == 1 and stats.sources[str(source)].dropped == {reason: 1}


def test_a_template_rendering_the_prompt_differently_is_refused(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer = copy.deepcopy(chatml_tokenizer)  # the fixture is shared by the session
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{%- for message in messages %}",
        "{%- if messages[-1]['content'] == 'Paris.' %}CHOSEN{% endif %}{%- for message in messages %}",
        1,
    )
    assert "CHOSEN" in tokenizer.chat_template
    source = write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS["seed question"]])
    with pytest.raises(ValueError, match=rf"^{source}:1: the chat template renders the prompt differently"):
        prepare.build_datasets(pairs_config([source]), tokenizer, 0)


@pytest.mark.parametrize(("name", "pairs"), [("dpo_en_demo.json.gz", 300), ("v1_dpo_demo.jsonl.gz", 10)])
def test_llamafactory_pair_files_prepare_with_their_pair_counts(
    name: str, pairs: int, tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    source = tmp_path / name.removesuffix(".gz")
    with gzip.open(LLAMAFACTORY_DIR / name) as packed, source.open("wb") as plain:
        shutil.copyfileobj(packed, plain)
    # keep_end: the long prompts of the tiny vocabulary are cut from the left, no pair is lost
    data = pairs_config([source], max_length=1024, truncation="keep_end", validation_split_percentage=10.0, num_proc=2)
    train, validation, stats = prepare.build_datasets(data, chatml_tokenizer, 0)
    counts = stats.sources[str(source)]
    assert counts.records == counts.kept == pairs and counts.dropped == {} and counts.dropped_columns == {}
    assert len(train) + len(validation) == pairs and stats.validation_split == "pairs"
    origins = set(train[ORIGIN_KEY]) | set(validation[ORIGIN_KEY])
    assert len(origins) == pairs  # a pair is in training or validation, whole


def test_the_prepare_cache_is_reused(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "pairs.jsonl", list(LAYOUTS.values()) * 2)
    data = pairs_config([source], cache_dir=str(tmp_path / "cache"), validation_split_percentage=25.0)
    train, validation, _ = prepare.build_datasets(data, chatml_tokenizer, 0)

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare, "build_prepared", must_not_build)
    again, again_validation, stats = prepare.build_datasets(data, chatml_tokenizer, 0)
    assert again.to_list() == train.to_list() and len(again_validation) == len(validation) == 4
    assert stats.pairs and stats.train_samples == 10
    assert set(again.column_names) >= {CHOSEN_INPUT_IDS_KEY, REJECTED_LABELS_KEY, LENGTH_KEY, SOURCE_ID_KEY}


def test_packing_is_refused_for_pairs(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS["seed question"]])
    with pytest.raises(ValueError, match="data.packing=true with preference pairs"):
        pairs_config([source], packing=True)


def test_pair_collator_lays_out_chosen_then_rejected(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    features = [
        {
            CHOSEN_INPUT_IDS_KEY: [1, 2, 3],
            CHOSEN_LABELS_KEY: [IGNORE_INDEX, 2, 3],
            REJECTED_INPUT_IDS_KEY: [1, 4],
            REJECTED_LABELS_KEY: [IGNORE_INDEX, 4],
            LENGTH_KEY: 3,
            SOURCE_ID_KEY: 1,
            ORIGIN_KEY: "a.jsonl:1",
        },
        {
            CHOSEN_INPUT_IDS_KEY: [5, 6],
            CHOSEN_LABELS_KEY: [IGNORE_INDEX, 6],
            REJECTED_INPUT_IDS_KEY: [5, 7, 8, 9],
            REJECTED_LABELS_KEY: [IGNORE_INDEX, 7, 8, 9],
            LENGTH_KEY: 4,
            SOURCE_ID_KEY: 0,
            ORIGIN_KEY: "b.jsonl:2",
        },
    ]
    collator = SampleIdCollator(PairCollator(chatml_tokenizer))
    assert set(collator.dataset_columns) >= {CHOSEN_INPUT_IDS_KEY, REJECTED_LABELS_KEY, SOURCE_ID_KEY, ORIGIN_KEY}
    batch = collator(features)
    pad = chatml_tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[1, 2, 3, pad], [5, 6, pad, pad], [1, 4, pad, pad], [5, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [ignore, 2, 3, ignore],
        [ignore, 6, ignore, ignore],
        [ignore, 4, ignore, ignore],
        [ignore, 7, 8, 9],
    ]
    assert torch.equal(batch[SOURCE_IDS_KEY], torch.tensor([1, 0])) and batch["origins"] == ["a.jsonl:1", "b.jsonl:2"]


def test_the_bundled_preference_demo_prepares_whole(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    sources = [PREFERENCE_DIR / "train.jsonl", PREFERENCE_DIR / "heldout.jsonl"]
    _, _, stats = prepare.build_datasets(pairs_config(sources), chatml_tokenizer, 0)
    assert [(s.records, s.kept, s.dropped) for s in stats.sources.values()] == [(1200, 1200, {}), (60, 60, {})]
