"""`training.objective` and the raw-text keys: checked at start-up, each mistake naming its key or source."""

from __future__ import annotations

import pytest

from config.schema import DataConfig, load_run_config, start_up_warnings, to_training_arguments
from tests.helpers import SAMPLE_SOURCES

PRETRAIN = "training.objective=pretrain"


def test_sft_is_the_default_and_the_objective_is_not_a_trainer_argument() -> None:
    run = load_run_config([])
    assert run.training.objective == "sft" and not run.data.raw_text and run.data.padding_free is False
    args = to_training_arguments(load_run_config([PRETRAIN, "data.sources=[docs.jsonl]"]).training)
    assert not hasattr(args, "objective")


def test_under_pretrain_a_source_without_a_format_reads_as_text() -> None:
    run = load_run_config([PRETRAIN, "data.sources=[docs.jsonl,{path: more.json, weight: 2}]"])
    assert [(spec.path, spec.format, spec.weight) for spec in run.data.specs] == [
        ("docs.jsonl", "text", 1.0),
        ("more.json", "text", 2.0),
    ]
    assert run.data.raw_text and run.data.pretrain_blocks == "packed"


def test_packing_follows_the_block_mode_unless_set() -> None:
    sources = "data.sources=[notes.txt]"
    assert load_run_config([PRETRAIN, sources]).data.padding_free is True
    assert load_run_config([PRETRAIN, sources, "data.pretrain_blocks=concat"]).data.padding_free is False
    assert load_run_config([PRETRAIN, sources, "data.packing=false"]).data.padding_free is False
    assert load_run_config([PRETRAIN, sources, "data.packing_max_tokens=256"]).data.padding_free is True
    assert load_run_config(["data.packing=true"]).data.padding_free is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.objective=orpo"], "training.objective='orpo' is not one of ['sft', 'pretrain', 'reward', 'dpo']"),
        ([PRETRAIN, "data.pretrain_blocks=grouped"], "data.pretrain_blocks='grouped' is not one of"),
        (
            [PRETRAIN, "data.sources=[{path: chats.jsonl, format: chatml}]"],
            "training.objective=pretrain trains on raw text, but data.sources[0] ('chats.jsonl') is chat (format "
            "chatml): chat takes training.objective=sft",
        ),
        (
            ["data.sources=[book.txt]"],
            "training.objective=sft trains on chat, but data.sources[0] ('book.txt') is raw text (format text): "
            "raw text takes training.objective=pretrain",
        ),
        (
            ["training.objective=dpo", "data.sources=[{path: chats.jsonl, format: sharegpt}]"],
            "training.objective=dpo trains on preference pairs, but data.sources[0] ('chats.jsonl') is chat",
        ),
        (
            ["training.objective=reward", "data.sources=[pairs.jsonl,{path: book.txt}]"],
            "data.sources[1] ('book.txt') is raw text but data.sources[0] is preference pairs",
        ),
        (["training.objective=dpo", "preference.beta=0"], "preference.beta=0.0 must be > 0"),
        (
            ["training.objective=reward", "preference.precompute_reference=true"],
            "preference.precompute_reference=true is for training.objective=dpo with model.adapter=none: it frees "
            "the reference copy of a full fine-tune; training.objective=reward has no reference",
        ),
        (
            ["training.objective=dpo", "model.adapter=lora", "preference.precompute_reference=true"],
            "a model.adapter=lora run's reference is its base with the adapter off, no copy",
        ),
        (
            [PRETRAIN, "data.sources=[book.txt,{path: chats.jsonl, format: sharegpt}]"],
            "data.sources[1] ('chats.jsonl') is chat but data.sources[0] is raw text",
        ),
        (
            [PRETRAIN, "data.sources=[book.txt]", "data.pretrain_blocks=concat", "data.packing_max_tokens=1024"],
            "data.packing_max_tokens is set but data.packing=false",
        ),
    ],
)
def test_bad_objective_settings_fail_at_start_up_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        load_run_config(overrides)
    assert message in str(raised.value)


def test_preference_objectives_read_their_sources_as_pairs_unless_told() -> None:
    for objective in ("reward", "dpo"):
        run = load_run_config([f"training.objective={objective}", "data.sources=[a.jsonl,{path: b.json}]"])
        assert [spec.format for spec in run.data.specs] == ["pairs", "pairs"] and run.data.pairs
        assert not run.data.raw_text


def test_a_txt_source_is_text_whatever_the_objective_and_chat_data_stays_chat() -> None:
    assert [spec.format for spec in DataConfig(sources=["a.txt", "b.txt.gz"]).specs] == ["text", "text"]
    assert DataConfig(sources=SAMPLE_SOURCES).raw_text is False


def test_pretraining_with_the_dft_loss_is_warned_about() -> None:
    (warning,) = start_up_warnings(load_run_config([PRETRAIN, "data.sources=[notes.txt]"]))
    assert warning.startswith("training.objective=pretrain with loss.type=dft") and "loss.type=ce" in warning
    assert start_up_warnings(load_run_config([PRETRAIN, "data.sources=[notes.txt]", "loss.type=ce"])) == []
    assert start_up_warnings(load_run_config(["experiment=pretrain_demo"])) == []
    assert start_up_warnings(load_run_config([])) == []  # SFT with DFT is the point of the project


def test_loss_settings_a_preference_objective_ignores_are_warned_about() -> None:
    run = load_run_config(["training.objective=dpo", "data.sources=[p.jsonl]", "loss.type=ce", "loss.chunk_size=64"])
    assert start_up_warnings(run) == [
        "loss.type=ce does nothing with training.objective=dpo: its pairwise loss is set by preference.* (the fused "
        "head serves DPO)"
    ]  # loss.chunk_size sizes DPO's fused head: no warning
    assert start_up_warnings(load_run_config(["training.objective=reward", "data.sources=[p.jsonl]"])) == []
