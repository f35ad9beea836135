"""Checks that run before anything heavy starts.

A bad setup should fail in the first second with the file, the key and the fix,
not after every rank has loaded the model or, worse, after training has saved
weights nobody can load.
"""

from __future__ import annotations

import json
from pathlib import Path

ZERO3_GATHER_ON_SAVE_KEY = "stage3_gather_16bit_weights_on_model_save"


def check_deepspeed_config(path: str | Path | None) -> None:
    """Refuse a DeepSpeed JSON that is missing, malformed, or would save empty ZeRO-3 weights.

    Under ZeRO-3 each rank holds only a shard of every parameter; unless the JSON sets
    `zero_optimization.stage3_gather_16bit_weights_on_model_save: true`, the Trainer saves
    the empty local placeholders and `from_pretrained` cannot reload the model.

    Args:
        path: the file named by `deepspeed.config`; None (no DeepSpeed) passes.

    Raises:
        ValueError: naming the file, what is wrong and the fix.
    """
    if path is None:
        return
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
