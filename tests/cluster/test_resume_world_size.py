"""Resuming on another number of ranks: ZeRO-2/3 through a universal checkpoint, DDP as it is, the rest refused.

ZeRO-3 shards the optimizer state over the ranks that saved it, and DeepSpeed loads the shards only on that many
ranks. A ZeRO-3 checkpoint of 2 ranks resumed on 1, or of 1 resumed on 2 (what a requeued job gets when the cluster
hands back fewer or more nodes: the world size is what counts, not the node count), is converted to DeepSpeed's
universal checkpoint on resume (cluster/universal.py) and loaded re-sharded. Each resumes checkpoint-4 of an 8-step
run with the same global batch (per_device_train_batch_size x ranks = 64) and must continue as the uninterrupted run
of its new size does: every step's loss and the final weights within 1e-5, and the optimizer state saved at step 8,
joined from the shards (fp32 weights, exp_avg, exp_avg_sq), within 1e-5 of each state's largest magnitude, with
Adam's step 8 in every group and the same lr. Bound: 1 and 2 uninterrupted ranks differ by float32 reordering only
(measured: losses 6e-8, weights 2.6e-7, states 1.3e-6 of their largest magnitude); a resume that lost the optimizer
state, the schedule or a batch moves a loss by 1e-3 or more; DeepSpeed's shared Adam step after a universal load
(cluster.universal.UntieUniversalOptimizerSteps) moved the losses by 1.8e-4 and the weights by 4.4e-5 within 4 steps,
and its step counts read 12. A ZeRO-2 checkpoint of 2 ranks resumed on 1 goes through DeepSpeed's ZeRO-1/2
conversion and is held to the same bound.

Where no conversion exists, the resume fails at start-up with the reason: here the 2-rank checkpoint without its
manifest (saved before manifests existed: its ZeRO stage is unknown, so nothing says how to convert it), before any rank
is spawned (launch/single_node.sh runs `cluster.check`) and, launched without that script, before train.py loads
the model. A DDP (or single-process) checkpoint holds the whole optimizer state: saved by 1 rank and resumed on 2
with the same global batch, the run continues as if it had never stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.manifest import LATEST_MARKER, MANIFEST_FILE, STAGING_DIR, checkpoint_problem, read_manifest
from cluster.resume import ZERO_SHARD_PATTERN
from cluster.universal import LATEST_UNIVERSAL, UNIVERSAL_MANIFEST
from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    GLOBAL_BATCH,
    LAST_STEP,
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    RESUME_STEP,
    LaunchedRun,
    assert_same_training,
    assert_same_zero3_state,
    launch_environment,
    make_interrupted_copy,
    run_script,
)

pytestmark = pytest.mark.distributed

FAIL_FAST_S = 120  # a check and a refusal: no rank, no model, no data (imports dominate on a loaded machine)
REFUSAL = "optimizer state is sharded over 2 ranks and this run has 1"
BATCH, ACCUMULATION = "training.per_device_train_batch_size", "training.gradient_accumulation_steps"
ZERO3_RUN = ("deepspeed=zero3", *COMPARABLE_RUN, NO_HELDOUT)
ZERO2_RUN = ("deepspeed=zero2", *COMPARABLE_RUN, NO_HELDOUT)
ATOL = 1e-5
GLOBAL_BATCH_SIZE = "training.global_batch_size"


def resume_on(ranks: int, output_dir: Path, keep_batch: str = "per_device", run: tuple[str, ...] = ZERO3_RUN) -> str:
    """launch/single_node.sh on `ranks` ranks, resuming `output_dir` (auto) with the global batch of 64: by the
    per-device batch (`keep_batch="per_device"`), or by `training.global_batch_size` (`"global"`: the per-device batch
    stays debug=quick's and gradient accumulation follows the ranks)."""
    batch = f"{BATCH}={GLOBAL_BATCH // ranks}" if keep_batch == "per_device" else f"{GLOBAL_BATCH_SIZE}={GLOBAL_BATCH}"
    return run_script(
        [str(LAUNCH_DIR / "single_node.sh"), *run, batch, "training.resume_from_checkpoint=auto",
         f"output_dir={output_dir}"],
        env={**launch_environment(), "NUM_GPUS": str(ranks)}, timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[output_dir / "logs"],
    )  # fmt: skip


def assert_resumed_through_a_universal_checkpoint(output: str, output_dir: Path, saved: int, ranks: int) -> None:
    checkpoint = output_dir / f"checkpoint-{RESUME_STEP}"
    assert f"{checkpoint} was saved by {saved} rank(s), this run has {ranks}" in output, output[-3000:]
    assert f"Resuming on {ranks} rank(s) a checkpoint of {saved}" in output, output[-3000:]
    converted = checkpoint / (checkpoint / LATEST_UNIVERSAL).read_text().strip()
    manifest = read_manifest(converted, UNIVERSAL_MANIFEST)
    assert manifest is not None and (manifest["world_size"], manifest["step"]) == (saved, RESUME_STEP), manifest
    assert {"zero/optimizer_state.pt", "zero/model.embed_tokens.weight/exp_avg_sq.pt"} <= set(manifest["files"])
    assert checkpoint_problem(checkpoint) is None, "the conversion broke the checkpoint's own manifest"


def test_zero3_checkpoint_of_two_ranks_resumes_on_one_rank_with_its_optimizer_state(
    zero3_deepspeed_run: LaunchedRun, one_rank_zero3_run: Path, tmp_path: Path
) -> None:
    """With training.global_batch_size=64, as a requeued job that keeps its command: the 1 rank accumulates 2
    micro-batches of debug=quick's 32 (the reference takes one of 64: its sums run in another order, inside the
    bound)."""
    resumed = tmp_path / "resumed"
    make_interrupted_copy(zero3_deepspeed_run.output_dir, resumed)
    output = resume_on(1, resumed, keep_batch="global")
    assert_resumed_through_a_universal_checkpoint(output, resumed, saved=2, ranks=1)
    assert "the global batch stays training.global_batch_size" in output, output[-3000:]
    assert "training.global_batch_size=64: 2 micro-batch(es) of 32 on each of 1 rank(s)" in output, output[-3000:]
    assert_same_training(resumed, one_rank_zero3_run, atol=ATOL)
    last = f"checkpoint-{LAST_STEP}"
    assert_same_zero3_state(resumed / last, one_rank_zero3_run / last, step=LAST_STEP, rtol=ATOL)


def test_zero3_checkpoint_of_one_rank_resumes_on_two_ranks_with_its_optimizer_state(
    zero3_deepspeed_run: LaunchedRun, one_rank_zero3_run: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    make_interrupted_copy(one_rank_zero3_run, resumed)
    output = resume_on(2, resumed)
    assert_resumed_through_a_universal_checkpoint(output, resumed, saved=1, ranks=2)
    assert_same_training(resumed, zero3_deepspeed_run.output_dir, atol=ATOL)
    last = f"checkpoint-{LAST_STEP}"
    assert_same_zero3_state(resumed / last, zero3_deepspeed_run.output_dir / last, step=LAST_STEP, rtol=ATOL)


@pytest.fixture(scope="module")
def zero2_two_rank_run(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    """The 8-step run under ZeRO-2 on 2 ranks (checkpoints at steps 4 and 8)."""
    output_dir = tmp_path_factory.mktemp("zero2_two_ranks") / "run"
    run_script(
        [str(LAUNCH_DIR / "single_node.sh"), *ZERO2_RUN, f"output_dir={output_dir}"],
        env={**launch_environment(), "NUM_GPUS": "2"}, timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[output_dir / "logs"],
    )  # fmt: skip
    return output_dir


def test_zero2_checkpoint_of_two_ranks_resumes_on_one_rank_with_its_optimizer_state(
    zero2_two_rank_run: Path, one_rank_zero3_run: Path, tmp_path: Path
) -> None:
    """ZeRO-2 shards the optimizer state too (not the weights): its checkpoint of 2 ranks, resumed on 1 through
    DeepSpeed's ZeRO-1/2 conversion, continues as the uninterrupted 1-rank run. The reference is the 1-rank ZeRO-3 run:
    on one rank nothing is reduced and both stages apply the same fp32 Adam update to the same values, so the two
    differ by the order of the gradient-norm sum only (measured: losses 6e-8, weights 3e-7), inside the bound; a lost
    optimizer state or schedule moves a loss by 1e-3 or more."""
    resumed = tmp_path / "resumed"
    make_interrupted_copy(zero2_two_rank_run, resumed)
    output = resume_on(1, resumed, run=ZERO2_RUN)
    assert_resumed_through_a_universal_checkpoint(output, resumed, saved=2, ranks=1)
    assert_same_training(resumed, one_rank_zero3_run, atol=ATOL)


def test_zero3_checkpoints_hold_every_ranks_shards_and_a_manifest(zero3_deepspeed_run: LaunchedRun) -> None:
    output_dir = zero3_deepspeed_run.output_dir
    assert not (output_dir / STAGING_DIR).exists(), "a save was left in staging"
    assert (output_dir / LATEST_MARKER).read_text() == f"checkpoint-{LAST_STEP}\n"
    for step in (RESUME_STEP, LAST_STEP):
        checkpoint = output_dir / f"checkpoint-{step}"
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
        assert (manifest["step"], manifest["world_size"], manifest["zero_stage"]) == (step, 2, 3), manifest
        shard_ranks = {int(match.group(1)) for name in manifest["files"] if (match := ZERO_SHARD_PATTERN.search(name))}
        assert shard_ranks == {0, 1}, f"optimizer shards of ranks {shard_ranks} in {checkpoint}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "trainer_state.json"} <= set(
            manifest["files"]
        )
        assert checkpoint_problem(checkpoint) is None


def run_to_exit(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=FAIL_FAST_S, check=False
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def unconvertible_checkpoint_copy(zero3_deepspeed_run: LaunchedRun, tmp_path: Path) -> Path:
    """An output directory holding the 2-rank run's checkpoint-4 (and its partial checkpoint-8), without the manifest
    that names its ZeRO stage: a checkpoint saved before manifests existed."""
    output_dir = tmp_path / "run"
    make_interrupted_copy(zero3_deepspeed_run.output_dir, output_dir)
    (output_dir / f"checkpoint-{RESUME_STEP}" / MANIFEST_FILE).unlink()
    return output_dir


def test_unconvertible_checkpoint_on_fewer_ranks_is_refused_before_ranks_spawn(
    unconvertible_checkpoint_copy: Path, launch_env: dict[str, str]
) -> None:
    overrides = [*ZERO3_RUN, "training.resume_from_checkpoint=auto"]
    status, output = run_to_exit(
        [str(LAUNCH_DIR / "single_node.sh"), *overrides, f"output_dir={unconvertible_checkpoint_copy}"],
        {**launch_env, "NUM_GPUS": "1"},
    )
    assert status == 2, f"status {status}\n{output[-3000:]}"
    assert REFUSAL in output and "unknown ZeRO stage" in output and "Resume with 2 ranks" in output, output[-3000:]
    assert "deepspeed.launcher" not in output and not (unconvertible_checkpoint_copy / "logs").exists(), "ranks started"


def test_unconvertible_checkpoint_on_fewer_ranks_is_refused_by_train_py_before_the_model_loads(
    unconvertible_checkpoint_copy: Path,
) -> None:
    checkpoint = unconvertible_checkpoint_copy / f"checkpoint-{RESUME_STEP}"
    command = [
        sys.executable, "train.py", *ZERO3_RUN, f"training.resume_from_checkpoint={checkpoint}",
        f"output_dir={unconvertible_checkpoint_copy}",
    ]  # fmt: skip
    status, output = run_to_exit(command, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert status != 0, output[-3000:]
    assert REFUSAL in output and f"model.name_or_path={checkpoint}" in output, output[-3000:]
    rank0_log = (unconvertible_checkpoint_copy / "logs" / "rank0.log").read_text()
    assert "Loaded " not in rank0_log and "Data:" not in rank0_log, "train.py went on to the data or the model"
    assert not (checkpoint / LATEST_UNIVERSAL).exists(), "a conversion was attempted"


def test_plain_checkpoint_of_one_rank_resumes_on_two_ranks_as_if_uninterrupted(
    tmp_path: Path, launch_env: dict[str, str]
) -> None:
    one_rank, resumed = tmp_path / "one", tmp_path / "resumed"
    run_script(
        [sys.executable, "train.py", *COMPARABLE_RUN, NO_HELDOUT, f"{BATCH}=4", f"{ACCUMULATION}=1",
         f"output_dir={one_rank}"],
        env=launch_env, timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[one_rank / "logs"],
    )  # fmt: skip
    make_interrupted_copy(one_rank, resumed)
    # The same global batch of 4 (2 ranks x 2): the steps after the checkpoint see the same samples.
    output = run_script(
        [str(LAUNCH_DIR / "single_node.sh"), "deepspeed=none", *COMPARABLE_RUN, NO_HELDOUT, f"{BATCH}=2",
         f"{ACCUMULATION}=1", "training.resume_from_checkpoint=auto", f"output_dir={resumed}"],
        env={**launch_env, "NUM_GPUS": "2"}, timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[resumed / "logs"],
    )  # fmt: skip
    assert f"resuming from {resumed / f'checkpoint-{RESUME_STEP}'}" in output, output[-3000:]
    assert "was saved by 1 rank(s), this run has 2" in output, output[-3000:]
    # Two ranks reduce in another order than one: equal up to float rounding (tests/dft/test_split_invariance.py).
    # atol 1e-5 as there: after 4 resumed AdamW steps at lr <= 5e-4, float32 reordering (8e-6 relative at most)
    # moves the weights by ~2e-8; 1e-5 = lr / 50 leaves room for Adam's amplification of near-zero gradients, while a
    # resume that repeats or skips a batch, or resets the optimizer or the schedule, moves a step's loss by 1e-3 or
    # more and the weights by up to lr.
    assert_same_training(resumed, one_rank, atol=1e-5)
