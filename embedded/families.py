"""Tiny configs of the model families users fine-tune, for the embedded models and the tests.

Each builder keeps what sets its family apart in the released configs, at a size a CPU trains in seconds:

- llama3: Llama 3's rope scaling (`rope_type: llama3`, theta 500,000), untied head, no biases.
- qwen2: biases on q/k/v, tied head (the 0.5B-3B models); the embedded default `tiny-qwen2`.
- qwen3: q/k RMSNorm, a head dimension unlike hidden/heads (q and o projections change width), tied head.
- mistral: Mistral 7B v0.3's layout: no sliding window, untied head, theta 1e6.
- gemma2: final logit soft-cap 30 and attention soft-cap 50 (the released values), embeddings scaled by
  sqrt(hidden), pre- and post-norms, alternating sliding-window and full layers (the window shrunk with the
  context), tied head; eager attention, as Gemma 2 asks for its attention soft-cap.
- phi3: fused qkv and gate/up projections, untied head.

The vocabulary is the embedded tokenizer's (or the caller's): the architecture is what is under test, not a
released tokenizer (those are tested through their chat templates in the data pipeline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)


@dataclass(frozen=True)
class FamilySize:
    """The shape every family shares, so only the family's own traits differ between them."""

    vocab_size: int
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


def _shared(size: FamilySize, eos_token_id: int | None, pad_token_id: int | None) -> dict:
    return {**asdict(size), "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}


def _llama3(shared: dict, size: FamilySize) -> PretrainedConfig:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": size.max_position_embeddings // 2,
    }
    return LlamaConfig(**shared, rope_parameters=rope, tie_word_embeddings=False, rms_norm_eps=1e-5)


def _qwen2(shared: dict, size: FamilySize) -> PretrainedConfig:
    # Qwen2's default rope theta (10,000), not 2.5's 1e6: the embedded default was built, and measured, with it.
    return Qwen2Config(**shared, tie_word_embeddings=True)


def _qwen3(shared: dict, size: FamilySize) -> PretrainedConfig:
    head_dim = 2 * size.hidden_size // size.num_attention_heads  # q/o project to twice the hidden width
    return Qwen3Config(
        **shared,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
    )


def _mistral(shared: dict, size: FamilySize) -> PretrainedConfig:
    return MistralConfig(
        **shared,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
    )


def _gemma2(shared: dict, size: FamilySize) -> PretrainedConfig:
    head_dim = size.hidden_size // size.num_attention_heads
    return Gemma2Config(
        **shared,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=size.max_position_embeddings // 4,  # 4096 of 8192 in the release: shorter than a dialogue
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        attn_implementation="eager",
    )


def _phi3(shared: dict, size: FamilySize) -> PretrainedConfig:
    return Phi3Config(
        **shared,
        original_max_position_embeddings=size.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
    )


FAMILIES: dict[str, Callable[[dict, FamilySize], PretrainedConfig]] = {
    "llama3": _llama3,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "phi3": _phi3,
}


def family_config(
    family: str, size: FamilySize, eos_token_id: int | None = None, pad_token_id: int | None = None
) -> PretrainedConfig:
    """The config of a tiny `family` model of `size` (see the module docstring for what each keeps)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family](_shared(size, eos_token_id, pad_token_id), size)


def random_init(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A model of `config` with its random initial weights, whole: the class itself, not `from_config`, which
    partitions the model when a ZeRO-3 config is active in the process."""
    torch.manual_seed(seed)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


def family_model(
    family: str, size: FamilySize, seed: int = 0, attn_implementation: str | None = None, **config_changes: object
) -> PreTrainedModel:
    """A randomly initialised float32 `family` model of `size` (tests and benchmarks); `config_changes` set
    config fields after the family's own (a tighter logit soft-cap, say)."""
    config = family_config(family, size)
    for name, value in config_changes.items():
        if not hasattr(config, name):
            raise ValueError(f"{family} config has no field {name!r}")
        setattr(config, name, value)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return random_init(config, seed).float()
