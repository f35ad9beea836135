"""The `loss:` config keys of the fused trainer: defaults and the values `LossConfig.__post_init__` refuses."""

from __future__ import annotations

import pytest

from launcher.config import LossConfig


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
