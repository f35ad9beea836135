"""`model.trust_remote_code` is false in every shipped config and reaches `from_pretrained` as set.

A model directory whose config maps `AutoModelForCausalLM` to Python shipped with it is the real case:
with the default the load refuses to run that code; with `model.trust_remote_code=true` it runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from config.schema import ModelConfig, register_configs
from modeling.loading import load_model
from tests.helpers import CONF_DIR, tiny_qwen2

CUSTOM_CONFIG = """from transformers import Qwen2Config


class CustomQwen2Config(Qwen2Config):
    model_type = "custom_qwen2"
"""
CUSTOM_MODEL = """from transformers import Qwen2ForCausalLM

from .configuration_custom import CustomQwen2Config


class CustomQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = CustomQwen2Config
"""


@pytest.mark.parametrize(
    "overrides",
    [[], ["model=hf", "model.name_or_path=/models/any"]]
    + [[f"experiment={p.stem}"] for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))],
    ids=lambda overrides: " ".join(overrides) or "default",
)
def test_shipped_configs_do_not_trust_remote_code(overrides: list[str]) -> None:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    assert cfg.model.trust_remote_code is False


@pytest.fixture
def remote_code_model(tmp_path: Path) -> Path:
    directory = tmp_path / "remote_code_model"
    tiny_qwen2().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "custom_qwen2"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomQwen2Config",
        "AutoModelForCausalLM": "modeling_custom.CustomQwen2ForCausalLM",
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (directory / "modeling_custom.py").write_text(CUSTOM_MODEL)
    return directory


def test_remote_code_is_refused_by_default(remote_code_model: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_model(
            ModelConfig(name_or_path=str(remote_code_model)), str(remote_code_model), bf16=False, deepspeed=False
        )


def test_remote_code_runs_when_the_config_says_so(remote_code_model: Path) -> None:
    model_cfg = ModelConfig(name_or_path=str(remote_code_model), trust_remote_code=True)
    model = load_model(model_cfg, str(remote_code_model), bf16=False, deepspeed=False)
    assert type(model).__name__ == "CustomQwen2ForCausalLM"
