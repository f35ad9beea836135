"""The GPU check: every CUDA path of the project in one call on a machine with one H100 or H200, whose image has
Python 3.12, torch (CUDA), transformers, accelerate, peft, triton and pytest, plus the wheels of
`requirements-gpu-carry.txt`. `scripts/gpu_check.sh` installs those and runs `python -m bench.gpu_check --out DIR`,
which writes `DIR/gpu_check.json` (and each child's log in `DIR/logs/`), prints a table, and exits non-zero when a
part failed. Its parts, each with its status (passed, failed, or skipped with the reason) and seconds:

1. `gpu_tests`: the `gpu`-marked tests (QLoRA: skipped without bitsandbytes, which the carry list leaves out).
2. `attention`: a tiny Qwen2 and a tiny Gemma 2 (attention soft-cap, sliding window shorter than the longest
   sample) on a padded batch and on the same samples packed into one row with position ids restarting per sample
   (`data.packing=true`'s `PaddingFreeCollator`), loss and every parameter's gradient, with `eager`, `sdpa` and,
   when `flash_attn` imports, `flash_attention_2` (else recorded as skipped with the reason), in float32 (not
   FlashAttention, which has none) and bf16, each against float32 `eager` on the padded batch.
3. `fused_head`: `fused_dft_loss` against the full-logits `dft_loss` in bf16 on the device, with and without
   Gemma 2's final soft-cap, at Qwen2.5-1.5B's head (1536 x 151,936) over 4,096 tokens: loss and the gradients of
   the hidden states and the head's weight, each against the same loss in float32.
4. `throughput`: `python -m bench.train_throughput_gpu --steps 12 --loss dft`: the project's DFT and TRL's, with
   and without Liger's kernels when liger-kernel imports; tokens/s, MFU and peak memory of each row.
5. `train_run`: `train.py` on the embedded tiny model on the GPU in bf16 (30 steps, a log every 5): the logged
   `mfu` and `peak_memory_gb` must be there. The model is tiny, so its MFU says the path works, not how fast.

Bounds. Errors are relative in norm: `|x - x_ref| / |x_ref|` over the loss, or over all gradients at once.
- float32: `FLOAT32_BOUND` = 1e-4. Float32 rounds each result by eps = 1.2e-7; through a few layers of sums of at
  most a few thousand terms errors grow as eps x sqrt(terms) x layers, about 1e-5 here, and 1e-4 leaves ten times
  that. A packed row whose samples attend to each other (positions running on across the row) moves the gradients
  by far more: the check runs that wrong layout too and records its errors (`leak_loss_error`, `leak_grad_error`)
  next to the bound. The loss of a randomly initialised model hardly depends on the context, so it moves less:
  the gradients carry this check.
- bf16: a bf16 kernel must be at most twice as far from the float32 result as the plain path in bf16 is (`eager`
  on the padded batch for attention, the full-logits loss for the head), or one bf16 rounding (2**-8 = 3.9e-3)
  when that is larger: both round the same inputs and outputs to 8 significant bits, so they land about as far
  from float32 as each other (2x leaves room for another order of accumulation), while a kernel that drops a
  block, mixes packed samples or mis-scales lands at O(1).

`--dry-run` runs every part on CPU at a tiny size (the `gpu` tests skip, the throughput benchmark runs its
`--smoke` mode, `train.py` runs on CPU and logs no `mfu`), so CI checks that the parts run and the JSON renders;
`scripts/gpu_check.sh --dry-run` runs it in an environment that holds only the GPU image's packages and the carried
ones (`--image-env`), so a module neither provides fails there as it would on the machine.

The JSON of a GPU run makes the "GPU check" section of docs/benchmarks.md: `python -m bench.gpu_check --docs-from
DIR/gpu_check.json` stores it as `bench/results/gpu_check.json` and writes the section from it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.docs import DOCS_PATH, replace_docs_section
from embedded.families import FamilySize, family_model
from embedded.paths import REPO_ROOT

RESULTS_PATH = REPO_ROOT / "bench" / "results" / "gpu_check.json"
CARRY_LIST = REPO_ROOT / "requirements-gpu-carry.txt"
SECTION_HEADING = "## GPU check"
JSON_NAME = "gpu_check.json"
# What the GPU machines' image holds besides Python (and these packages' own dependencies).
IMAGE_PACKAGES = ("torch", "transformers", "accelerate", "peft", "triton", "pytest")
FLOAT32_BOUND = 1e-4
BF16_EPS = 2.0**-8
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
ATTENTION_FAMILIES = ("qwen2", "gemma2")
REFERENCE_ATTENTION = "eager"
FLASH = "flash_attention_2"
SOFTCAP = 30.0  # Gemma 2's final logit soft-cap
HEAD_OUTPUTS = ("loss", "hidden_grad", "weight_grad")
PARTS = ("gpu_tests", "attention", "fused_head", "throughput", "train_run")


@dataclass(frozen=True)
class CheckScale:
    """Sizes of a GPU run and of a dry run."""

    attention_size: FamilySize
    sample_lengths: tuple[int, ...]
    """The attention batch's samples; the longest exceeds Gemma 2's sliding window (max positions / 4)."""
    head_tokens: int
    head_hidden: int
    head_vocab: int
    throughput_args: tuple[str, ...]
    train_steps: int
    train_logging_steps: int
    part_timeout_s: int


GPU = CheckScale(
    FamilySize(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    (700, 301, 128, 37),
    head_tokens=4096,
    head_hidden=1536,
    head_vocab=151936,
    throughput_args=("--steps", "12", "--loss", "dft"),
    train_steps=30,
    train_logging_steps=5,
    part_timeout_s=240,
)
DRY = CheckScale(
    FamilySize(vocab_size=256, hidden_size=32, intermediate_size=64, max_position_embeddings=64),
    (29, 17, 5),
    head_tokens=64,
    head_hidden=32,
    head_vocab=512,
    throughput_args=("--smoke", "--loss", "dft"),
    train_steps=4,
    train_logging_steps=2,
    part_timeout_s=300,
)


# --- parts -------------------------------------------------------------------------------------------------------


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    difference = (value.double() - reference.double()).norm()
    return float(difference / reference.double().norm().clamp_min(1e-30))


def bf16_bound(baseline_error: float) -> float:
    """A bf16 kernel's bound: twice the plain bf16 path's error, or one bf16 rounding (module docstring)."""
    return max(2 * baseline_error, BF16_EPS)


def random_samples(lengths: tuple[int, ...], vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def padded_batch(samples: list[list[int]], device: str) -> dict[str, torch.Tensor]:
    """One sample a row, right-padded; padding never trained."""
    from core.keys import IGNORE_INDEX

    width = max(len(s) for s in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample)] = torch.tensor(sample)
        mask[row, : len(sample)] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def packed_batch(samples: list[list[int]], device: str, restart_positions: bool = True) -> dict[str, torch.Tensor]:
    """The samples in one row as `data.packing=true` gives them; with `restart_positions=False`, the wrong layout
    whose samples attend to each other (positions run on across the row), the control of the float32 bound."""
    from data_pipeline.packing import PaddingFreeCollator

    batch = PaddingFreeCollator()([{"input_ids": s, "labels": s} for s in samples])
    if not restart_positions:
        batch["position_ids"] = torch.arange(batch["input_ids"].size(1)).unsqueeze(0)
    return {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    # No cache, as in training: with one, transformers builds a plain causal mask and packed samples see each other.
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
    return loss.detach().float().cpu(), grads.cpu()


def flash_attention_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "FlashAttention-2 needs a CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed (no wheel to carry: its source build needs CUDA and hours)"
    if torch.cuda.get_device_capability() < (8, 0):
        return "FlashAttention-2 needs an Ampere or newer GPU"
    return None


def unsupported_attention(model: torch.nn.Module, implementation: str) -> str | None:
    """transformers' reason when `model`'s architecture has no `implementation` (Gemma 2 has no sdpa), else None."""
    try:
        copy.deepcopy(model).set_attn_implementation(implementation)
    except ValueError as error:
        return str(error).split(". ")[0]
    return None


def attention_errors(
    base: torch.nn.Module,
    implementation: str,
    dtype: torch.dtype,
    batch: dict[str, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
) -> tuple[float, float]:
    """The loss's and the gradients' errors of a copy of `base` in `dtype` with `implementation` on `batch`."""
    model = copy.deepcopy(base).to(dtype)
    model.set_attn_implementation(implementation)
    loss, grads = loss_and_grads(model, batch)
    return relative_error(loss, reference[0]), relative_error(grads, reference[1])


def attention_part(scale: CheckScale, device: str) -> dict:
    samples = random_samples(scale.sample_lengths, scale.attention_size.vocab_size)
    layouts = {"padded": padded_batch(samples, device), "packed": packed_batch(samples, device)}
    flash_skip = flash_attention_unavailable(device)
    rows, failures = [], []
    for family in ATTENTION_FAMILIES:
        base = family_model(family, scale.attention_size, attn_implementation=REFERENCE_ATTENTION).to(device)
        reference = loss_and_grads(base, layouts["padded"])
        leak = packed_batch(samples, device, restart_positions=False)
        leak_loss, leak_grads = attention_errors(base, REFERENCE_ATTENTION, torch.float32, leak, reference)
        baseline = attention_errors(base, REFERENCE_ATTENTION, torch.bfloat16, layouts["padded"], reference)
        for implementation in (REFERENCE_ATTENTION, "sdpa", FLASH):
            skip = flash_skip if implementation == FLASH else unsupported_attention(base, implementation)
            if skip:
                rows.append({"family": family, "implementation": implementation, "skipped": skip})
                continue
            dtypes = (torch.bfloat16,) if implementation == FLASH else (torch.float32, torch.bfloat16)
            for dtype in dtypes:
                for layout, batch in layouts.items():
                    loss_error, grad_error = attention_errors(base, implementation, dtype, batch, reference)
                    if dtype == torch.float32:
                        loss_bound = grad_bound = FLOAT32_BOUND
                    else:
                        loss_bound, grad_bound = bf16_bound(baseline[0]), bf16_bound(baseline[1])
                    row = {
                        "family": family,
                        "implementation": implementation,
                        "dtype": str(dtype).removeprefix("torch."),
                        "layout": layout,
                        "loss_error": loss_error,
                        "loss_bound": loss_bound,
                        "grad_error": grad_error,
                        "grad_bound": grad_bound,
                        "ok": loss_error <= loss_bound and grad_error <= grad_bound,
                    }
                    if dtype == torch.float32:
                        row |= {"leak_loss_error": leak_loss, "leak_grad_error": leak_grads}
                    rows.append(row)
                    if not row["ok"]:
                        failures.append(f"{family} {implementation} {row['dtype']} {layout}")
    result = {"rows": rows, "reference": f"{REFERENCE_ATTENTION} float32, padded"}
    if failures:
        return {"status": FAILED, "error": "outside the bound: " + ", ".join(failures), **result}
    return {"status": PASSED, **result}


def fused_head_part(scale: CheckScale, device: str) -> dict:
    from core.keys import IGNORE_INDEX
    from dft.loss import dft_loss, fused_dft_loss

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, scale.head_tokens, scale.head_hidden, generator=generator)
    weight = torch.randn(scale.head_vocab, scale.head_hidden, generator=generator) / scale.head_hidden**0.5
    labels = torch.randint(0, scale.head_vocab, (1, scale.head_tokens), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = IGNORE_INDEX  # prompt tokens
    labels = labels.to(device)

    def run(fused: bool, dtype: torch.dtype, cap: float | None) -> list[torch.Tensor]:
        h = hidden.to(device, dtype, copy=True).requires_grad_()
        w = weight.to(device, dtype, copy=True).requires_grad_()
        if fused:
            loss, _ = fused_dft_loss(h, w, labels, alpha=1.0, logit_softcap=cap)
        else:
            logits = h @ w.T
            loss, _ = dft_loss(logits if cap is None else cap * torch.tanh(logits / cap), labels, alpha=1.0)
        loss.backward()
        return [loss.detach().float().cpu(), h.grad.float().cpu(), w.grad.float().cpu()]

    rows, failures = [], []
    for cap in (None, SOFTCAP):
        reference = run(False, torch.float32, cap)
        plain = run(False, torch.bfloat16, cap)
        fused = run(True, torch.bfloat16, cap)
        row: dict[str, Any] = {"softcap": cap, "ok": True}
        for name, value, plain_value, ref in zip(HEAD_OUTPUTS, fused, plain, reference, strict=True):
            baseline = relative_error(plain_value, ref)
            error, bound = relative_error(value, ref), bf16_bound(baseline)
            row |= {f"{name}_error": error, f"{name}_plain_error": baseline, f"{name}_bound": bound}
            row["ok"] &= error <= bound
        rows.append(row)
        if not row["ok"]:
            failures.append(f"softcap {cap}")
    shape = {"tokens": scale.head_tokens, "hidden": scale.head_hidden, "vocab": scale.head_vocab}
    if failures:
        return {"status": FAILED, "error": "outside the bound: " + ", ".join(failures), "rows": rows, **shape}
    return {"status": PASSED, "rows": rows, **shape}


def run_child(name: str, command: list[str], out_dir: Path, timeout_s: int) -> None:
    """`command` from the repository root, its output in `out_dir/logs/<name>.log`; raises on a non-zero exit."""
    log = out_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    log.write_text(f"$ {' '.join(command)}\n{completed.stdout}\n{completed.stderr}")
    if completed.returncode != 0:
        raise RuntimeError(f"exit {completed.returncode} (log: logs/{log.name}):\n{completed.stderr[-3000:]}")


def gpu_tests_part(scale: CheckScale, out_dir: Path) -> dict:
    files = sorted(
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.gpu" in path.read_text()
    )
    report = out_dir / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}"]
    run_child("gpu_tests", [*command, *files], out_dir, scale.part_timeout_s)
    tests = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        skipped = case.find("skipped")
        tests.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": SKIPPED if skipped is not None else PASSED,
                **({"reason": skipped.get("message", "")} if skipped is not None else {}),
            }
        )
    status = PASSED if any(t["outcome"] == PASSED for t in tests) else SKIPPED
    return {"status": status, "files": files, "tests": tests}


def throughput_part(scale: CheckScale, out_dir: Path) -> dict:
    path = out_dir / "train_throughput_gpu.json"
    command = [sys.executable, "-m", "bench.train_throughput_gpu", "--json", str(path), *scale.throughput_args]
    run_child("throughput", command, out_dir, scale.part_timeout_s)
    result = json.loads(path.read_text())
    keys = ("side", "loss", "liger", "attn_implementation", "tokens_per_s", "mfu", "peak_allocated_gib")
    rows = [{key: row[key] for key in (*keys, "skipped", "failed") if key in row} for row in result["rows"]]
    # A row that crashed, or that misses a module the carried wheels should have brought, fails the part; a row
    # skipped by design (Liger's kernels without CUDA) does not.
    failed = [f"{row['side']}{'+Liger' if row['liger'] else ''}: {row['failed']}" for row in rows if "failed" in row]
    failed += [f"{row['side']}: no module {row['missing_module']}" for row in result["rows"] if "missing_module" in row]
    outcome = {"status": FAILED, "error": "; ".join(failed)} if failed else {"status": PASSED}
    return {**outcome, "command": result["command"], "peak_flops": result["peak_flops"], "rows": rows}


def train_run_part(scale: CheckScale, out_dir: Path, device: str) -> dict:
    from observability.artifacts import read_metrics
    from observability.flops import cuda_peak_bf16_flops

    run_dir = out_dir / "train_run"
    overrides = [
        f"output_dir={run_dir}",
        f"training.max_steps={scale.train_steps}",
        f"training.logging_steps={scale.train_logging_steps}",
        "training.eval_strategy=no",
        "training.eval_on_start=false",
        "heldout.file=null",
    ]
    if device == "cuda":
        overrides += ["training.use_cpu=false", "training.bf16=true"]
    run_child("train_run", [sys.executable, "train.py", *overrides], out_dir, scale.part_timeout_s)
    logged = [r for r in read_metrics(run_dir) if "step_time" in r]
    last = logged[-1] if logged else {}
    result = {
        "overrides": overrides,
        "logged_steps": [r["step"] for r in logged],
        "mfu": last.get("mfu"),
        "peak_memory_gb": last.get("peak_memory_gb"),
        "tokens_per_second": last.get("tokens_per_second"),
    }
    missing = [key for key in ("peak_memory_gb", "tokens_per_second") if result[key] is None]
    # The logged mfu needs the device's peak: a GPU outside the table (or a MIG slice) logs none, by design.
    if device == "cuda" and result["mfu"] is None and cuda_peak_bf16_flops() is not None:
        missing.append("mfu")
    if missing:
        return {"status": FAILED, "error": f"metrics.jsonl has no {', '.join(missing)}", **result}
    return {"status": PASSED, **result}


def timed(part: Callable[[], dict]) -> dict:
    """A part's result with its seconds; an exception is the part's failure, and the next part still runs."""
    start = time.perf_counter()
    try:
        result = part()
    except Exception as error:  # every part reports, whatever broke in it
        result = {"status": FAILED, "error": "".join(traceback.format_exception_only(error)).strip()[-4000:]}
    return {**result, "seconds": time.perf_counter() - start}


# --- the run -----------------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for name in (*IMAGE_PACKAGES, "flash-attn", "liger-kernel", "bitsandbytes", "trl", "datasets", "hydra-core"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        return None
    completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return completed.stdout.strip() or None


def carried_wheels(wheels_dir: Path | None) -> dict | None:
    """The carried files and their bytes: what the machine took on top of the repository (at most 64 MiB)."""
    if wheels_dir is None:
        return None
    files = {path.name: path.stat().st_size for path in sorted(wheels_dir.iterdir()) if path.is_file()}
    return {"files": files, "bytes": sum(files.values())}


def run_check(out_dir: Path, dry_run: bool, wheels_dir: Path | None = None) -> dict:
    if not dry_run and not torch.cuda.is_available():
        sys.exit("bench.gpu_check: no CUDA GPU here; --dry-run runs every part on CPU at a tiny size")
    scale, device = (DRY, "cpu") if dry_run else (GPU, "cuda")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": "scripts/gpu_check.sh" + (" --dry-run" if dry_run else ""),
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": versions(),
        "carried_wheels": carried_wheels(wheels_dir),
        "parts": {},
    }
    parts = {
        "gpu_tests": lambda: gpu_tests_part(scale, out_dir),
        "attention": lambda: attention_part(scale, device),
        "fused_head": lambda: fused_head_part(scale, device),
        "throughput": lambda: throughput_part(scale, out_dir),
        "train_run": lambda: train_run_part(scale, out_dir, device),
    }
    for name in PARTS:
        result["parts"][name] = timed(parts[name])
        result["seconds"] = time.perf_counter() - start
        # Written after every part: a run stopped by its time limit still leaves the parts it finished.
        (out_dir / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {result['parts'][name]['status']} ({result['parts'][name]['seconds']:.0f} s)", file=sys.stderr)
    return result


def summary(name: str, part: dict) -> str:
    """One line of a part's figures for the table (the status column says whether they are within bounds)."""
    if "error" in part and "rows" not in part:  # with rows, they show what failed
        lines = part["error"].splitlines()  # the exception's line, not the launcher's last word
        return next((line for line in reversed(lines) if "Error" in line), lines[-1])[:300]
    if name == "gpu_tests":
        tests = [f"{t['test'].split('::')[-1]} {t['outcome']} {t.get('reason', '')}".strip() for t in part["tests"]]
        return "; ".join(tests) or "no gpu-marked test collected"
    if name == "attention":
        ran = [r for r in part["rows"] if "skipped" not in r]
        skipped = sorted({f"; {r['implementation']}: {r['skipped']}" for r in part["rows"] if "skipped" in r})
        worst = max(r["grad_error"] / r["grad_bound"] for r in ran)
        return f"{len(ran)} runs, worst gradient error {worst:.2f} of its bound" + "".join(skipped)
    if name == "fused_head":
        worst = max(r[f"{k}_error"] / r[f"{k}_bound"] for r in part["rows"] for k in HEAD_OUTPUTS)
        return f"{part['tokens']} tokens x {part['vocab']} vocabulary, worst error {worst:.2f} of its bound"
    if name == "throughput":
        rows = []
        for r in part["rows"]:
            if "skipped" in r or "failed" in r:
                state = f"skipped ({r['skipped']})" if "skipped" in r else f"FAILED ({r['failed']})"
            else:
                state = f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}"
            rows.append(f"{r['side']}{'+Liger' if r['liger'] else ''} {r['loss']}: {state}")
        return "; ".join(rows)
    mfu = "no mfu logged (no CUDA, or no known peak)" if part["mfu"] is None else f"mfu {part['mfu']:.2%}"
    return f"{mfu}, peak memory {part['peak_memory_gb']:.2f} GB, {part['tokens_per_second']:,.0f} tokens/s"


def format_table(result: dict) -> str:
    lines = ["| part | status | seconds | result |", "|---|---|---:|---|"]
    for name in PARTS:
        part = result["parts"].get(name)
        if part is None:  # the run's time limit stopped it before this part
            lines.append(f"| {name} | not reached | - | - |")
        else:
            lines.append(f"| {name} | {part['status']} | {part['seconds']:.0f} | {summary(name, part)} |")
    return "\n".join(lines)


def format_attention(part: dict) -> str:
    lines = [
        "| model | attention | dtype | layout | loss error (bound) | gradient error (bound) | wrong layout's error |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in part.get("rows", []):
        if "skipped" in r:
            lines.append(f"| {r['family']} | {r['implementation']} | skipped: {r['skipped']} | | | | |")
            continue
        leak = f"{r['leak_grad_error']:.1e}" if "leak_grad_error" in r else ""
        lines.append(
            f"| {r['family']} | {r['implementation']} | {r['dtype']} | {r['layout']} "
            f"| {r['loss_error']:.1e} ({r['loss_bound']:.1e}) "
            f"| {r['grad_error']:.1e} ({r['grad_bound']:.1e}) | {leak} |"
        )
    return "\n".join(lines)


NOT_RUN = (
    'Not run yet: no GPU has been lent to this work so far. `scripts/gpu_check.sh` (README: "A GPU check in one '
    'call") runs every CUDA path on one H100 or H200 in at most 8 minutes and writes `gpu_check.json`; '
    "`python -m bench.gpu_check --docs-from <that file>` keeps it as `bench/results/gpu_check.json` and replaces "
    "this section with its results. What each part compares and why each bound is what it is: `bench/gpu_check.py`'s "
    "docstring."
)


def docs_section(result: dict | None) -> list[str]:
    """The section from a GPU run's JSON; without one (`None`: no results file), what running the check gives."""
    if result is None:
        return [SECTION_HEADING, "", NOT_RUN, ""]
    versions_text = ", ".join(f"{name} {version}" for name, version in result["versions"].items() if version)
    absent = ", ".join(name for name, version in result["versions"].items() if version is None)
    wheels = result["carried_wheels"]
    carried = f", {wheels['bytes'] / 2**20:.1f} MiB of carried wheels" if wheels else ""
    section = [
        SECTION_HEADING,
        "",
        f"Measured {result['date']} with `{result['command']}` on {result['device']} (commit "
        f"{result['commit'] or 'not recorded'}; {versions_text}; not installed: {absent or 'none'}), "
        f"{result['seconds']:.0f} s in all{carried}. What each part runs and why each bound is what it is: "
        "`bench/gpu_check.py`'s docstring. Raw numbers: `bench/results/gpu_check.json`.",
        "",
        format_table(result),
        "",
    ]
    if "rows" in result["parts"].get("attention", {}):
        section += [
            "Attention, against float32 eager on the padded batch (errors relative in norm):",
            "",
            format_attention(result["parts"]["attention"]),
            "",
        ]
    return section


def write_docs(json_path: Path, docs_path: Path | None) -> None:
    """The section from a check's JSON; a GPU run's JSON is also kept as `bench/results/gpu_check.json`. A dry
    run's section goes only to an explicit `docs_path`: its numbers are no GPU's."""
    result = json.loads(json_path.read_text())
    if docs_path is None:
        if result["dry_run"]:
            sys.exit("bench.gpu_check: a dry run's JSON holds no GPU figures; give --docs PATH to render it elsewhere")
        if json_path.resolve() != RESULTS_PATH.resolve():
            RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(json_path, RESULTS_PATH)
    replace_docs_section(docs_section(result), docs_path=docs_path)


# --- an environment like the GPU image, for the dry run ---------------------------------------------------------


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_distributions() -> set[str]:
    """The distribution names `requirements-gpu-carry.txt` pins."""
    names = set()
    for line in CARRY_LIST.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            names.add(normalized(re.split(r"[=<>!~\[; ]", requirement)[0]))
    return names


def image_distributions() -> set[str]:
    """`IMAGE_PACKAGES` and everything they require (extras left out), as installed here."""
    from packaging.requirements import Requirement

    found: set[str] = set()
    pending = list(IMAGE_PACKAGES)
    while pending:
        name = normalized(pending.pop())
        if name in found:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. triton, which CPU torch does not bring
        found.add(name)
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def make_image_env(env_dir: Path) -> Path:
    """A virtual environment at `env_dir` holding, as links into this one's site-packages, only the distributions
    the GPU image has (`image_distributions`) and the carried ones; returns its Python."""
    if env_dir.exists():
        shutil.rmtree(env_dir)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    allowed = image_distributions() | carried_distributions()
    for distribution in importlib.metadata.distributions():
        if normalized(distribution.metadata["Name"]) not in allowed:
            continue
        for top in {Path(str(f)).parts[0] for f in distribution.files or ()} - {"..", "__pycache__"}:
            source, target = Path(str(distribution.locate_file(top))), site / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
    return env_dir / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "gpu_check", help="results directory")
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU at a tiny size")
    parser.add_argument("--docs-from", type=Path, help="write the docs section from this gpu_check.json, then exit")
    parser.add_argument("--docs", type=Path, help=f"with --docs-from: the file to write to (default {DOCS_PATH})")
    parser.add_argument("--wheels", type=Path, help="the carried wheels' directory, to record their sizes")
    parser.add_argument("--image-env", type=Path, help="make an environment like the GPU image here, then exit")
    args = parser.parse_args()
    if args.image_env:
        print(make_image_env(args.image_env))
        return
    if args.docs_from:
        write_docs(args.docs_from, args.docs)
        return
    result = run_check(args.out, args.dry_run, args.wheels)
    print(format_table(result))
    failed = [name for name, part in result["parts"].items() if part["status"] == FAILED]
    if failed:
        sys.exit(f"bench.gpu_check: failed: {', '.join(failed)} (details in {args.out / JSON_NAME})")


if __name__ == "__main__":
    main()
