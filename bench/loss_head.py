"""Peak memory and time of one forward+backward through the LM head and loss: five implementations of DFT, and ASFT
and EAFT fused vs on full logits (issues 5, 17, 26).

Variants, all float32 with every token trained, on `hidden [1, tokens, hidden]`, `weight [vocab, hidden]`:

- `naive softmax`: the seed's recipe. Full logits `hidden @ weight.T`, `probs = softmax(logits)` over the whole
  vocabulary, `p = probs.gather(target)` detached, then `sum(CE * p) / N`. Logits, probabilities and the
  cross-entropy's saved log-softmax all exist at once.
- `dft_loss`: full logits, then `dft.loss.dft_loss` (`p = exp(-CE)`, no second softmax).
- `fused_dft_loss`: `dft.loss.fused_dft_loss`, one `[chunk, vocab]` block of logits at a time, its gradients
  computed in the forward (chunk `auto`, the `loss.chunk_size` default, sized by `dft.loss.auto_chunk_size`; 1024,
  the default before it; and 256).
- `chunked CE`: the usual pure-PyTorch memory saver for plain cross-entropy, and so the fair baseline for what the
  DFT weighting costs: the same chunks of 1024 tokens, each `F.cross_entropy(rows @ weight.T, reduction="sum")`
  under `torch.utils.checkpoint` (non-reentrant), so a chunk's logits are dropped after its forward and recomputed
  in its backward. Autograd sums the per-chunk `[vocab, hidden]` weight gradients.
- `TRL tiled head, DFT`: what TRL's `SFTTrainer(loss_type="dft")` runs (`trl/trainer/sft_trainer.py`,
  `compute_loss`; `trl/trainer/utils.py`, `add_fused_lm_head`): `ChunkedLogProbFunction` from
  `trl/kernels/chunked_logprob.py` over tiles of 4096 tokens x 32768 vocabulary entries, with the outputs the
  SFTTrainer asks for (`log_probs`, `entropy`, `is_top1`), then `sum(-log_p * exp(log_p).detach()) / N`. Without
  Triton (CPU) TRL folds each tile with torch ops and scores every position; on a Triton device it scores the
  trained positions only, as here. Needs the `bench` extra (`pip install -e .[bench]`).
- The other objectives of `dft.objectives` (issue 26), each fused against the full-logits formulation
  LLaMA-Factory uses (`asft_loss_func`, `eaft_loss_func`), at `build_objective(LossConfig(type=...))`'s defaults
  and alpha 1:
  - `ASFT full logits`: `dft.loss.objective_loss(hidden @ weight.T, ..., reference_logits=reference_hidden @
    reference_weight.T)`: the policy's and the reference's full float32 `[tokens, vocab]` logits, the log-softmax
    of each, `KL(reference || policy)` summed over the vocabulary, plus the DFT term (kl_coef 0.1).
    LLaMA-Factory's shifted `.contiguous()` copies of both logits are not made here, so it is a lower bound of
    theirs. The reference model's side is a second random `[1, tokens, hidden]` tensor and a second `[vocab,
    hidden]` head weight, without gradients, made with the inputs (so outside the measured peak, like theirs).
  - `ASFT fused`: `dft.loss.fused_objective_loss` with the same reference, chunk `auto` (which divides the block
    budget among its `KL_BLOCKS` float32 blocks per chunk): neither model's `[tokens, vocab]` logits exist.
  - `EAFT full logits` / `EAFT fused`: the same two heads for EAFT, CE weighted by the normalised entropy of the
    top 20 logits (`objective_loss` on full logits, which takes `topk` of the `[tokens, vocab]` block, and
    `fused_objective_loss` chunk `auto`).
  A second table sets each fused objective against its full-logits form, and against `fused_dft_loss` (chunk
  `auto`), which a fused objective's process times too, step for step after each of its own timed steps, on the
  same inputs (`fused_dft_median_s` in the JSON): what the objective's extra work costs per step, with other jobs'
  load falling on both alike.

How memory is measured: each variant runs in a fresh Python process (so no allocator cache or earlier peak carries
over). After torch is imported and the inputs exist, the process resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and records its current RSS; after one forward+backward it reads the
new peak (`VmHWM` in `/proc/self/status`). The reported figure is peak minus that baseline: every byte the loss and
its backward touched at their worst moment, as the OS saw it, including the gradients of the hidden states and of
the weight (`vocab * hidden * 4` bytes in every variant) and allocator overhead. It is RSS, not a sum of tensor
sizes, so it cannot miss temporaries that a tensor-level count would. The loss head's extra peak is that figure
minus the float32 gradients of the weight and of the hidden states (`(vocab + tokens) * hidden * 4` bytes, from the
shapes): buffers every variant must hold, which alone are about 0.15x of the naive head's peak at the medium size,
so a goal of 1/8 of the naive peak is stated on the extra peaks. Where `clear_refs` is not writable the process
falls back to `ru_maxrss` minus the baseline, which can only under-report a peak below the import-time one (flagged
in the JSON). With `--device cuda` the figure is `torch.cuda.max_memory_allocated()` over the allocation before.

Before each variant the parent reads `MemAvailable` from `/proc/meminfo` and skips the variant, recording why, when
its estimated need (see `estimated_bytes`) would not fit: the naive variants need about 15 GB at full size.

Time: the first forward+backward (the memory run) is the warm-up; then the median of a few further runs in the same
process (gradients reset between runs), with torch's default thread count; the process's CPU time of those runs is
recorded too. With `--repeats N` each size's variants run N times, round-robin (so load from other jobs falls on all
of them alike); a row keeps the fastest of its N medians, and the largest of its N peaks.

Sizes (`--sizes`, default all): `full` is the issue's 8192 tokens x hidden 896 x vocab 151,936 (Qwen2.5-0.5B's
head; about 1.1 TFLOP per matmul, tens of minutes on 2 cores), `medium` the same head on 2048 tokens, `small`
512 x 256 x 16,384, `vocab64k` 2048 x 256 x 65,536 (issue 17).

Run: `.venv/bin/python bench/loss_head.py --sizes small medium vocab64k` (about 10 minutes on 2 cores; `full` alone
takes about an hour, and `--sizes full --variants fused_dft_loss` about 5 minutes). The rows of 2026-12-03 came from
`--sizes small vocab64k --repeats 3`, `--sizes medium`, `--sizes medium --variants fused_dft_loss --repeats 2` and
`--sizes full --variants fused_dft_loss`. Those of 2026-12-06 (issue 26), on a machine loaded by other jobs, from
`--variants "ASFT full logits" "EAFT full logits" "ASFT fused" "EAFT fused" fused_dft_loss` with `--sizes small vocab64k
--repeats 3`, `--sizes medium --repeats 2` and `--sizes full` (about 80 minutes under that load), and then the fused
objectives again, timed against fused_dft_loss step for step, with `--variants "ASFT fused" "EAFT fused"` and the same
three size options, then the small size's four rows again, round-robin, with `--sizes small --variants "ASFT full
logits" "ASFT fused" "EAFT full logits" "EAFT fused" --repeats 5`; the first run's fused_dft_loss rows, slowed up to 3x
by the load, were not kept (the rows of 2026-12-03 stand; all those runs are kept as one, migrated when runs began to be
kept). Prints a table, appends the run (its rows, date, commit and load) to the runs kept in
`bench/results/loss_head.json` (`bench.runs`), and writes the tables into `docs/benchmarks.md` under its own heading:
each row's latest measurement (a row skipped now for lack of memory does not hide an earlier measurement), and the
issues' goals, each ratio taken within every run that measured both its rows and judged on the median of those runs,
the worst beside it (`--docs-only` rewrites that section from the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "loss_head.json"
SECTION_HEADING = "## Loss head: memory and time"
MIB, GIB = 2**20, 2**30

SIZES = {
    "full": (8192, 896, 151936),
    "medium": (2048, 896, 151936),
    "small": (512, 256, 16384),
    "vocab64k": (2048, 256, 65536),
}
TIMED_RUNS = {"full": 1, "medium": 1, "small": 3, "vocab64k": 3}
AUTO = "auto"
NAIVE, DFT_LOSS, FUSED, CHUNKED_CE, TRL = "naive softmax", "dft_loss", "fused_dft_loss", "chunked CE", "TRL tiled, DFT"
ASFT_FULL, ASFT_FUSED, EAFT_FULL, EAFT_FUSED = "ASFT full logits", "ASFT fused", "EAFT full logits", "EAFT fused"
# variant: (loss.type, fused); ASFT's also need the reference model's hidden states and head.
OBJECTIVE_VARIANTS = {
    ASFT_FULL: ("asft", False),
    ASFT_FUSED: ("asft", True),
    EAFT_FULL: ("eaft", False),
    EAFT_FUSED: ("eaft", True),
}
# (variant, chunk): chunk is tokens per block for ours and the checkpointed CE, vocabulary entries per tile for TRL.
FUSED_CHUNK = 1024  # loss.chunk_size default before `auto`: issue 5's goals are checked at this chunk
TRL_VOCAB_TILE, TRL_TOKEN_TILE = 32768, 4096  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, kernels TOKEN_CHUNK_SIZE
VARIANTS = [
    (NAIVE, None),
    (DFT_LOSS, None),
    (FUSED, AUTO),
    (FUSED, FUSED_CHUNK),
    (FUSED, 256),
    (CHUNKED_CE, FUSED_CHUNK),
    (TRL, TRL_VOCAB_TILE),
    (ASFT_FULL, None),
    (ASFT_FUSED, AUTO),
    (EAFT_FULL, None),
    (EAFT_FUSED, AUTO),
]
ALPHA = 1.0
# Besides the loss's own need: the child's torch import and inputs, and room for the rest of the machine.
MEMORY_MARGIN = 2 * GIB


def gradient_buffers_bytes(tokens: int, hidden: int, vocab: int) -> int:
    """The float32 gradients of the weight and of the hidden states: every variant holds them at its peak."""
    return (vocab + tokens) * hidden * 4


def needs_reference(variant: str) -> bool:
    return OBJECTIVE_VARIANTS.get(variant, (None,))[0] == "asft"


def resolved_chunk(variant: str, chunk: int | str | None, tokens: int, hidden: int, vocab: int) -> int | None:
    """The chunk a variant runs with: `auto` as `fused_objective_loss` sizes it (float32 hidden states here)."""
    if chunk != AUTO:
        return chunk
    import torch

    from dft.loss import KL_BLOCKS, auto_chunk_size

    blocks = KL_BLOCKS if needs_reference(variant) else 1
    return auto_chunk_size(tokens, hidden, vocab, torch.float32, blocks=blocks)


def estimated_bytes(variant: str, chunk: int | None, tokens: int, hidden: int, vocab: int) -> int:
    """Peak the variant needs, from its largest live tensors (float32); calibrated on the small and medium rows."""
    logits = tokens * vocab * 4
    weight = vocab * hidden * 4
    if variant == NAIVE:
        return 4 * logits + 2 * weight  # logits, probs, saved log-softmax, logits gradient
    if variant == DFT_LOSS:
        return 3 * logits + 2 * weight
    if variant == TRL:
        return 6 * min(tokens, TRL_TOKEN_TILE) * chunk * 4 + 2 * weight  # the tile and the torch fold's temporaries
    if variant == ASFT_FULL:
        # Both models' logits and log-softmax, q, q * (log q - log p), CE's saved log-softmax, then their gradients.
        return 9 * logits + 3 * weight
    if variant == EAFT_FULL:
        return 3 * logits + 2 * weight  # as dft_loss: topk adds [tokens, 20]
    if variant == ASFT_FUSED:
        return 6 * min(tokens, chunk) * vocab * 4 + 4 * weight  # KL_BLOCKS blocks of a chunk and their temporaries
    return 4 * min(tokens, chunk) * vocab * 4 + 3 * weight  # fused and chunked CE: a few blocks of one chunk


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line (Linux >= 3.14)")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def loss_function(variant: str, chunk: int | None, reference: tuple[Any, Any] | None = None) -> Callable[..., Any]:
    """`(hidden [1, T, H], weight [V, H], labels [1, T]) -> scalar loss` for one variant; `reference`, the reference
    model's `(hidden [1, T, H], weight [V, H])`, for ASFT's variants."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from config.schema import LossConfig
    from dft.loss import IGNORE_INDEX, dft_loss, fused_dft_loss, fused_objective_loss, objective_loss, shift_labels
    from dft.objectives import build_objective

    def naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = (hidden @ weight.T).float().reshape(-1, weight.size(0))
        targets = shift_labels(labels).reshape(-1)
        valid = targets != IGNORE_INDEX
        probs = torch.softmax(logits, dim=-1)
        p_correct = probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).detach()
        nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        return (nll * p_correct * valid).sum() / valid.sum()

    def chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = shift_labels(labels).reshape(-1)
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        flat = hidden.reshape(-1, hidden.size(-1))
        total = hidden.new_zeros(())
        for start in range(0, rows.numel(), chunk):
            chunk_rows = rows[start : start + chunk]
            total = total + checkpoint(
                _chunk_ce_sum, flat[chunk_rows], weight, targets[chunk_rows], use_reentrant=False
            )
        return total / rows.numel()

    def _chunk_ce_sum(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((rows @ weight.T).float(), targets, reduction="sum")

    def trl_dft(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # trl/trainer/utils.py `_fused_forward`: shift, score (compact on Triton devices), scatter back, mask.
        states, targets = hidden[:, :-1], labels[:, 1:]
        mask = targets != IGNORE_INDEX
        compact = _use_triton(states.device)
        log_probs, *_ = ChunkedLogProbFunction.apply(
            states[mask] if compact else states.reshape(-1, states.size(-1)),
            weight,
            None,
            targets[mask] if compact else targets.clamp(min=0).reshape(-1),
            1.0,
            chunk,
            None,
            1.0,
            ("log_probs", "entropy", "is_top1"),
        )
        if compact:
            log_probs = log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
        else:
            log_probs = log_probs.view(mask.shape).masked_fill(~mask, 0)
        # trl/trainer/sft_trainer.py `compute_loss`, loss_type="dft".
        per_token_loss = -log_probs * log_probs.exp().detach()
        return per_token_loss.sum() / mask.sum().clamp(min=1)

    if variant == NAIVE:
        return naive
    if variant == DFT_LOSS:
        return lambda hidden, weight, labels: dft_loss(hidden @ weight.T, labels, ALPHA)[0]
    if variant == FUSED:  # chunk "auto" is passed as is: the loss sizes it, as in training
        return lambda hidden, weight, labels: fused_dft_loss(hidden, weight, labels, ALPHA, chunk_size=chunk)[0]
    if variant == CHUNKED_CE:
        return chunked_ce
    if variant in OBJECTIVE_VARIANTS:
        loss_type, fused = OBJECTIVE_VARIANTS[variant]
        objective = build_objective(LossConfig(type=loss_type), ALPHA)
        reference_hidden, reference_weight = reference or (None, None)
        if fused:  # chunk "auto" as in training: with the KL term it shares the budget among KL_BLOCKS blocks
            return lambda hidden, weight, labels: fused_objective_loss(
                hidden,
                weight,
                labels,
                objective,
                chunk_size=chunk,
                reference_hidden_states=reference_hidden,
                reference_lm_head_weight=reference_weight,
            )[0]
        return lambda hidden, weight, labels: objective_loss(
            hidden @ weight.T,
            labels,
            objective,
            reference_logits=None if reference is None else reference_hidden @ reference_weight.T,
        )[0]
    if variant == TRL:
        # Imported here, before the baseline, not in the measured step: the kernel's backward imports
        # trl.trainer.utils (and with it transformers), hundreds of MiB of RSS that are not the loss's.
        import trl.trainer.utils  # noqa: F401
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

        return trl_dft
    raise ValueError(f"unknown variant {variant!r}")


def measure_one(
    variant: str, chunk: int | str | None, size: tuple[int, int, int], timed_runs: int, device: str
) -> dict:
    """Run in a fresh process: peak memory over the baseline of one forward+backward, then the median time."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    tokens, hidden_size, vocab = size
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)
    reference = None
    if needs_reference(variant):  # the frozen model's side: drawn after the policy's, which stay as in every row
        reference = (
            torch.randn(1, tokens, hidden_size, generator=generator).to(device),
            (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(device),
        )
    loss_fn = loss_function(variant, chunk, reference)
    # A fused objective is timed step for step against fused_dft_loss (chunk auto) on the same inputs, so that other
    # jobs' load falls on both alike: the ratio is what the objective's extra work costs per step.
    dft_fn = loss_function(FUSED, AUTO) if OBJECTIVE_VARIANTS.get(variant, (None, False))[1] else None
    cuda = device.startswith("cuda")

    def step(fn: Callable[..., Any] = loss_fn) -> float:
        hidden.grad, weight.grad = None, None
        loss = fn(hidden, weight, labels)
        loss.backward()
        return loss.item()  # .item() also waits for the device

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline, peak_reset = torch.cuda.memory_allocated(), True
    else:
        peak_reset = reset_peak_rss()
        baseline = rss_bytes()
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    elif peak_reset:
        peak, method = peak_rss_bytes(), "VmHWM after clear_refs"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    if dft_fn is not None:
        step(dft_fn)  # its warm-up, once the peak has been read
    timings = {fn: ([], []) for fn in (loss_fn, dft_fn) if fn is not None}
    for _ in range(timed_runs):
        for fn, (seconds, cpu_seconds) in timings.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step(fn)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    seconds, cpu_seconds = timings[loss_fn]
    paired = {}
    if dft_fn is not None:
        dft_seconds, dft_cpu_seconds = timings[dft_fn]
        paired = {
            "fused_dft_median_s": statistics.median(dft_seconds),
            "fused_dft_median_cpu_s": statistics.median(dft_cpu_seconds),
        }
    return {
        "loss": loss,
        "peak_mib": (peak - baseline) / MIB,
        "median_s": statistics.median(seconds),
        "times_s": seconds,
        "median_cpu_s": statistics.median(cpu_seconds),
        "peak_method": method,
        "baseline_below_earlier_peak": (not peak_reset) and baseline_maxrss > baseline,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **paired,
    }


def run_variant(size_name: str, variant: str, chunk: int | str | None, device: str) -> dict:
    """One row: measured in a fresh process, or skipped with the reason."""
    tokens, hidden_size, vocab = SIZES[size_name]
    row = {
        "date": datetime.date.today().isoformat(),
        "size": size_name,
        "tokens": tokens,
        "hidden": hidden_size,
        "vocab": vocab,
        "variant": variant,
        "chunk": chunk,
        "chunk_tokens": resolved_chunk(variant, chunk, tokens, hidden_size, vocab),
        "device": device,
        "full_logits_mib": tokens * vocab * 4 / MIB,
        "weight_grad_mib": vocab * hidden_size * 4 / MIB,
        "gradient_buffers_mib": gradient_buffers_bytes(tokens, hidden_size, vocab) / MIB,
    }
    if variant == TRL:
        try:
            import trl  # noqa: F401
        except ImportError:
            return {**row, "skipped": "TRL is not installed (pip install -e '.[bench]')"}
    need = estimated_bytes(variant, row["chunk_tokens"], tokens, hidden_size, vocab) + MEMORY_MARGIN
    available = mem_available_bytes()
    if device == "cpu" and need > available:
        return {**row, "skipped": f"needs ~{need / GIB:.1f} GB, {available / GIB:.1f} available"}
    command = [
        sys.executable,
        __file__,
        "--child",
        json.dumps({"variant": variant, "chunk": chunk, "size": size_name, "device": device}),
    ]
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} (chunk {chunk}) at {size_name} failed:\n{completed.stderr[-3000:]}")
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    extra = {"extra_peak_mib": measured["peak_mib"] - row["gradient_buffers_mib"]}
    return {**row, **measured, **extra, "load_average_1min": [load_before, os.getloadavg()[0]]}


def fastest_of(repeats: list[dict]) -> dict:
    """One row from the round-robin repeats of a variant: the fastest median time, the largest peak, all times."""
    if "skipped" in repeats[0]:
        return repeats[0]
    row = dict(min(repeats, key=lambda r: r["median_s"]))
    largest = max(repeats, key=lambda r: r["peak_mib"])
    row.update({key: largest[key] for key in ("peak_mib", "extra_peak_mib")})
    row["repeat_medians_s"] = [r["median_s"] for r in repeats]
    row["repeat_cpu_s"] = [r["median_cpu_s"] for r in repeats]
    row["load_average_1min"] = [x for r in repeats for x in r["load_average_1min"]]
    return row


def chunk_label(row: dict) -> str:
    if row["chunk"] == AUTO:
        return f"auto ({row['chunk_tokens']})"
    return str(row["chunk"] or "-")


def format_table(rows: list[dict]) -> str:
    lines = [
        "| tokens x hidden x vocab | variant | chunk | peak MiB over baseline | extra peak MiB | fwd+bwd s "
        "| CPU s | loss | date |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        shape = f"{row['tokens']} x {row['hidden']} x {row['vocab']}"
        chunk = chunk_label(row)
        if "skipped" in row:
            lines.append(
                f"| {shape} | {row['variant']} | {chunk} | skipped: {row['skipped']} | - | - | - | - | {row['date']} |"
            )
        else:
            cpu = f"{row['median_cpu_s']:.2f}" if "median_cpu_s" in row else "-"
            lines.append(
                f"| {shape} | {row['variant']} | {chunk} | {row['peak_mib']:,.0f} | {row['extra_peak_mib']:,.0f} "
                f"| {row['median_s']:.2f} | {cpu} | {row['loss']:.6f} | {row['date']} |"
            )
    return "\n".join(lines)


def _ratio(numerator: dict | None, denominator: dict | None, key: str, digits: int = 2) -> str:
    if numerator is None or denominator is None or key not in numerator or key not in denominator:
        return "-"
    return f"{numerator[key] / denominator[key]:.{digits}f}"


def _cell(row: dict | None, key: str, digits: int = 0, reason: bool = True) -> str:
    if row is None:
        return "not run"
    if "skipped" in row:
        return f"skipped: {row['skipped']}" if reason else "skipped"
    return f"{row[key]:,.{digits}f}"


def format_objective_table(rows: list[dict]) -> str:
    """Each objective fused vs on full logits, and its fused time over `fused_dft_loss`'s (chunk auto), per size."""
    lines = [
        "| tokens x hidden x vocab | objective | extra peak MiB, fused | extra peak MiB, full logits | fused / full "
        "logits, extra peak | fwd+bwd s, fused | fwd+bwd s, full logits | fused / full logits, time | fused / "
        "fused_dft_loss, time (CPU time) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size_name in SIZES:
        by_variant = {r["variant"]: r for r in rows if r["size"] == size_name and r["chunk"] in (None, AUTO)}
        for full_name, fused_name in ((ASFT_FULL, ASFT_FUSED), (EAFT_FULL, EAFT_FUSED)):
            full, fused = by_variant.get(full_name), by_variant.get(fused_name)
            if full is None and fused is None:
                continue
            shape = " x ".join(map(str, SIZES[size_name]))
            vs_dft = "-"
            if fused is not None and "fused_dft_median_s" in fused:
                vs_dft = (
                    f"{fused['median_s'] / fused['fused_dft_median_s']:.2f} "
                    f"({fused['median_cpu_s'] / fused['fused_dft_median_cpu_s']:.2f})"
                )
            lines.append(
                f"| {shape} | {OBJECTIVE_VARIANTS[fused_name][0]} | {_cell(fused, 'extra_peak_mib')} "
                f"| {_cell(full, 'extra_peak_mib')} | {_ratio(fused, full, 'extra_peak_mib', 3)} "
                f"| {_cell(fused, 'median_s', 2)} | {_cell(full, 'median_s', 2, reason=False)} "
                f"| {_ratio(fused, full, 'median_s')} | {vs_dft} |"
            )
    return "\n".join(lines)


def _by_variant(rows: list[dict], size_name: str) -> dict:
    return {(r["variant"], r["chunk"]): r for r in rows if r["size"] == size_name}


def _ratio_of(row: dict | None, other: dict | None, key: str) -> float | None:
    """row / other on `key`, when both were measured."""
    if row is None or other is None or "skipped" in row or "skipped" in other:
        return None
    return row[key] / other[key]


def _judged(values: list[float], goal: float, direction: str, spec: str) -> str:
    """`0.48x, met`, or over several runs `0.48x, met (median of 3; worst 0.61x, NOT met)`."""
    sys.path.insert(0, str(REPO_ROOT))  # as in measure_one: run as a script, bench/ is on the path, not the repo
    from bench.runs import verdict

    judged = verdict(values, goal, direction)
    text = f"{judged.median:{spec}}x, {'met' if judged.met else 'NOT met'}"
    if judged.runs > 1:
        text += f" (median of {judged.runs}; worst {judged.worst:{spec}}x, {'met' if judged.worst_met else 'NOT met'})"
    return text


def goal_lines(runs: list[dict]) -> list[str]:
    """The issue's goals for `fused_dft_loss` at the default chunk, per size: each ratio taken within each kept run
    that measured both of its rows, judged on their median, the worst beside it."""
    sys.path.insert(0, str(REPO_ROOT))
    from bench.runs import AT_MOST, BELOW

    current = current_rows(runs)
    lines = []
    for size_name in SIZES:
        fused = _by_variant(current, size_name).get((FUSED, FUSED_CHUNK))
        if fused is None:
            continue
        _, naive_name = naive_or_bound(_by_variant(current, size_name))
        # (what, goal, the other row of the ratio in a run's rows, key, factor, direction)
        checks = [
            ("peak", f"<= 1/8 of {naive_name}", lambda rows: naive_or_bound(rows)[0], "peak_mib", 1 / 8, AT_MOST),
            ("peak", "<= 1.1x chunked CE", lambda rows: rows.get((CHUNKED_CE, FUSED_CHUNK)), "peak_mib", 1.1, AT_MOST),
            ("peak", "< TRL tiled, DFT", lambda rows: rows.get((TRL, TRL_VOCAB_TILE)), "peak_mib", 1.0, BELOW),
            ("time", "<= 1.1x chunked CE", lambda rows: rows.get((CHUNKED_CE, FUSED_CHUNK)), "median_s", 1.1, AT_MOST),
            ("time", "<= TRL tiled, DFT", lambda rows: rows.get((TRL, TRL_VOCAB_TILE)), "median_s", 1.0, AT_MOST),
        ]
        parts = []
        for what, goal, other_of, key, factor, direction in checks:
            values = []
            for run in runs:
                rows = _by_variant(run["rows"], size_name)
                ratio = _ratio_of(rows.get((FUSED, FUSED_CHUNK)), other_of(rows), key)
                values += [] if ratio is None else [ratio]
            judged = _judged(values, factor, direction, ".2f") if values else "not measured"
            parts.append(f"{what} {goal}: {judged}")
        shape = f"{fused['tokens']} x {fused['hidden']} x {fused['vocab']}"
        lines.append(f"- {size_name} ({shape}), fused_dft_loss chunk {FUSED_CHUNK}: " + "; ".join(parts) + ".")
    return lines


def naive_or_bound(by_variant: dict) -> tuple[dict | None, str]:
    """The naive row, or when it did not fit the full-logits dft_loss row: it builds the same full logits (the two
    peaked within 1 MiB of each other at the medium size), so it bounds naive's peak from below."""
    naive = by_variant.get((NAIVE, None))
    full_logits = by_variant.get((DFT_LOSS, None))
    if naive is not None and "skipped" in naive and full_logits is not None and "skipped" not in full_logits:
        return full_logits, f"naive softmax (skipped: {naive['skipped']}; vs dft_loss)"
    return naive, "naive softmax"


def auto_goal_lines(runs: list[dict]) -> list[str]:
    """Issue 17's goals for `loss.chunk_size=auto`: extra peak <= 1/8 of the naive head's, time <= 1.15x chunk 1024;
    the figures from the latest rows, each ratio judged on its median over the kept runs that measured both rows."""
    sys.path.insert(0, str(REPO_ROOT))
    from bench.runs import AT_MOST

    def ratios(size_name: str, other_of: Callable[[dict], dict | None], key: str) -> list[float]:
        values = []
        for run in runs:
            rows = _by_variant(run["rows"], size_name)
            ratio = _ratio_of(rows.get((FUSED, AUTO)), other_of(rows), key)
            values += [] if ratio is None else [ratio]
        return values

    lines = []
    for size_name in SIZES:
        by_variant = _by_variant(current_rows(runs), size_name)
        auto = by_variant.get((FUSED, AUTO))
        if auto is None or "skipped" in auto:
            continue
        naive, naive_name = naive_or_bound(by_variant)
        shape = f"{auto['tokens']} x {auto['hidden']} x {auto['vocab']}"
        parts = []
        extra = ratios(size_name, lambda rows: naive_or_bound(rows)[0], "extra_peak_mib")
        if naive is None or "skipped" in naive or not extra:
            parts.append(f"extra peak <= 1/8 of {naive_name}: not measured")
        else:
            judged = _judged(extra, 1 / 8, AT_MOST, ".3f")
            allowance = naive["extra_peak_mib"] / 8
            block = auto["chunk_tokens"] * auto["vocab"] * 4 / MIB
            if auto["extra_peak_mib"] > allowance:
                judged += (
                    f"; the latest is {auto['extra_peak_mib'] / allowance:.1f}x the allowance of {allowance:,.0f} "
                    f"MiB: the {auto['chunk_tokens']}-token float32 block of logits alone is {block:,.0f} MiB (the "
                    f"floor that keeps the matmuls efficient), and the other {auto['extra_peak_mib'] - block:,.0f} "
                    "MiB are the chunk's temporaries, allocator slack and the pages torch touches on its first "
                    "backward"
                )
            parts.append(
                f"extra peak {auto['extra_peak_mib']:,.0f} MiB vs {naive['extra_peak_mib']:,.0f} MiB for {naive_name}"
                f": goal <= 1/8, {judged} (total peak {auto['peak_mib'] / naive['peak_mib']:.3f}x, of "
                f"which the gradient buffers are {auto['gradient_buffers_mib'] / naive['peak_mib']:.3f}x)"
            )
        reference = by_variant.get((FUSED, FUSED_CHUNK))
        times = ratios(size_name, lambda rows: rows.get((FUSED, FUSED_CHUNK)), "median_s")
        if reference is None or "skipped" in reference or not times:
            parts.append(f"time <= 1.15x chunk {FUSED_CHUNK}: not measured")
        else:
            cpu = (
                f", the latest's CPU time {auto['median_cpu_s'] / reference['median_cpu_s']:.2f}x"
                if "median_cpu_s" in auto and "median_cpu_s" in reference
                else ""
            )
            parts.append(f"time vs chunk {FUSED_CHUNK}, goal <= 1.15x: {_judged(times, 1.15, AT_MOST, '.2f')}{cpu}")
        lines.append(f"- {size_name} ({shape}), chunk auto ({auto['chunk_tokens']}): " + "; ".join(parts) + ".")
    return lines


def _buffers_share(rows: list[dict], size_name: str) -> str:
    naive = next((r for r in rows if r["size"] == size_name and r["variant"] == NAIVE and "peak_mib" in r), None)
    if naive is None:
        return "not measured against the naive head yet,"
    return (
        f"{naive['gradient_buffers_mib']:,.0f} MiB, {naive['gradient_buffers_mib'] / naive['peak_mib']:.3f}x of the "
        f"naive head's {naive['peak_mib']:,.0f} MiB peak,"
    )


def write_docs_section(record: dict) -> None:
    """Add or replace this benchmark's section of docs/benchmarks.md from the kept runs (`{"runs": [...]}`), leaving
    other sections as they are: the tables show each row's latest measurement, the goals their median over the
    runs."""
    runs = record["runs"]
    result = current_result(runs)
    rows = result["rows"]
    measured = [r for r in rows if "skipped" not in r]
    threads = sorted({r["threads"] for r in measured})
    loads = [x for r in measured for x in r["load_average_1min"]]
    dates = ", ".join(f"{name} on {date}" for name, date in result["dates"].items())
    sys.path.insert(0, str(REPO_ROOT))  # as in measure_one: run as a script, bench/ is on the path, not the repo
    from bench.docs import replace_docs_section
    from config.schema import LossConfig

    defaults = LossConfig()  # the objectives' settings the rows ran with
    section = [
        SECTION_HEADING,
        "",
        f"Measured with `bench/loss_head.py` ({dates}): one forward+backward through the LM head and the loss, "
        f"float32, alpha={ALPHA}, every token trained, {result['machine']}, torch {measured[0]['torch']}, "
        f"{'/'.join(map(str, threads))} CPU threads. The variants, and what `chunked CE` is, are described in "
        "the script's docstring. Peak memory is the process's peak RSS during the first forward+backward minus "
        "its RSS just before (a fresh process per row; it includes the gradients of the hidden states and the "
        "weight, the same in every row of a size); that run is the warm-up, and time is the median of the "
        f"further runs ({', '.join(f'{k}: {v}' for k, v in TIMED_RUNS.items())}); CPU s is the process's CPU "
        "time over the same runs (2 threads: up to twice the wall time; less sensitive to other jobs). Rows run "
        "with `--repeats` keep the fastest median of their round-robin repeats and the largest peak. A variant "
        "whose estimated need exceeded the machine's available memory is marked skipped. "
        "Raw numbers: `bench/results/loss_head.json`.",
        "",
        "Extra peak is the peak minus the float32 gradients of the weight and of the hidden states, `(vocab + "
        "tokens) * hidden * 4` bytes computed from the shapes: every variant must hold them, whatever it does with "
        "the logits. At the medium size they are "
        + _buffers_share(rows, "medium")
        + " so 1/8 of the naive head's total peak would leave the loss head almost nothing: issue 17's goal for "
        "`loss.chunk_size=auto` is stated on the extra peaks, and the total ratios are given beside them.",
        "",
        *(
            [
                "No GPU was lent to this work, so only CPU figures exist; on CPU, TRL's tiled head runs its torch "
                "fallback (no Triton), which scores every position and folds each 4096 x 32768 tile with several "
                "float32 temporaries, so its CPU figures say little about its GPU kernel."
            ]
            if all(r["device"] == "cpu" for r in rows)
            else []
        ),
        f"The machine was shared with other jobs (1-minute load average {min(loads):.1f}-{max(loads):.1f} on "
        f"{os.cpu_count()} cores around the runs), so times can vary by tens of percent between runs; memory "
        "does not depend on load.",
        "",
        format_table(rows),
        "",
        "`chunked CE` trains plain cross-entropy, so its loss column is the CE, not the DFT loss of the others; "
        f"ASFT's loss adds {defaults.kl_coef} x the KL to a random reference model, and EAFT's is the "
        "entropy-weighted CE.",
        *(
            [
                "Measured while other jobs ran (1-minute load average above 3 when the row started or ended, where "
                "this benchmark alone makes about 2; their times are inflated): "
                + ", ".join(f"{r['size']} {r['variant']} (chunk {chunk_label(r)})" for r in loaded)
                + "."
            ]
            if (loaded := [r for r in measured if max(r["load_average_1min"]) > 3])
            else []
        ),
        *[
            f"Not measured yet: {name} ({' x '.join(map(str, SIZES[name]))}); run `--sizes {name}`."
            for name in SIZES
            if name not in result["dates"]
        ],
        "",
        "The other objectives (issue 26), from the `ASFT` and `EAFT` rows above: each fused (`fused_objective_loss`, "
        "chunk auto) against the full-logits formulation LLaMA-Factory uses (`objective_loss` on float32 `[tokens, "
        "vocab]` logits: for ASFT the reference model's logits too, the log-softmax of both and the KL summed over "
        f"the vocabulary, kl_coef {defaults.kl_coef}; for EAFT the entropy of the top {defaults.eaft_top_k} "
        "logits). The reference model's side is a "
        "second random hidden-states tensor and head weight without gradients, made with the inputs, so outside "
        "the peak as the policy's are. The last column is the fused objective's time over `fused_dft_loss`'s "
        "(chunk auto), timed step for step in the same process on the same inputs, so that other jobs' load falls "
        "on both alike: what the objective's extra work costs per step (for ASFT, the reference head's matmul and "
        "the KL of each chunk). The fused and full-logits rows of an objective ran in separate processes, "
        "round-robin, so under load their time ratio is the least reliable figure here. A full-logits row whose "
        "estimated need exceeded the available memory is skipped, with the estimate.",
        "",
        format_objective_table(rows),
        "",
        "Goals of issue 5 (the fused loss at chunk 1024, then the default), checked against these rows:",
        "",
        *goal_lines(runs),
        "",
        "Goals of issue 17 for `loss.chunk_size=auto` (now the default; `dft.loss.auto_chunk_size` gives the "
        "reasoning): the extra peak <= 1/8 of the naive head's, with the time within 1.15x of chunk 1024:",
        "",
        *auto_goal_lines(runs),
        "",
    ]
    replace_docs_section(section, old_headings=("## DFT loss: memory and time (CPU)",))


def completed(row: dict) -> dict:
    """A row with the figures derived from its shape: chunk in tokens, gradient buffers and extra peak."""
    row = dict(row)
    row.setdefault("chunk_tokens", row["chunk"])
    row.setdefault("gradient_buffers_mib", gradient_buffers_bytes(row["tokens"], row["hidden"], row["vocab"]) / MIB)
    if "skipped" not in row:
        row.setdefault("extra_peak_mib", row["peak_mib"] - row["gradient_buffers_mib"])
    return row


def current_rows(runs: list[dict]) -> list[dict]:
    """Each row's latest measurement over the kept runs, so one size or variant can be rerun alone; a row skipped
    for lack of memory does not replace the same row measured earlier (its own date says when it ran)."""
    latest: dict[tuple, dict] = {}
    for run in runs:
        for row in run["rows"]:
            key = (row["size"], row["variant"], row["chunk"])
            if "skipped" not in row or key not in latest or "skipped" in latest[key]:
                latest[key] = row
    order = [(variant, chunk) for variant, chunk in VARIANTS]
    return sorted(
        latest.values(), key=lambda r: (list(SIZES).index(r["size"]), order.index((r["variant"], r["chunk"])))
    )


def current_result(runs: list[dict]) -> dict:
    """The latest rows, the dates they ran on per size, and the latest run's machine."""
    rows = current_rows(runs)
    dates = {
        name: " and ".join(sorted({r["date"] for r in rows if r["size"] == name}))
        for name in SIZES
        if any(r["size"] == name for r in rows)
    }
    return {"machine": runs[-1]["machine"], "dates": dates, "rows": rows}


def mem_total_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="sizes to run")
    parser.add_argument(
        "--variants", nargs="+", choices=sorted({v for v, _ in VARIANTS}), help="rerun only these (default: all)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to measure allocated GPU memory")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run each size's variants this many times, round-robin; keep the fastest"
    )
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs section from the JSON, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.docs_only:
        write_docs_section(json.loads(RESULTS_PATH.read_text()))  # {"runs": [...]}
        return
    if args.child:
        spec = json.loads(args.child)
        size = tuple(SIZES[spec["size"]])
        timed_runs = TIMED_RUNS[spec["size"]]
        print(json.dumps(measure_one(spec["variant"], spec["chunk"], size, timed_runs, spec["device"])))
        return

    sizes = [name for name in SIZES if name in args.sizes]
    variants = [(variant, chunk) for variant, chunk in VARIANTS if not args.variants or variant in args.variants]
    new_rows = []
    for size_name in sizes:
        repeats: dict[tuple, list[dict]] = {key: [] for key in variants}
        for _ in range(args.repeats):
            for variant, chunk in variants:
                if repeats[variant, chunk] and "skipped" in repeats[variant, chunk][0]:
                    continue
                row = run_variant(size_name, variant, chunk, args.device)
                repeats[variant, chunk].append(row)
                outcome = row.get("skipped") or f"{row['peak_mib']:,.0f} MiB, {row['median_s']:.2f} s"
                print(f"{size_name} {variant} chunk={chunk}: {outcome}", file=sys.stderr, flush=True)
        new_rows += [fastest_of(rows) for rows in repeats.values()]
    sys.path.insert(0, str(REPO_ROOT))
    from bench.runs import append_run
    from core.provenance import provenance

    measured = provenance()
    machine = f"{platform.machine()} Linux, {os.cpu_count()} cores, {mem_total_gib():.0f} GiB"
    run = {**measured, "alpha": ALPHA, "machine": machine, "rows": [completed(r) for r in new_rows]}
    runs = append_run(RESULTS_PATH, run)
    rows = current_rows(runs)
    print(format_table(rows))
    print(format_objective_table(rows))
    print("\n".join(goal_lines(runs) + auto_goal_lines(runs)))
    write_docs_section({"runs": runs})


if __name__ == "__main__":
    main()
