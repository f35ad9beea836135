"""resolve_resume_checkpoint: auto picks the newest complete checkpoint, skips broken ones, else starts fresh."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from launcher.checkpoints import find_checkpoints, resolve_resume_checkpoint


def make_checkpoint(output_dir: Path, step: int, state: bool = True, weights: str | None = "model.safetensors") -> Path:
    """A fake `checkpoint-<step>`: `weights` is a file name, `global_step` for DeepSpeed shards, or None."""
    checkpoint = output_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    if state:
        (checkpoint / "trainer_state.json").write_text("{}")
    if weights == "global_step":
        (checkpoint / f"global_step{step}").mkdir()
    elif weights is not None:
        (checkpoint / weights).write_bytes(b"weights")
    return checkpoint


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
def test_auto_accepts_each_kind_of_weights(tmp_path: Path, weights: str) -> None:
    make_checkpoint(tmp_path, 3, weights=weights)
    assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-3")


def test_auto_skips_incomplete_checkpoints_with_a_warning_naming_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_checkpoint(tmp_path, 4)
    no_state = make_checkpoint(tmp_path, 8, state=False)
    no_weights = make_checkpoint(tmp_path, 12, weights=None)
    with caplog.at_level(logging.INFO, logger="launcher.checkpoints"):
        assert resolve_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-4")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert str(no_weights) in warnings[0] and "model weights" in warnings[0]
    assert str(no_state) in warnings[1] and "trainer_state.json" in warnings[1]


@pytest.mark.parametrize("layout", ["missing dir", "empty dir", "only incomplete"])
def test_auto_without_a_complete_checkpoint_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, layout: str
) -> None:
    output_dir = tmp_path / "run"
    if layout != "missing dir":
        output_dir.mkdir()
    if layout == "only incomplete":
        make_checkpoint(output_dir, 5, state=False)
    with caplog.at_level(logging.INFO, logger="launcher.checkpoints"):
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
    checkpoint = make_checkpoint(tmp_path, 2, weights=None)
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoints"):
        assert resolve_resume_checkpoint(str(checkpoint), tmp_path) == str(checkpoint)
    assert "looks incomplete" in caplog.text and "model weights" in caplog.text
