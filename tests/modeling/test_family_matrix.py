"""Every model family users bring, under the recipe they run: ZeRO-3 on 2 ranks, activation checkpointing, bf16,
the fused DFT loss, trained through train.py's `fine_tune` and compared with a one-process fp32 reference.

Families (embedded/families.py, `embedded:tiny-<family>`): Llama 3 (llama3 rope scaling, untied head), Qwen2
(q/k/v biases, tied head), Qwen3 (q/k norm, wide heads), Mistral, Gemma 2 (logit and attention soft-caps, sliding
window, eager attention), Phi-3 (fused qkv and gate/up). The 2-rank runs share one launch
(tests/modeling/family_matrix_check.py); the references run here, in this process, without DeepSpeed.

Each step is one epoch of the same 16 samples (tests/helpers.py, FAMILY_MATRIX_RUN), so the logged values of
step k are the model's after k - 1 updates: a training curve the two runs must share.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from config.schema import ModelConfig, load_run_config
from data_pipeline.templates import load_chat_tokenizer
from embedded.families import FAMILIES
from modeling.loading import resolve_model_path
from observability.artifacts import read_metrics
from tests.helpers import (
    FAMILY_MATRIX_STEPS,
    REPO_ROOT,
    family_matrix_overrides,
    fine_tune_in_process,
    run_on_two_deepspeed_ranks,
)

pytestmark = pytest.mark.distributed

CHECK_SCRIPT = Path(__file__).with_name("family_matrix_check.py")
MODEL_CACHE = REPO_ROOT / ".cache" / "models"

# bf16 keeps 8 significant bits: values are rounded to a relative spacing of 2**-8 (3.9e-3). Rounding the
# weights and every activation to it moves each token's log-probability by a few of those, and the tokens' mean
# does not cancel them (the rounding of a weight is shared by every token); updates applied to bf16 weights from
# fp32 master weights differ from the fp32 run's by the same relative amount. Measured here (12 steps, six
# families, 1 and 2 threads): at most 7.3e-3 on loss, nll and avg p(correct); 4 spacings leave a 2x margin.
BF16_SPACING = 2.0**-8
CURVE_BOUND = 4 * BF16_SPACING
# The backward pass rounds each activation's gradient to bf16 as well: twice the roundings of the forward.
# Measured at step 1 (same weights on both sides): at most 1.0e-2.
GRAD_NORM_BOUND = 8 * BF16_SPACING


def family_model_dir(family: str) -> Path:
    """`embedded:tiny-<family>`, built once in the test session's model cache."""
    return Path(resolve_model_path(ModelConfig(name_or_path=f"embedded:tiny-{family}", cache_dir=str(MODEL_CACHE))))


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-rank ZeRO-3 + activation checkpointing + bf16 runs of every family, one launch; models built first
    here (the ranks would each wait on the build lock)."""
    for family in FAMILIES:
        family_model_dir(family)
    out = tmp_path_factory.mktemp("family_matrix")
    run_on_two_deepspeed_ranks(CHECK_SCRIPT, "--out", str(out), "--model-cache", str(MODEL_CACHE), *FAMILIES)
    return out


def reference_run(family: str, output_dir: Path) -> Path:
    """One process, fp32, no activation checkpointing, the full-logits loss, the same samples per step."""
    fine_tune_in_process(family_matrix_overrides(family, MODEL_CACHE, output_dir, distributed=False))
    return output_dir


def step_rows(output_dir: Path) -> list[dict]:
    rows = [row for row in read_metrics(output_dir) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, FAMILY_MATRIX_STEPS + 1)), f"steps logged in {output_dir}"
    return rows


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_like_fp32_one_process_under_zero3_checkpointing_bf16(
    family: str, family_runs: Path, tmp_path: Path
) -> None:
    distributed_dir = family_runs / family
    reference_dir = reference_run(family, tmp_path / "reference")

    # The recipe ran as claimed: ZeRO-3, activation checkpointing, bf16 (weights saved as trained, in bf16).
    args = torch.load(distributed_dir / "training_args.bin", weights_only=False)
    assert args.gradient_checkpointing and args.bf16, f"{family}: {args.gradient_checkpointing=} {args.bf16=}"
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 3

    distributed, reference = step_rows(distributed_dir), step_rows(reference_dir)
    for dist_row, ref_row in zip(distributed, reference, strict=True):
        for key in ("loss", "nll", "avg_p_correct"):
            error = relative(dist_row[key], ref_row[key])
            assert error <= CURVE_BOUND, (
                f"{family} step {ref_row['step']} {key}: {dist_row[key]:.6f} under ZeRO-3 + checkpointing + bf16, "
                f"{ref_row[key]:.6f} in fp32 on one process (relative {error:.2e} > {CURVE_BOUND:.2e})"
            )
    error = relative(distributed[0]["grad_norm"], reference[0]["grad_norm"])
    assert error <= GRAD_NORM_BOUND, f"{family} step 1 grad_norm relative {error:.2e} > {GRAD_NORM_BOUND:.2e}"
    # The comparison can fail: training moved avg p(correct) (DFT's objective) by more than twice the bound, so a
    # run whose updates were lost (no gradient through a checkpointed layer, no reduction across ranks) is caught.
    gain = relative(reference[-1]["avg_p_correct"], reference[0]["avg_p_correct"])
    assert reference[-1]["avg_p_correct"] > reference[0]["avg_p_correct"] and gain >= 2 * CURVE_BOUND, (
        f"{family}: avg p(correct) moved {gain:.2e} in {FAMILY_MATRIX_STEPS} steps, too little to judge the run"
    )

    # The export (train.py verified every saved tensor against the gathered parameter on both ranks): it reloads
    # with the base model's names and shapes, trained, and predicts like the fp32 reference's model.
    base = load_file(family_model_dir(family) / "model.safetensors")
    saved = load_file(distributed_dir / "model.safetensors")
    assert saved.keys() == base.keys(), f"{family}: saved tensors {sorted(saved.keys() ^ base.keys())}"
    for name, tensor in saved.items():
        assert tensor.shape == base[name].shape and tensor.dtype == torch.bfloat16, f"{family} {name}: {tensor}"
    assert any(not torch.equal(saved[name].float(), base[name].float()) for name in base), f"{family}: not trained"
    assert_same_predictions(family, distributed_dir, reference_dir)


def assert_same_predictions(family: str, distributed_dir: Path, reference_dir: Path) -> None:
    """Both saved models, reloaded in fp32, score the same probe within the curve's bound."""
    tokenizer = load_chat_tokenizer(load_run_config([]), str(reference_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}], tokenize=False
    )
    batch = tokenizer(text, return_tensors="pt")
    nll = {}
    for side, directory in (("zero3_bf16", distributed_dir), ("reference", reference_dir)):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            nll[side] = model(**batch, labels=batch["input_ids"]).loss.item()
    error = relative(nll["zero3_bf16"], nll["reference"])
    assert error <= CURVE_BOUND, f"{family}: probe nll {nll} (relative {error:.2e} > {CURVE_BOUND:.2e})"
