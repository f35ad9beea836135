"""Checkpoints: atomic saves with a manifest, `auto` resume that skips broken ones, the world-size check.

`cluster.manifest` (what a complete checkpoint holds, publishing one), `cluster.resume` (which checkpoint a run
resumes from, and whether it can) and `cluster.atomic_save` (the Trainer mixin). The resolution tests lay out fake
checkpoint directories (`make_checkpoint`); the save tests run a real (tiny, CPU) Trainer with
`AtomicCheckpointMixin` and look at what it leaves on disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer

from cluster.atomic_save import AtomicCheckpointMixin
from cluster.manifest import (
    LATEST_MARKER,
    MANIFEST_FILE,
    STAGING_DIR,
    build_manifest,
    checkpoint_problem,
    publish_checkpoint,
)
from cluster.resume import check_resume_compatible, find_checkpoints, resolve_resume_checkpoint
from cluster.universal import load_universal_config
from tests.helpers import REPO_ROOT, VOCAB, make_checkpoint, tiny_qwen2, training_args

ZERO3_JSON = str(REPO_ROOT / "ds_config" / "zero3.json")
ZERO2_JSON = str(REPO_ROOT / "ds_config" / "zero2.json")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("value", [None, ""])
def test_unset_starts_fresh_even_with_checkpoints(tmp_path: Path, value: str | None) -> None:
    make_checkpoint(tmp_path, 4)
    assert resolve_resume_checkpoint(value, tmp_path) is None


def test_auto_picks_the_highest_step_not_the_last_in_name_order(tmp_path: Path) -> None:
    for step in (9, 10, 2):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-99.tmp").mkdir()  # not a checkpoint-<step> name
    (tmp_path / "checkpoint-50").write_text("a file, not a directory")
    assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-10")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-9", "checkpoint-2"]


@pytest.mark.parametrize(
    "weights", ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "global_step"]
)
def test_legacy_checkpoint_without_manifest_is_accepted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, weights: str
) -> None:
    make_checkpoint(tmp_path, 3, weights=weights, manifest=False)
    with caplog.at_level(logging.INFO, logger="cluster.resume"):
        assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-3")
    assert any(f"has no {MANIFEST_FILE}" in w for w in warnings_of(caplog)), caplog.text


def test_checkpoint_with_a_matching_manifest_is_accepted_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_checkpoint(tmp_path, 3, weights="global_step", world_size=2, zero_stage=3)
    with caplog.at_level(logging.INFO, logger="cluster.resume"):
        assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-3")
    assert not warnings_of(caplog)


def test_auto_skips_legacy_checkpoints_missing_state_or_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_checkpoint(tmp_path, 4)
    no_state = make_checkpoint(tmp_path, 8, state=False, manifest=False)
    no_weights = make_checkpoint(tmp_path, 12, weights=None, manifest=False)
    with caplog.at_level(logging.INFO, logger="cluster.resume"):
        assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-4")
    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    assert str(no_weights) in warnings[0] and "model weights" in warnings[0]
    assert str(no_state) in warnings[1] and "trainer_state.json" in warnings[1]


def _delete_shard(checkpoint: Path) -> None:
    next(checkpoint.glob("global_step*/*rank_1_*")).unlink()


def _truncate_weights(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").write_bytes(b"weig")


def _edit_state(checkpoint: Path) -> None:
    (checkpoint / "trainer_state.json").write_text("[]")  # same size, other bytes


def _break_manifest(checkpoint: Path) -> None:
    (checkpoint / MANIFEST_FILE).write_text('{"files": ')


@pytest.mark.parametrize(
    ("damage", "weights", "reason"),
    [
        (_delete_shard, "global_step", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
        (_truncate_weights, "model.safetensors", "model.safetensors has 4 bytes, checkpoint_manifest.json says 7"),
        (_edit_state, "model.safetensors", "trainer_state.json does not match its checksum"),
        (_break_manifest, "model.safetensors", "unreadable checkpoint_manifest.json"),
    ],
    ids=["missing shard", "wrong size", "wrong checksum", "corrupt manifest"],
)
def test_auto_skips_a_checkpoint_that_does_not_match_its_manifest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, weights: str, reason: str
) -> None:
    make_checkpoint(tmp_path, 4, weights=weights, world_size=2)
    damaged = make_checkpoint(tmp_path, 8, weights=weights, world_size=2)
    damage(damaged)
    with caplog.at_level(logging.INFO, logger="cluster.resume"):
        assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-4")
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and f"Skipping incomplete checkpoint {damaged}" in warnings[0], warnings
    assert reason in warnings[0], warnings[0]


def test_auto_ignores_a_save_in_staging_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_checkpoint(tmp_path, 4)
    partial = make_checkpoint(tmp_path / STAGING_DIR, 8, manifest=False)  # every file there but the manifest
    with caplog.at_level(logging.INFO, logger="cluster.resume"):
        assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-4")
    assert any(f"Ignoring {partial}: a checkpoint save that did not finish" in w for w in warnings_of(caplog))


@pytest.mark.parametrize("layout", ["missing dir", "empty dir", "only incomplete"])
def test_auto_without_a_complete_checkpoint_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, layout: str
) -> None:
    output_dir = tmp_path / "run"
    if layout != "missing dir":
        output_dir.mkdir()
    if layout == "only incomplete":
        make_checkpoint(output_dir, 5, state=False, manifest=False)
    with caplog.at_level(logging.INFO, logger="cluster.resume"):
        assert resolve_resume_checkpoint("auto", output_dir) is None
    assert "starting fresh" in caplog.text


def test_explicit_path_is_returned(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "elsewhere", 7)
    assert resolve_resume_checkpoint(str(checkpoint), tmp_path / "run") == str(checkpoint)


def test_explicit_missing_path_fails_naming_key_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "checkpoint-3"
    with pytest.raises(ValueError, match=rf"training.resume_from_checkpoint='{missing}': does not exist.*'auto'"):
        resolve_resume_checkpoint(str(missing), tmp_path)


def test_explicit_file_path_fails(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a directory"):
        resolve_resume_checkpoint(str(path), tmp_path)


def test_explicit_incomplete_path_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = make_checkpoint(tmp_path, 2, weights=None, manifest=False)
    with caplog.at_level(logging.WARNING, logger="cluster.resume"):
        assert resolve_resume_checkpoint(str(checkpoint), tmp_path) == str(checkpoint)
    assert "looks incomplete" in caplog.text and "model weights" in caplog.text


def test_publish_renames_writes_the_manifest_and_then_the_marker(tmp_path: Path) -> None:
    staging = make_checkpoint(tmp_path / STAGING_DIR, 6, manifest=False)
    stale = make_checkpoint(tmp_path, 6, state=False, manifest=False)  # an earlier, broken save of step 6
    (stale / "leftover.bin").write_bytes(b"x")
    publish_checkpoint(staging, tmp_path / "checkpoint-6", build_manifest(staging, 6, 1, None))
    final = tmp_path / "checkpoint-6"
    assert not (tmp_path / STAGING_DIR).exists(), "the staging directory is left behind"
    assert sorted(p.name for p in final.iterdir()) == [MANIFEST_FILE, "model.safetensors", "trainer_state.json"]
    assert checkpoint_problem(final) is None
    assert (tmp_path / LATEST_MARKER).read_text() == "checkpoint-6\n"


@pytest.mark.parametrize(
    ("saved", "deepspeed_config", "reason"),
    [
        (
            {"world_size": 2, "zero_stage": None, "weights": "global_step", "manifest": False},
            ZERO3_JSON,
            "saved with an unknown ZeRO stage (no checkpoint_manifest.json)",
        ),
        (
            {"world_size": 4, "zero_stage": 2, "weights": "global_step", "manifest": True},
            ZERO2_JSON,
            "it has no DeepSpeed tag directory to convert (latest names 'global_step9')",
        ),
    ],
    ids=["zero3 no manifest (stage unknown)", "zero2 without the tag latest names"],
)
def test_unconvertible_zero_checkpoint_resumed_with_another_world_size_is_refused_with_the_reason(
    tmp_path: Path, saved: dict, deepspeed_config: str, reason: str
) -> None:
    checkpoint = make_checkpoint(tmp_path, 4, **saved)
    (checkpoint / "latest").write_text("global_step9")  # a tag directory that is not there
    with pytest.raises(ValueError) as error:
        check_resume_compatible(str(checkpoint), 1, deepspeed_config)
    message = str(error.value)
    assert f"training.resume_from_checkpoint='{checkpoint}'" in message
    assert f"sharded over {saved['world_size']} ranks and this run has 1" in message
    assert "cannot be converted to a universal checkpoint" in message and reason in message
    assert f"Resume with {saved['world_size']} ranks" in message
    assert f"model.name_or_path={checkpoint} training.resume_from_checkpoint=null" in message


@pytest.mark.parametrize(("stage", "deepspeed_config"), [(3, ZERO3_JSON), (2, ZERO2_JSON)])
def test_zero_checkpoint_of_another_world_size_resumes_through_a_universal_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stage: int, deepspeed_config: str
) -> None:
    checkpoint = make_checkpoint(tmp_path, 4, weights="global_step", world_size=2, zero_stage=stage)
    (checkpoint / "latest").write_text("global_step4")
    with caplog.at_level(logging.WARNING, logger="cluster.resume"):
        assert check_resume_compatible(str(checkpoint), 1, deepspeed_config) is True
    assert "saved by 2 rank(s), this run has 1" in caplog.text and "universal checkpoint" in caplog.text


def test_load_universal_config_adds_the_flag_and_keeps_the_rest() -> None:
    config = load_universal_config(ZERO3_JSON)
    assert config["checkpoint"] == {"load_universal": True}
    assert {key: value for key, value in config.items() if key != "checkpoint"} == json.loads(
        Path(ZERO3_JSON).read_text()
    )


def test_zero_checkpoint_with_the_same_world_size_passes(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path, 4, weights="global_step", world_size=2, zero_stage=3)
    assert check_resume_compatible(str(checkpoint), 2, ZERO3_JSON) is False


@pytest.mark.parametrize(
    ("saved_stage", "deepspeed_config", "expected"),
    [
        (3, None, "saved with DeepSpeed ZeRO-3, this run has no DeepSpeed"),
        (None, ZERO3_JSON, "saved with no DeepSpeed, this run has DeepSpeed ZeRO-3"),
        (2, ZERO3_JSON, "saved with DeepSpeed ZeRO-2, this run has DeepSpeed ZeRO-3"),
    ],
)
def test_deepspeed_choice_other_than_the_checkpoints_is_refused(
    tmp_path: Path, saved_stage: int | None, deepspeed_config: str | None, expected: str
) -> None:
    weights = "model.safetensors" if saved_stage is None else "global_step"
    checkpoint = make_checkpoint(tmp_path, 4, weights=weights, zero_stage=saved_stage)
    with pytest.raises(ValueError, match=expected):
        check_resume_compatible(str(checkpoint), 1, deepspeed_config)


def test_plain_checkpoint_resumes_on_another_world_size_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = make_checkpoint(tmp_path, 4, world_size=1)
    with caplog.at_level(logging.WARNING, logger="cluster.resume"):
        check_resume_compatible(str(checkpoint), 2, None)
    assert "saved by 1 rank(s), this run has 2" in caplog.text and "gradient_accumulation_steps x ranks" in caplog.text


class AtomicTrainer(AtomicCheckpointMixin, Trainer):
    """The stock Trainer with atomic checkpoints, as train.py's Trainer mixes them in."""


def token_dataset(rows: int = 8, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": input_ids.tolist()})


def test_trainer_saves_whole_checkpoints_rotates_them_and_tracks_the_best(tmp_path: Path) -> None:
    args = training_args(
        tmp_path,
        per_device_train_batch_size=2,
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the best is the first step's: the one rotation must keep
        learning_rate=1e-2,
    )
    data = token_dataset()
    trainer = AtomicTrainer(model=tiny_qwen2(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()

    best = tmp_path / "checkpoint-1"
    assert trainer.state.best_model_checkpoint == str(best)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-4"]
    assert (tmp_path / LATEST_MARKER).read_text() == "checkpoint-4\n"
    for step in (1, 4):
        checkpoint = tmp_path / f"checkpoint-{step}"
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
        assert manifest["step"] == step and manifest["world_size"] == 1 and manifest["zero_stage"] is None
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= manifest["files"].keys()
        assert checkpoint_problem(checkpoint) is None
        # The state saved in the checkpoint points at the published directory, not at the staging one.
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] == str(best), state["best_model_checkpoint"]
    assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-4")
