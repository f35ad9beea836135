"""train.py end to end, as a user runs it: a subprocess on the embedded tiny model."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from observability.artifacts import read_metrics
from tests.helpers import NO_HELDOUT, float32_bound, run_ok, run_train

# The embedded run trains at most this many tokens per optimizer step (32 samples of at most data.max_length=128):
# the longest float32 reduction behind a logged loss, hence the rounding two float32 runs of the same steps may
# differ by.
STEP_TOKENS = 32 * 128
STEP_BOUND = float32_bound(STEP_TOKENS)  # 4 * eps * sqrt(4096) = 3.1e-5


def max_relative_error(values: list[float], reference: list[float]) -> float:
    assert len(values) == len(reference) > 0, (values, reference)
    return max(abs(value - ref) / abs(ref) for value, ref in zip(values, reference, strict=True))


TRAIN_METRICS = ("loss", "nll", "avg_p_correct", "learning_rate", "grad_norm", "trainable_tokens_per_second")
SAMPLE_SOURCE_KEYS = ("chat_letters", "reverse_alpaca")  # conf/data/sample.yaml's two files, by stem


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


@pytest.mark.slow
def test_quick_run_leaves_a_complete_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_ok(out, "debug=quick")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 100_000
    assert model.config.use_cache is True
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert (out / "model.safetensors").exists()

    saved_config = (out / "config.yaml").read_text()
    assert "max_steps: 6" in saved_config and "${" not in saved_config  # resolved

    train_records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for record in train_records:
        assert set(TRAIN_METRICS) <= set(record), record
        assert 0.0 < record["avg_p_correct"] < 1.0 and record["nll"] > 0
        assert {f"nll/{key}" for key in SAMPLE_SOURCE_KEYS} <= set(record), record
    assert all("train/" not in key for record in read_metrics(out) for key in record)
    assert any("eval_nll" in r for r in read_metrics(out))

    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    log = (out / "logs" / "rank0.log").read_text()
    assert "Saved the final model" in log and "held-out exact match" in log


@pytest.mark.slow
def test_ce_and_alpha_zero_give_the_same_loss_at_every_step(tmp_path: Path) -> None:
    common = ("debug=quick", "training.logging_steps=1", "heldout.file=null", "training.eval_strategy=no")
    run_ok(tmp_path / "ce", "loss.type=ce", *common)
    run_ok(tmp_path / "alpha0", "loss.type=dft", "loss.alpha=0", *common)
    run_ok(tmp_path / "dft", "loss.type=dft", "loss.alpha=1", *common)
    ce, alpha0, dft = (train_losses(tmp_path / name) for name in ("ce", "alpha0", "dft"))
    assert len(ce) == 6
    # alpha=0 makes every DFT weight exactly 1: the per-token cross-entropies of loss.type=ce, summed in another
    # order (the fused head's chunks, the full-logits path). No float64 train.py exists to compare each with, so the
    # bound is float32's own: each step's loss is a mean over at most STEP_TOKENS trained tokens (measured: 2.1e-7
    # at 1 and 2 threads over the 6 steps).
    assert max_relative_error(alpha0, ce) <= STEP_BOUND, (alpha0, ce)
    # The weighting does something: alpha=1 weights each token by its p (0.3-0.6 on the embedded base), which
    # moves the loss by tens of percent; 1e-2 is far above rounding and far below that.
    assert max_relative_error(dft, ce) > 1e-2, (dft, ce)


@pytest.mark.slow
def test_per_source_metrics_combine_into_the_global_ones(tmp_path: Path) -> None:
    # Packed batches mix the two sources inside one row: the per-token source ids must follow each sample.
    out = tmp_path / "run"
    run_ok(
        out, "debug=quick", "data.packing=true", "training.logging_steps=1", "heldout.file=null", "logger.console=full"
    )
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_nll" in r]
    assert len(train) == 6 and evals
    for record, prefix in [(r, "") for r in train] + [(r, "eval_") for r in evals]:
        tokens = {key: record[f"{prefix}num_tokens/{key}"] for key in SAMPLE_SOURCE_KEYS}
        assert all(count > 0 for count in tokens.values()), record
        for metric in ("nll", "avg_p_correct"):
            combined = sum(record[f"{prefix}{metric}/{key}"] * tokens[key] for key in tokens) / sum(tokens.values())
            # The same per-token values summed per source then combined, against summed at once: float32 rounding
            # of a sum over the interval's tokens (at most STEP_TOKENS per step, 2 steps per logging interval).
            assert combined == pytest.approx(record[f"{prefix}{metric}"], rel=STEP_BOUND), (metric, record)
        if prefix == "":
            assert all(record[f"dft_loss/{key}"] > 0 for key in SAMPLE_SOURCE_KEYS)
    # The two sources are learnt differently: one number per file is what tells them apart (their nll are tens of
    # percent apart here; 1e-3 is far above rounding and far below that).
    assert train[-1]["nll/chat_letters"] != pytest.approx(train[-1]["nll/reverse_alpaca"], rel=1e-3)
    rank_records = [json.loads(line) for line in (out / "logs" / "rank0_metrics.jsonl").read_text().splitlines()]
    for rank_record, record in zip([r for r in rank_records if r["mode"] == "train"], train, strict=True):
        assert {key: s["num_tokens"] for key, s in rank_record["sources"].items()} == {
            key: record[f"num_tokens/{key}"] for key in SAMPLE_SOURCE_KEYS
        }
    # logger.console=full: the step line names each source's nll and leaves the rest of the breakdown to metrics.jsonl.
    step_lines = [line for line in (out / "logs" / "rank0.log").read_text().splitlines() if " step 6/6 loss" in line]
    assert step_lines and "nll/reverse_alpaca" in step_lines[0] and "num_tokens/" not in step_lines[0]


@pytest.mark.slow
def test_gradient_accumulation_split_gives_the_same_losses(tmp_path: Path) -> None:
    common = ("debug=quick", "training.logging_steps=1", "heldout.file=null", "training.eval_strategy=no")
    batch, accumulation = "training.per_device_train_batch_size", "training.gradient_accumulation_steps"
    run_ok(tmp_path / "ga1", f"{batch}=4", f"{accumulation}=1", *common)
    run_ok(tmp_path / "ga4", f"{batch}=1", f"{accumulation}=4", *common)
    whole, split = train_losses(tmp_path / "ga1"), train_losses(tmp_path / "ga4")
    assert len(whole) == 6
    # The same samples per step, in micro-batches of 1 or 4, normalised by the step's token count: the same
    # per-token losses summed in another grouping (measured: 2.4e-7 at 1 and 2 threads over the 6 steps).
    assert max_relative_error(split, whole) <= STEP_BOUND, (split, whole)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.bogus_key=1"], "training.bogus_key"),
        (
            ["training.lerning_rate=1e-4"],
            "unknown config key 'training.lerning_rate' (did you mean 'training.learning_rate'?)",
        ),
        (["+loss.alfa=0.5"], "unknown config key 'loss.alfa' (did you mean 'loss.alpha'?)"),
        (["data.sources=[missing.jsonl]"], "data.sources[0]: no such file 'missing.jsonl'"),
        (["deepspeed.config=missing.json"], "deepspeed.config: no such file 'missing.json'"),
        (["loss.type=mse"], "loss.type='mse'"),
    ],
)
def test_bad_config_fails_before_any_model_is_built(tmp_path: Path, overrides: list[str], message: str) -> None:
    out = tmp_path / "run"
    result = run_train(out, *overrides, timeout=120)
    # One clear message and status 2, no traceback (HYDRA_FULL_ERROR=1 would keep it).
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_default_demo_shows_learning(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_ok(out)
    report = (out / "heldout.txt").read_text()
    assert report in result.stdout + (out / "logs" / "rank0.log").read_text()
    accuracy = re.search(r"exact match .*before ([\d.]+)%\s+after ([\d.]+)%", report)
    nll = re.search(r"assistant NLL:\s+before ([\d.]+)\s+after ([\d.]+)", report)
    assert accuracy and nll, report
    assert float(accuracy.group(2)) > float(accuracy.group(1)), report
    # The NLLs must be real numbers (a reply mask that found no token once made them read 0.000).
    assert float(nll.group(1)) > 0 and float(nll.group(2)) > 0, report
    evals = [r["eval_avg_p_correct"] for r in read_metrics(out) if "eval_avg_p_correct" in r]
    assert evals[-1] > evals[0], evals
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0

    png = (out / "loss.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])  # the PNG IHDR chunk
    assert png.startswith(b"\x89PNG") and (width, height) == (800, 450)
    samples = (out / "samples.md").read_text()
    assert samples.count("\n| ") == 1 + 8  # header + heldout.show rows
    assert "| yes |" in samples  # the trained model gets some validation replies right


@pytest.mark.slow
def test_training_output_dir_alone_holds_the_whole_run_and_a_second_run_says_what_it_replaces(tmp_path: Path) -> None:
    run_dir = tmp_path / "hf_style"
    overrides = ("debug=quick", NO_HELDOUT, f"training.output_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}")
    first = run_ok(None, *overrides, "training.save_steps=4")
    assert "training.save_steps=4 does nothing with training.save_strategy=no" in first.stdout
    for name in ("model.safetensors", "config.yaml", "metrics.jsonl", "logs/rank0.log", "logs/rank0_metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert f"Output directory {run_dir.resolve()}" in first.stdout
    first_records = {name: lines(run_dir / name) for name in ("metrics.jsonl", "logs/rank0_metrics.jsonl")}
    second = run_ok(None, *overrides)
    assert f"{run_dir} already holds a trained model (model.safetensors): this run replaces it" in second.stdout
    # The replacing run's metrics start afresh: the same steps once each, not appended to the first run's (an
    # appended per-rank file made evaluation.compare see another data order in a reused output directory).
    for name, before in first_records.items():
        after = lines(run_dir / name)
        assert [r["step"] for r in after] == [r["step"] for r in before] and before, name


@pytest.mark.slow
def test_a_multirun_sweep_gives_each_job_its_own_directory(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_ok(None, "-m", "debug=quick", NO_HELDOUT, "loss.alpha=0,1", f"output_dir={sweep}", f"data.cache_dir={tmp_path}")
    alphas = {}
    for alpha in ("0", "1"):
        job = sweep / f"debug=quick,loss.alpha={alpha}"
        assert (job / "model.safetensors").is_file() and (job / "config.yaml").is_file(), job
        alphas[alpha] = {
            r["dft_alpha"]
            for r in map(json.loads, (job / "metrics.jsonl").read_text().splitlines())
            if "dft_alpha" in r
        }
    assert alphas == {"0": {0.0}, "1": {1.0}}  # each job trained with its own alpha, into its own directory


@pytest.mark.slow
def test_activation_checkpointing_trains_and_the_banner_says_so(tmp_path: Path) -> None:
    # The same 6 steps with and without activation checkpointing: the backward recomputes the same float32 forward
    # ops, so the losses agree to float32 rounding (STEP_BOUND; bitwise in practice here) and any real difference
    # (a skipped layer, a dropped gradient: 1e-2 or more) fails.
    common = ("debug=quick", NO_HELDOUT, "training.eval_strategy=no", "training.logging_steps=1")
    plain = run_ok(tmp_path / "plain", *common)
    checkpointed = run_ok(tmp_path / "ckpt", *common, "training.activation_checkpointing=true")
    assert re.search(r"activation ckpt\s+off", plain.stdout) and re.search(r"activation ckpt\s+on", checkpointed.stdout)
    assert re.search(r"precision\s+fp32 \(weights float32\)", checkpointed.stdout)
    assert max_relative_error(train_losses(tmp_path / "ckpt"), train_losses(tmp_path / "plain")) <= STEP_BOUND
