"""QLoRA (`model.adapter=qlora`): a 4-bit NF4 base under a LoRA adapter, on a CUDA GPU with bitsandbytes.

Skipped without either (CI has neither); on a machine without a GPU the refusal is tested in
tests/cluster/test_adapter_resilience.py. Run on a GPU node with `pytest -m gpu`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling.adapter import ADAPTER_WEIGHTS
from observability.artifacts import read_metrics
from tests.helpers import FAMILY_MATRIX_RUN, NO_HELDOUT, REPO_ROOT, run_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs pip install 'dft-sft[qlora]'"),
]


def test_qlora_trains_the_adapter_on_a_4bit_base(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    command = [
        sys.executable,
        "train.py",
        *FAMILY_MATRIX_RUN,
        NO_HELDOUT,
        "model.adapter=qlora",
        "training.bf16=true",
        "training.learning_rate=1e-2",
        "training.activation_checkpointing=true",
        f"output_dir={output_dir}",
    ]
    run_script(command, env=None, timeout=600, log_dirs=[output_dir / "logs"], cwd=REPO_ROOT)
    losses = [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
    assert losses[-1] < 0.9 * losses[0], losses
    saved = load_file(output_dir / ADAPTER_WEIGHTS)
    assert saved and all(".lora_" in name for name in saved)
    assert "qlora r 16 on all-linear" in (output_dir / "logs" / "rank0.log").read_text()  # the banner
