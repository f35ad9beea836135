"""Model and tokenizer loading: embedded models, dtype and attention backend choice."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from config.schema import ModelConfig
from embedded.base_model import resolve_embedded_model
from embedded.paths import TOKENIZER_DIR, is_embedded
from embedded.released import is_released
from modeling.adapter import count_parameters, quantization_config
from modeling.heads import CAUSAL_LM, SCORE, auto_model_class, head_config

logger = logging.getLogger(__name__)


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """A local directory or hub id; embedded models are built once and cached."""
    if is_embedded(model_cfg.name_or_path):
        return str(resolve_embedded_model(model_cfg.name_or_path, model_cfg.cache_dir))
    return model_cfg.name_or_path


def resolve_tokenizer_path(model_cfg: ModelConfig) -> str:
    """Where the tokenizer lives, without building an embedded model (data preparation needs only this)."""
    if model_cfg.tokenizer_name_or_path:
        return model_cfg.tokenizer_name_or_path
    if is_released(model_cfg.name_or_path):  # its own tokenizer, saved with the converted model
        return resolve_model_path(model_cfg)
    if is_embedded(model_cfg.name_or_path):
        return str(TOKENIZER_DIR)  # the tiny embedded models are saved with this very tokenizer
    return model_cfg.name_or_path


def load_tokenizer(model_cfg: ModelConfig, model_path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        model_cfg.tokenizer_name_or_path or model_path, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def choose_attn_implementation(requested: str) -> str | None:
    """None lets transformers pick the model's default: sdpa where the architecture supports it, eager where it
    does not (Gemma 2's attention soft-cap, which sdpa would silently leave out)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def choose_dtype(requested: str, bf16: bool, deepspeed: bool) -> torch.dtype:
    # Without DeepSpeed the Trainer keeps fp32 master weights only if the model is loaded in fp32;
    # DeepSpeed's bf16 mode keeps its own fp32 copy, so bf16 weights are safe (and half the memory) there.
    if requested == "auto":
        return torch.bfloat16 if (bf16 and deepspeed) else torch.float32
    return getattr(torch, requested)


def load_model(
    model_cfg: ModelConfig,
    model_path: str,
    bf16: bool,
    deepspeed: bool,
    head: str = CAUSAL_LM,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """The base model, with the language-model head or a new scalar score head (`modeling.heads`).

    Args:
        pad_token_id: the score head reads each row's last token that is not padding, so it must know the pad id
            (a causal LM's config often has none): the tokenizer's.
        seed: a score head that the checkpoint lacks is drawn at random: every rank draws the same one.
    """
    attn = choose_attn_implementation(model_cfg.attn_implementation)
    dtype = choose_dtype(model_cfg.dtype, bf16, deepspeed)
    quantization = quantization_config(model_cfg)
    if head == SCORE:
        set_seed(seed)
    model = auto_model_class(head).from_pretrained(
        model_path,
        **head_config(head, pad_token_id),
        dtype=dtype,
        attn_implementation=attn,
        trust_remote_code=model_cfg.trust_remote_code,
        quantization_config=quantization,
        # 4-bit weights are quantized as they load, on this rank's GPU (the launcher's LOCAL_RANK: the Trainer has
        # not picked the device yet).
        device_map={"": int(os.environ.get("LOCAL_RANK", 0))} if quantization is not None and not deepspeed else None,
    )
    _, n_params = count_parameters(model)
    attn = model.config._attn_implementation
    logger.info("Loaded %s: %s parameters, dtype %s, attention %s", Path(model_path).name, f"{n_params:,}", dtype, attn)
    return model
