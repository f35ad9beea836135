"""train.py end to end on preference pairs: a reward model (`training.objective=reward`) and DPO
(`training.objective=dpo`) on the embedded model, from the pair layouts users bring, alone, under LoRA and under
ZeRO-3 on 2 ranks; the export reloads as what it is and scores as training did."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from config.schema import DataConfig, load_run_config
from core.keys import CHOSEN_INPUT_IDS_KEY, REJECTED_INPUT_IDS_KEY
from data_pipeline.prepare import build_datasets
from evaluation.pairs import heldout_pairs_config
from observability.artifacts import read_metrics
from tests.helpers import (
    COMPARABLE_RUN,
    LAUNCH_DIR,
    REPO_ROOT,
    assert_same_training,
    make_interrupted_copy,
    read_nonfinite_log,
    run_ok,
    run_script,
    run_train,
    step_losses,
)

TRAIN_PAIRS = REPO_ROOT / "data" / "preference" / "train.jsonl"
HELDOUT_PAIRS = REPO_ROOT / "data" / "preference" / "heldout.jsonl"
LLAMAFACTORY_PAIRS = REPO_ROOT / "tests" / "data_pipeline" / "llamafactory" / "dpo_en_demo.json.gz"
HELDOUT_SHOWN = 16
STEPS = 6
QUICK = (
    f"training.max_steps={STEPS}",
    "training.logging_steps=2",
    "training.eval_strategy=steps",
    f"training.eval_steps={STEPS}",
    "training.eval_on_start=true",
    "training.per_device_train_batch_size=4",
    "training.per_device_eval_batch_size=8",
    "training.warmup_steps=0",
    "data.max_length=96",
    "data.validation_split_percentage=0",
    f"heldout.file={HELDOUT_PAIRS}",
    f"heldout.max_samples={HELDOUT_SHOWN}",
)


def trl_conversational(path: Path, count: int) -> Path:
    """TRL's conversational layout with an implicit prompt (each list holds the prompt and its reply), from the
    bundled pairs' first `count`."""
    with TRAIN_PAIRS.open() as source, path.open("w") as out:
        for line in list(source)[:count]:
            pair = json.loads(line)
            prompt = [{"role": "user", "content": pair["question"]}]
            record = {side: [*prompt, {"role": "assistant", "content": pair[side]}] for side in ("chosen", "rejected")}
            out.write(json.dumps(record) + "\n")
    return path


def logged(output_dir: Path, key: str) -> list[float]:
    return [record[key] for record in read_metrics(output_dir) if key in record]


def heldout_rewards(model_dir: Path, run_data: DataConfig) -> tuple[float, float, float]:
    """The exported reward model's mean chosen and rejected score and accuracy on the held-out pairs, each pair scored
    alone (no padding), with the tokens the run's pipeline prepares."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _, _ = build_datasets(heldout_pairs_config(run_data, str(HELDOUT_PAIRS), HELDOUT_SHOWN), tokenizer, 0)
    chosen, rejected = [], []
    with torch.no_grad():
        for row in pairs:
            for ids, scores in ((row[CHOSEN_INPUT_IDS_KEY], chosen), (row[REJECTED_INPUT_IDS_KEY], rejected)):
                scores.append(float(model(input_ids=torch.tensor([ids])).logits.squeeze()))
    correct = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    return sum(chosen) / len(chosen), sum(rejected) / len(rejected), correct / len(chosen)


@pytest.mark.slow
def test_a_reward_model_trains_on_the_pair_layouts_users_bring_and_its_export_scores_as_trained(
    tmp_path: Path,
) -> None:
    trl_file = trl_conversational(tmp_path / "trl_pairs.jsonl", 48)
    sources = (
        f"data.sources=[{{path: {TRAIN_PAIRS}, max_samples: 48}},{trl_file},"
        f"{{path: {LLAMAFACTORY_PAIRS}, max_samples: 48}}]"
    )
    run = tmp_path / "run"
    run_ok(run, "training.objective=reward", sources, f"data.cache_dir={tmp_path / 'cache'}", *QUICK)

    losses = logged(run, "loss")
    assert len(losses) == STEPS // 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    # The seed's {question, chosen, rejected}, TRL's message lists and LLaMA-Factory's ShareGPT ranking: one
    # per-source accuracy each, every one a share of pairs.
    per_source = [key for record in read_metrics(run) for key in record if key.startswith("accuracy/")]
    assert len(set(per_source)) == 3, per_source
    assert not logged(run, "dft_alpha") and not logged(run, "nll")  # no per-token objective underneath
    assert "best eval_accuracy" in (run / "logs" / "rank0.log").read_text()  # the end summary's headline

    heldout = json.loads((run / "heldout.json").read_text())
    assert heldout["pairs"] == HELDOUT_SHOWN and heldout["after_step"] == STEPS
    config = json.loads((run / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and len(config["id2label"]) == 1

    # The export reloads as a sequence classifier and scores the held-out pairs as the Trainer's last evaluation
    # did (there in padded batches of 8, here one sequence at a time: float32 summation order only).
    run_data = load_run_config(
        ["training.objective=reward", f"data.sources=[{TRAIN_PAIRS}]", "data.max_length=96"]
    ).data
    chosen, rejected, accuracy = heldout_rewards(run, run_data)
    after = heldout["after"]
    assert chosen == pytest.approx(after["chosen_reward"], rel=1e-4, abs=1e-5)
    assert rejected == pytest.approx(after["rejected_reward"], rel=1e-4, abs=1e-5)
    assert accuracy == pytest.approx(after["accuracy"])


@pytest.mark.slow
def test_a_reward_model_under_lora_trains_its_score_head_in_full_and_merges(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_ok(
        run,
        "training.objective=reward",
        f"data.sources=[{TRAIN_PAIRS}]",
        "model.adapter=lora",
        "model.merge_adapter=true",
        *QUICK,
    )
    log = (run / "logs" / "rank0.log").read_text()
    assert ", lora r " in log  # the banner: an adapter run
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in (adapter_config["modules_to_save"] or [])
    merged = AutoModelForSequenceClassification.from_pretrained(run / "merged")
    assert merged.config.num_labels == 1


@pytest.mark.slow
def test_dpo_trains_under_lora_against_the_base_with_the_adapter_off(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_train(run, "training.objective=dpo", f"data.sources=[{TRAIN_PAIRS}]", "model.adapter=lora", *QUICK)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (run / "logs" / "rank0.log").read_text()
    assert "DPO sigmoid loss (beta 0.1); reference: the base with the adapter off (no copy)" in log
    heldout = json.loads((run / "heldout.json").read_text())
    # At step 0 the policy is its reference: every implicit reward is 0, so no pair is ranked right (ties).
    assert heldout["before"]["margin"] == 0.0 and heldout["before"]["accuracy"] == 0.0
    assert heldout["after"]["margin"] != 0.0
    assert logged(run, "chosen_logps") and all(value < 0 for value in logged(run, "chosen_logps"))


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("objective", "extra"),
    [("reward", ()), ("dpo", ()), ("dpo", ("preference.precompute_reference=true",))],
    ids=["reward", "dpo", "dpo_precomputed"],
)
def test_preference_objectives_train_under_zero3_on_two_ranks(
    tmp_path: Path, launch_env: dict, objective: str, extra: tuple[str, ...]
) -> None:
    sources = f"data.sources=[{{path: {TRAIN_PAIRS}, max_samples: 96}}]"
    overrides = (f"training.objective={objective}", sources, *QUICK, "deepspeed=zero3", *extra)
    run_script(
        [str(LAUNCH_DIR / "multi_node.sh"), *overrides, "training.bf16=true", f"output_dir={tmp_path}"],
        env={**launch_env, "NNODES": "1", "NODE_RANK": "0", "NUM_GPUS": "2"},
        timeout=300,
        log_dirs=[tmp_path / "logs"],
    )
    assert (tmp_path / "model.safetensors").is_file()
    heldout = json.loads((tmp_path / "heldout.json").read_text())
    assert heldout["pairs"] == HELDOUT_SHOWN and heldout["after_step"] == STEPS
    losses = logged(tmp_path, "loss")
    assert losses and all(math.isfinite(loss) for loss in losses)
    if objective == "dpo":
        log = (tmp_path / "logs" / "rank0.log").read_text()
        assert "reference: a frozen copy" in log
        assert heldout["after"]["margin"] != 0.0
    if objective == "dpo" and not extra:
        assert heldout["before"]["margin"] == 0.0  # the same forward of the same batch: policy = reference
    if extra:
        # At step 0 the policy is the reference, but the reference's sums were computed in other batches (other
        # padding widths) in bf16: a log-probability summed over ~20 tokens moves by a few bf16 roundings
        # (2^-8 relative of a sum of ~10 nats: ~0.04), times beta 0.1: well below 0.01. (Which value belongs to which
        # pair is checked exactly in one process: test_dpo_with_precomputed_reference_logps_trains_as_with_...)
        assert abs(heldout["before"]["margin"]) < 0.01, heldout["before"]
        # Shared by the 2 ranks (12 batches of 8: 6 rounds each), gathered whole on each.
        for rank in (0, 1):
            rank_log = (tmp_path / "logs" / f"rank{rank}.log").read_text()
            assert "Precomputed 96 training pairs' reference log-probabilities" in rank_log


PAIR_RUN = (
    "training.objective=reward",
    f"data.sources=[{{path: {TRAIN_PAIRS}, max_samples: 96}}]",
    "data.max_length=96",
    *COMPARABLE_RUN,
    "training.per_device_train_batch_size=4",
    "heldout.file=null",
)


@pytest.mark.slow
def test_a_reward_run_resumes_as_if_never_stopped_and_skips_a_non_finite_step(tmp_path: Path) -> None:
    finished = tmp_path / "finished"
    run_ok(finished, *PAIR_RUN)
    interrupted = tmp_path / "interrupted"
    make_interrupted_copy(finished, interrupted)
    run_ok(interrupted, *PAIR_RUN, "training.resume_from_checkpoint=auto")
    # One process on the same machine: the restored optimizer, schedule, RNG and data order give the same steps.
    assert_same_training(interrupted, finished, atol=0.0)

    guarded = tmp_path / "guarded"
    run_ok(guarded, *PAIR_RUN, "resilience.inject_nonfinite_at_steps=[3]")
    (skip,) = read_nonfinite_log(guarded)
    assert skip["step"] == 3
    # The Trainer logs a non-finite step's loss as the mean of the finite ones (logging_nan_inf_filter).
    assert [step for step, _ in step_losses(guarded)] == list(range(1, 9))
    assert all(math.isfinite(loss) for _, loss in step_losses(guarded))


def test_the_sample_datas_chat_heldout_file_is_refused_by_a_preference_run_naming_the_key(tmp_path: Path) -> None:
    result = run_train(tmp_path, "training.objective=reward", f"data.sources=[{HELDOUT_PAIRS}]", "training.max_steps=1")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "heldout.file=data/sample/heldout.jsonl: a reward or dpo run evaluates held-out preference pairs" in (
        result.stdout + result.stderr
    )
    assert "data/sample/heldout.jsonl:1: missing 'chosen'" in result.stdout + result.stderr


@pytest.mark.slow
def test_dpo_with_precomputed_reference_logps_trains_as_with_the_reference_model(tmp_path: Path) -> None:
    dpo = ("training.objective=dpo", f"data.sources=[{{path: {TRAIN_PAIRS}, max_samples: 48}}]", *QUICK)
    live, precomputed = tmp_path / "live", tmp_path / "precomputed"
    run_ok(live, *dpo)
    run_ok(precomputed, *dpo, "preference.precompute_reference=true")
    log = (precomputed / "logs" / "rank0.log").read_text()
    assert "Precomputed 48 training pairs' reference log-probabilities" in log
    assert f"Precomputed {HELDOUT_SHOWN} evaluation pairs' reference log-probabilities" in log
    assert "Freed the reference model" in log
    # The same reference forward, once per pair in batches of 8 instead of at each step in the step's batch of 4:
    # float32 sums over other paddings and batch shapes, far below the loss's own scale.
    torch.testing.assert_close(
        torch.tensor(logged(precomputed, "loss")), torch.tensor(logged(live, "loss")), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(logged(precomputed, "eval_margin")),
        torch.tensor(logged(live, "eval_margin")),
        rtol=1e-4,
        atol=1e-6,
    )
