"""The held-out pass of a run: its config's held-out file, options and batch size, and the base model's pass reused
across the runs that share it."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from config.schema import RunConfig
from data_pipeline.tokenize import TokenizeOptions
from evaluation.heldout import HeldoutResult, baseline_key, evaluate_heldout, load_heldout, load_result, save_result
from modeling.loading import load_model

logger = logging.getLogger(__name__)


def heldout_eval(run: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> HeldoutResult:
    dialogues = load_heldout(run.heldout.file, run.heldout.max_samples)
    return evaluate_heldout(
        model,
        tokenizer,
        dialogues,
        run.heldout.max_new_tokens,
        TokenizeOptions.from_data(run.data),
        run.heldout.batch_size,
    )


def heldout_baseline(run: RunConfig, model_path: str, tokenizer: PreTrainedTokenizerBase) -> HeldoutResult:
    """The base model's held-out pass, before training. Every run of a comparison (each arm and seed of
    `evaluation.compare`) has the same one, so it is kept under `data.cache_dir/heldout/` and reused when nothing it
    depends on changed (`evaluation.heldout.baseline_key`)."""
    settings = {
        "max_samples": run.heldout.max_samples,
        "max_new_tokens": run.heldout.max_new_tokens,
        "options": TokenizeOptions.from_data(run.data),
        "dtype": run.model.dtype,
        "attn": run.model.attn_implementation,
    }
    key = baseline_key(model_path, tokenizer, run.heldout.file, settings) if run.data.cache_dir else None
    cached = Path(run.data.cache_dir or ".", "heldout", f"{key}.json")
    if key is not None and cached.is_file():
        logger.info("Held-out baseline of this model and file reused from %s", cached)
        return load_result(cached)
    result = heldout_eval(run, load_model(run.model, model_path, bf16=False, deepspeed=False), tokenizer)
    if key is not None:
        save_result(result, cached)
    return result
