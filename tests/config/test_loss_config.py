"""The `loss:` config keys of the fused trainer: defaults and the values `LossConfig.__post_init__` refuses.

The DFT Trainer takes its loss settings as a `LossConfig`, so a bad value is refused here, before any Trainer or
model is built.
"""

from __future__ import annotations

import pytest

from config.schema import LossConfig


def test_defaults_are_the_fused_loss_with_a_constant_alpha() -> None:
    config = LossConfig()
    assert (config.implementation, config.alpha_warmup_steps, config.chunk_size) == ("fused", 0, 1024)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"implementation": "chunked"}, "loss.implementation='chunked' is not one of"),
        ({"alpha_warmup_steps": -1}, "loss.alpha_warmup_steps=-1 must be >= 0"),
        ({"chunk_size": 0}, "loss.chunk_size=0 must be >= 1"),
    ],
)
def test_bad_values_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"implementation": "chunked"}, "implementation='chunked'"), ({"alpha_warmup_steps": -1}, "alpha_warmup_steps")],
)
def test_bad_loss_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)
