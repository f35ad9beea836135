"""The prepared-dataset cache, `stats.json`, the `prepare` command and one builder across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

import data_pipeline.prepare as prepare
from config.sources import parse_sources
from data_pipeline.cache import tokenizer_digest
from data_pipeline.stats import STATS_FILE, DatasetStats
from tests.helpers import REPO_ROOT, TOKENIZER_DIR, data_config, run_module, write_chats


def prepare_once(source: Path, cache_dir: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[Path, bool]:
    data = data_config(
        [str(source)], max_length=64, num_proc=1, validation_split_percentage=25.0, cache_dir=str(cache_dir)
    )
    return prepare.prepare_dataset(data, tokenizer, 0)


def test_same_inputs_reuse_the_cache_and_a_changed_source_rebuilds(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_chats(tmp_path / "c.jsonl", 8)
    directory, built = prepare_once(source, tmp_path / "cache", chatml_tokenizer)
    assert built and (directory / STATS_FILE).is_file()
    stats = json.loads((directory / STATS_FILE).read_text())
    assert stats["sources"][str(source)]["kept"] == 8 and stats["validation_samples"] == 2

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare, "build_prepared", must_not_build)
    data = data_config(
        [str(source)], max_length=64, num_proc=1, validation_split_percentage=25.0, cache_dir=str(tmp_path / "cache")
    )
    train, validation, reused_stats = prepare.build_datasets(data, chatml_tokenizer, 0)
    assert len(train) == 6 and len(validation) == 2 and reused_stats.train_samples == 6
    monkeypatch.undo()

    write_chats(source, 9)
    changed, built = prepare_once(source, tmp_path / "cache", chatml_tokenizer)
    assert built and changed != directory
    data = data_config(
        [str(source)], max_length=32, num_proc=1, validation_split_percentage=25.0, cache_dir=str(tmp_path / "cache")
    )
    _, built = prepare.prepare_dataset(data, chatml_tokenizer, 0)
    assert built  # another max_length is another dataset


def test_two_processes_prepare_the_data_once(tmp_path: Path) -> None:
    source = write_chats(tmp_path / "c.jsonl", 50)
    script = (
        "import sys; from transformers import AutoTokenizer; import data_pipeline.prepare as p\n"
        "from config.schema import DataConfig\n"
        f"tok = AutoTokenizer.from_pretrained({str(TOKENIZER_DIR)!r})\n"
        f"data = DataConfig(sources=[{str(source)!r}], max_length=64, num_proc=1, validation_split_percentage=0.0, "
        f"on_error='raise', cache_dir={str(tmp_path / 'cache')!r})\n"
        "d, built = p.prepare_dataset(data, tok, 0)\n"
        "print(built, d)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True) for _ in "01"]
    outputs = [rank.communicate(timeout=300)[0].split() for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    assert sorted(built for built, _ in outputs) == ["False", "True"]
    assert outputs[0][1] == outputs[1][1]


def test_prepare_command_prints_the_directory_last(tmp_path: Path) -> None:
    source = write_chats(tmp_path / "c.jsonl", 4)
    overrides = [
        f"data.sources=[{source}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_split_percentage=0",
    ]
    result = run_module("data_pipeline.prepare", overrides)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    directory = Path(lines[-1])
    assert directory.parent == (tmp_path / "cache").resolve() and (directory / STATS_FILE).is_file()
    assert any("c.jsonl" in line and "records" not in line for line in lines)


def test_up_weighted_records_repeat_in_training_only_and_never_cross_the_split(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    source = write_chats(tmp_path / "c.jsonl", 40)
    sources = [{"path": str(source), "weight": 2.5}]
    data = data_config(sources, max_length=64, num_proc=1, validation_split_percentage=20.0)
    train, validation, stats = prepare.build_datasets(data, chatml_tokenizer, seed=0)
    canonical, _ = prepare.load_canonical(parse_sources(sources), seed=0)
    copies = dict(zip(canonical["origin"], canonical["copies"], strict=True))
    train_counts: dict[str, int] = {}
    for origin in train["origin"]:
        train_counts[origin] = train_counts.get(origin, 0) + 1
    assert len(validation) == len(set(validation["origin"])) == 8  # 20% of the 40 distinct records, once each
    assert not set(validation["origin"]) & set(train_counts)
    assert train_counts == {origin: copies[origin] for origin in train_counts} and len(train_counts) == 32
    assert stats.sources[str(source)].samples == len(train) + len(validation) == stats.train_samples + 8


def test_nothing_left_to_tokenise_is_an_error_with_the_counts(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"data.sources: no record in .*empty.jsonl"):
        data = data_config([str(empty)], max_length=64, num_proc=1, validation_split_percentage=0.0)
        prepare.build_datasets(data, chatml_tokenizer, seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no chat here"}\n')
    with pytest.raises(ValueError, match=r"(?s)every record was dropped.*unknown_format 1"):
        data = data_config([str(bad)], max_length=64, num_proc=1, validation_split_percentage=0.0, on_error="skip")
        prepare.build_datasets(data, chatml_tokenizer, seed=0)


@pytest.mark.parametrize(("rows", "share", "seed"), [(40, 0.05, 0), (37, 0.25, 3), (1000, 0.013, 42)])
def test_the_split_drawn_by_index_is_the_one_train_test_split_draws(rows: int, share: float, seed: int) -> None:
    # The split is index arrays (no row read) but must stay datasets' own, so a prepared set keeps its rows and order.
    indices = np.arange(rows) * 3 + 1
    train, validation = prepare._split(indices, share, seed, DatasetStats(), "records")
    reference = Dataset.from_dict({"row": indices}).train_test_split(test_size=share, seed=seed)
    assert train.tolist() == reference["train"]["row"] and validation.tolist() == reference["test"]["row"]


def test_the_cache_key_ignores_a_tokenizer_call_s_padding_and_truncation() -> None:
    """A batched, padded call (the held-out pass runs one before training on a fresh cache) leaves the backend's
    padding and truncation set; the same tokenizer must still key the same prepared dataset (it keyed another in
    CI: the first run of a fresh checkout prepared a second copy), while a change to what decides the token ids
    still changes the key."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    before = tokenizer_digest(tokenizer)
    tokenizer.padding_side = "left"
    tokenizer(["a", "bb cc dd"], padding=True, truncation=True, max_length=2)
    assert json.loads(tokenizer.backend_tokenizer.to_str())["padding"] is not None  # the state the key must ignore
    assert tokenizer_digest(tokenizer) == before
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert tokenizer_digest(tokenizer) != before
