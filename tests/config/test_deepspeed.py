"""check_deepspeed_config: every shipped DeepSpeed config passes; a broken one fails naming the fix. zero_stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from config.deepspeed import ZERO3_GATHER_ON_SAVE_KEY, check_deepspeed_config, zero_stage
from tests.helpers import CONF_DIR, REPO_ROOT

ZERO3 = {"zero_optimization": {"stage": 3, ZERO3_GATHER_ON_SAVE_KEY: True}, "train_batch_size": "auto"}


def write_json(path: Path, config: object) -> Path:
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (CONF_DIR / "deepspeed").glob("*.yaml")))
def test_every_deepspeed_choice_names_a_config_that_passes(name: str) -> None:
    path = OmegaConf.load(CONF_DIR / "deepspeed" / name).config
    check_deepspeed_config(None if path is None else REPO_ROOT / path)


def test_no_deepspeed_passes() -> None:
    assert check_deepspeed_config(None) is None
    assert zero_stage(None) is None


@pytest.mark.parametrize("value", [False, "true", None])
def test_zero3_without_gathering_on_save_is_refused(tmp_path: Path, value: object) -> None:
    config = json.loads(json.dumps(ZERO3))
    if value is None:
        del config["zero_optimization"][ZERO3_GATHER_ON_SAVE_KEY]
    else:
        config["zero_optimization"][ZERO3_GATHER_ON_SAVE_KEY] = value
    path = write_json(tmp_path / "zero3.json", config)
    with pytest.raises(ValueError, match=f"{path}.*{ZERO3_GATHER_ON_SAVE_KEY}.*empty weights"):
        check_deepspeed_config(path)


def test_zero2_needs_no_gathering(tmp_path: Path) -> None:
    path = write_json(tmp_path / "zero2.json", {"zero_optimization": {"stage": 2}})
    assert check_deepspeed_config(path) == {"zero_optimization": {"stage": 2}}
    assert zero_stage(path) == zero_stage(check_deepspeed_config(path)) == 2


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file .*nope.json"):
        check_deepspeed_config(tmp_path / "nope.json")


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(ValueError, match=r"broken\.json:2:\d+: invalid JSON"):
        check_deepspeed_config(path)


@pytest.mark.parametrize("config", [[1, 2], {"zero_optimization": 3}])
def test_wrong_structure_is_refused(tmp_path: Path, config: object) -> None:
    with pytest.raises(ValueError, match="deepspeed.config: .*(JSON object|must be an object)"):
        check_deepspeed_config(write_json(tmp_path / "odd.json", config))
