"""The DeepSpeed JSON a run names (`deepspeed.config`): checked before anything heavy starts, and its ZeRO stage.

A bad file should fail in the first second with the file, the key and the fix, not after every rank has loaded
the model or, worse, after training has saved weights nobody can load. Every reader of the ZeRO stage (the
start-up banner, the resume compatibility check) asks `zero_stage`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ZERO3_GATHER_ON_SAVE_KEY = "stage3_gather_16bit_weights_on_model_save"


def check_deepspeed_config(path: str | Path | None) -> dict[str, Any] | None:
    """Read a DeepSpeed JSON, refusing one that is missing, malformed, or would save empty ZeRO-3 weights.

    Under ZeRO-3 each rank holds only a shard of every parameter; unless the JSON sets
    `zero_optimization.stage3_gather_16bit_weights_on_model_save: true`, the Trainer saves
    the empty local placeholders and `from_pretrained` cannot reload the model.

    Args:
        path: the file named by `deepspeed.config`; None (no DeepSpeed) passes.

    Returns:
        The parsed JSON, or None without DeepSpeed.

    Raises:
        ValueError: naming the file, what is wrong and the fix.
    """
    if path is None:
        return None
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ValueError(
            f"deepspeed.config: no such file '{path}' (relative paths start at the launch directory; "
            "the shipped configs are under ds_config/)"
        ) from e
    except OSError as e:
        raise ValueError(f"deepspeed.config: cannot read '{path}': {e.strerror}") from e
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed.config: {path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed.config: {path}: expected a JSON object, found a {type(config).__name__}")
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ValueError(f"deepspeed.config: {path}: zero_optimization must be an object, found {zero!r}")
    if zero.get("stage") == 3 and zero.get(ZERO3_GATHER_ON_SAVE_KEY) is not True:
        raise ValueError(
            f"deepspeed.config: {path}: ZeRO-3 without zero_optimization.{ZERO3_GATHER_ON_SAVE_KEY} = true "
            f"saves empty weights (each rank holds only a shard); set "
            f'"{ZERO3_GATHER_ON_SAVE_KEY}": true under "zero_optimization"'
        )
    return config


def zero_stage(deepspeed_config: str | Path | dict[str, Any] | None) -> int | None:
    """The ZeRO stage a DeepSpeed config (its path or its parsed JSON) asks for: 0 when it has none, None without
    DeepSpeed."""
    if not deepspeed_config:
        return None
    config = deepspeed_config if isinstance(deepspeed_config, dict) else check_deepspeed_config(deepspeed_config)
    return int((config.get("zero_optimization") or {}).get("stage", 0))
