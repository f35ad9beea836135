"""The `loss:` config keys of the fused trainer: defaults and the values `LossConfig.__post_init__` refuses.

The DFT Trainer takes its loss settings as a `LossConfig`, so a bad value is refused here, before any Trainer or
model is built.
"""

from __future__ import annotations

import pytest

from config.schema import LossConfig, load_run_config


def test_defaults_are_the_fused_loss_with_a_constant_alpha_and_auto_chunks() -> None:
    config = LossConfig()
    assert (config.implementation, config.alpha_warmup_steps, config.chunk_size) == ("fused", 0, "auto")


def test_the_shipped_default_is_dft_at_alpha_half_and_alpha_one_is_one_override_away() -> None:
    from dft.objectives import build_objective, resolve_alpha

    assert (load_run_config([]).loss.type, resolve_alpha(load_run_config([]).loss)) == ("dft", 0.5)
    assert build_objective(load_run_config(["loss.alpha=1"]).loss).alpha == 1.0
    # ASFT keeps the paper's alpha unless told otherwise; objectives without alpha ignore it.
    assert resolve_alpha(load_run_config(["loss.type=asft"]).loss) == 1.0
    assert build_objective(load_run_config(["loss.type=eaft"]).loss).alpha is None


@pytest.mark.parametrize(("override", "expected"), [("loss.chunk_size=auto", "auto"), ("loss.chunk_size=512", 512)])
def test_chunk_size_takes_auto_or_a_token_count_from_the_command_line(override: str, expected: str | int) -> None:
    assert load_run_config([override]).loss.chunk_size == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"implementation": "chunked"}, "loss.implementation='chunked' is not one of"),
        ({"alpha_warmup_steps": -1}, "loss.alpha_warmup_steps=-1 must be >= 0"),
        ({"chunk_size": 0}, "loss.chunk_size=0 must be auto or a whole number of tokens >= 1"),
        ({"chunk_size": "big"}, "loss.chunk_size='big' must be auto"),
        ({"chunk_size": 2.5}, "loss.chunk_size=2.5 must be auto"),
        ({"chunk_size": True}, "loss.chunk_size=True must be auto"),
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
