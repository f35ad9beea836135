"""Randomly initialised tiny causal LMs for unit tests that need a real model but not a trained one.

Shared by the trainer, packing and ZeRO-3 tests, so they compare the same architecture.
"""

from __future__ import annotations

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 300


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 with tied embeddings (the lm_head weight is the embedding)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).float()


def tiny_gemma2(seed: int = 0) -> Gemma2ForCausalLM:
    """A 2-layer Gemma2 with a final logit soft-cap."""
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=2.0,  # small, so the cap changes the loss visibly
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config).float()
