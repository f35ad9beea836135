"""Every config composes into the typed schema; bad keys and values fail before anything is built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import TrainingArguments

from config.schema import (
    GLOBAL_BATCH_KEY,
    OBJECTIVE_KEY,
    DataConfig,
    RunConfig,
    TrainingConfig,
    inert_training_settings,
    load_run_config,
    register_configs,
    to_run_config,
    to_training_arguments,
)
from tests.helpers import CONF_DIR, SAMPLE_SOURCES

register_configs()


def compose_run(overrides: list[str]) -> RunConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_run_config(compose(config_name="config", overrides=overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_training_arguments_field_is_settable() -> None:
    expected = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert expected | {OBJECTIVE_KEY, GLOBAL_BATCH_KEY} == {f.name for f in dataclasses.fields(TrainingConfig)}


def test_default_config_builds_training_arguments() -> None:
    run = compose_run([])
    assert run.model.name_or_path.startswith("embedded:")
    assert run.loss.type == "dft" and run.training.output_dir == run.output_dir
    args = to_training_arguments(run.training)
    assert args.learning_rate == run.training.learning_rate


@pytest.mark.parametrize(("world_size", "accumulation"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_global_batch_size_sets_gradient_accumulation_from_the_world_size(world_size: int, accumulation: int) -> None:
    run = compose_run(["training.global_batch_size=64", "training.per_device_train_batch_size=8"])
    args = to_training_arguments(run.training, world_size)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, accumulation)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size == 64


def test_without_global_batch_size_gradient_accumulation_is_the_configured_one() -> None:
    run = compose_run(["training.gradient_accumulation_steps=3"])
    assert to_training_arguments(run.training, 8).gradient_accumulation_steps == 3


def test_global_batch_size_that_the_ranks_cannot_split_is_refused_with_the_numbers() -> None:
    run = compose_run(["training.global_batch_size=64", "training.per_device_train_batch_size=8"])
    with pytest.raises(ValueError, match=r"global_batch_size=64 is not a multiple of .*\(8\) x ranks \(3\) = 24"):
        to_training_arguments(run.training, 3)


def test_global_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="training.global_batch_size must be a positive number of samples, not 0"):
        compose_run(["training.global_batch_size=0"])


@pytest.mark.parametrize("group", ["model", "training", "deepspeed", "logger", "debug"])
def test_every_group_option_composes(group: str) -> None:
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if option == "hf":
            overrides.append("model.name_or_path=/models/any")
        run = compose_run(overrides)
        if group == "training":
            to_training_arguments(dataclasses.replace(run.training, deepspeed=None))


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    run = compose_run([f"experiment={experiment}", "data.sources=[a.jsonl]"])
    assert isinstance(run, RunConfig)
    assert run.output_dir != "outputs/demo"


def test_training_arguments_are_overridable_by_their_usual_name() -> None:
    run = compose_run(["training.learning_rate=3e-4", "training.lr_scheduler_type=constant", "training.max_steps=7"])
    assert (run.training.learning_rate, run.training.lr_scheduler_type, run.training.max_steps) == (3e-4, "constant", 7)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.bogus_key=1", "Key 'bogus_key' not in 'TrainingConfig'"),
        ("+training.bogus_key=1", "unknown config key 'training.bogus_key'"),
        ("+model.nmae_or_path=x", "unknown config key 'model.nmae_or_path'"),
        ("loss.alhpa=0.5", "Key 'alhpa' not in 'LossConfig'"),
        ("training.max_steps=many", "training.max_steps"),
        ("data.max_length=long", "data.max_length"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(override: str, message: str) -> None:
    with pytest.raises(Exception) as raised:
        compose_run([override])
    assert message in f"{raised.value} {raised.value.__cause__}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.type=mse", "loss.type='mse' is not one of"),
        ("loss.alpha=1.5", "loss.alpha=1.5 must be in [0, 1]"),
        ("data.sources=[]", "data.sources is empty"),
        ("logger.backend=mlflow", "logger.backend='mlflow'"),
        ("model.dtype=int8", "model.dtype='int8'"),
        ("training.hub_token=hf_secret", "training.hub_token: set the HF_TOKEN environment variable"),
    ],
)
def test_bad_values_fail_with_the_key(override: str, message: str) -> None:
    with pytest.raises(Exception) as raised:
        compose_run([override])
    assert message in str(raised.value)


def test_missing_data_sources_in_experiment_is_reported() -> None:
    with pytest.raises(Exception, match="data.sources"):
        compose_run(["experiment=qwen2_5_7b_zero3"])


def test_conf_yaml_files_open_with_a_comment() -> None:
    for path in Path(CONF_DIR).rglob("*.yaml"):
        assert path.read_text().lstrip().startswith("#"), f"{path} should open with its purpose"


def test_config_refuses_a_budget_below_max_length_and_a_budget_without_packing() -> None:
    with pytest.raises(ValueError, match="data.packing_max_tokens=256 is below data.max_length=512"):
        DataConfig(sources=SAMPLE_SOURCES, max_length=512, packing=True, packing_max_tokens=256)
    with pytest.raises(ValueError, match="data.packing=false"):
        DataConfig(sources=SAMPLE_SOURCES, packing_max_tokens=1024)
    assert DataConfig(sources=SAMPLE_SOURCES, max_length=512, packing=True, packing_max_tokens=512)


@pytest.mark.parametrize(
    "overrides",
    [["training.output_dir=runs/a"], ["output_dir=runs/a"], ["output_dir=runs/a", "training.output_dir=runs/a"]],
)
def test_output_dir_and_training_output_dir_are_one_directory(overrides: list[str]) -> None:
    run = load_run_config(overrides)
    assert run.output_dir == run.training.output_dir == "runs/a"


def test_two_different_output_directories_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"output_dir=runs/a and training.output_dir=runs/b name two directories"):
        load_run_config(["output_dir=runs/a", "training.output_dir=runs/b"])


def test_settings_that_would_do_nothing_are_named() -> None:
    assert inert_training_settings(load_run_config([]).training) == []
    inert = inert_training_settings(
        load_run_config(["training.save_steps=4", "training.save_total_limit=2", "training.eval_strategy=no"]).training
    )
    assert inert == [
        "training.save_steps=4 does nothing with training.save_strategy=no "
        "(set training.save_strategy=steps to save checkpoints)",
        "training.save_total_limit=2 does nothing with training.save_strategy=no "
        "(set training.save_strategy=steps to save checkpoints)",
        "training.eval_steps=50 does nothing with training.eval_strategy=no "
        "(set training.eval_strategy=steps to evaluate)",
    ]
