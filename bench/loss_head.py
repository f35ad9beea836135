"""Peak memory and time of one forward+backward through the LM head and loss: five implementations (issue 5).

Variants, all float32 with every token trained, on `hidden [1, tokens, hidden]`, `weight [vocab, hidden]`:

- `naive softmax`: the seed's recipe. Full logits `hidden @ weight.T`, `probs = softmax(logits)` over the whole
  vocabulary, `p = probs.gather(target)` detached, then `sum(CE * p) / N`. Logits, probabilities and the
  cross-entropy's saved log-softmax all exist at once.
- `dft_loss`: full logits, then `dft.loss.dft_loss` (`p = exp(-CE)`, no second softmax).
- `fused_dft_loss`: `dft.loss.fused_dft_loss`, one `[chunk, vocab]` block of logits at a time, recomputed in the
  backward (chunk 1024, the `loss.chunk_size` default, and 256).
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

How memory is measured: each variant runs in a fresh Python process (so no allocator cache or earlier peak carries
over). After torch is imported and the inputs exist, the process resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and records its current RSS; after one forward+backward it reads the
new peak (`VmHWM` in `/proc/self/status`). The reported figure is peak minus that baseline: every byte the loss and
its backward touched at their worst moment, as the OS saw it, including the gradients of the hidden states and of
the weight (`vocab * hidden * 4` bytes in every variant) and allocator overhead. It is RSS, not a sum of tensor
sizes, so it cannot miss temporaries that a tensor-level count would. Where `clear_refs` is not writable the process
falls back to `ru_maxrss` minus the baseline, which can only under-report a peak below the import-time one (flagged
in the JSON). With `--device cuda` the figure is `torch.cuda.max_memory_allocated()` over the allocation before.

Before each variant the parent reads `MemAvailable` from `/proc/meminfo` and skips the variant, recording why, when
its estimated need (see `estimated_bytes`) would not fit: the naive variants need about 15 GB at full size.

Time: the first forward+backward (the memory run) is the warm-up; then the median of a few further runs in the same
process (gradients reset between runs), with torch's default thread count.

Sizes (`--sizes`, default all): `full` is the issue's 8192 tokens x hidden 896 x vocab 151,936 (Qwen2.5-0.5B's
head; about 1.1 TFLOP per matmul, tens of minutes on 2 cores), `medium` the same head on 2048 tokens, `small`
512 x 256 x 16,384.

Run: `.venv/bin/python bench/loss_head.py --sizes small medium` (about 20 minutes on 2 busy cores; `full` alone
takes about an hour). Prints a table, writes `bench/results/loss_head.json` (rows of the sizes run now replace those
of earlier runs; other sizes are kept) and writes the table, with the issue's goals checked against the measured
numbers, into `docs/benchmarks.md` under its own heading (`--docs-only` rewrites that section from the JSON).
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
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_HEADING = "## Loss head: memory and time"
MIB, GIB = 2**20, 2**30

SIZES = {"full": (8192, 896, 151936), "medium": (2048, 896, 151936), "small": (512, 256, 16384)}
TIMED_RUNS = {"full": 1, "medium": 1, "small": 3}
NAIVE, DFT_LOSS, FUSED, CHUNKED_CE, TRL = "naive softmax", "dft_loss", "fused_dft_loss", "chunked CE", "TRL tiled, DFT"
# (variant, chunk): chunk is tokens per block for ours and the checkpointed CE, vocabulary entries per tile for TRL.
FUSED_CHUNK = 1024  # loss.chunk_size default: the goals are checked at this chunk
TRL_VOCAB_TILE, TRL_TOKEN_TILE = 32768, 4096  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, kernels TOKEN_CHUNK_SIZE
VARIANTS = [
    (NAIVE, None),
    (DFT_LOSS, None),
    (FUSED, FUSED_CHUNK),
    (FUSED, 256),
    (CHUNKED_CE, FUSED_CHUNK),
    (TRL, TRL_VOCAB_TILE),
]
ALPHA = 1.0
# Besides the loss's own need: the child's torch import and inputs, and room for the rest of the machine.
MEMORY_MARGIN = 2 * GIB


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
    return 4 * min(tokens, chunk) * vocab * 4 + 3 * weight  # fused and chunked CE: a few blocks of one chunk


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line (Linux >= 3.14)")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def loss_function(variant: str, chunk: int | None) -> Callable[..., Any]:
    """`(hidden [1, T, H], weight [V, H], labels [1, T]) -> scalar loss` for one variant."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from dft.loss import IGNORE_INDEX, dft_loss, fused_dft_loss, shift_labels

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
    if variant == FUSED:
        return lambda hidden, weight, labels: fused_dft_loss(hidden, weight, labels, ALPHA, chunk_size=chunk)[0]
    if variant == CHUNKED_CE:
        return chunked_ce
    if variant == TRL:
        # Imported here, before the baseline, not in the measured step: the kernel's backward imports
        # trl.trainer.utils (and with it transformers), hundreds of MiB of RSS that are not the loss's.
        import trl.trainer.utils  # noqa: F401
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

        return trl_dft
    raise ValueError(f"unknown variant {variant!r}")


def measure_one(variant: str, chunk: int | None, size: tuple[int, int, int], timed_runs: int, device: str) -> dict:
    """Run in a fresh process: peak memory over the baseline of one forward+backward, then the median time."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    tokens, hidden_size, vocab = size
    loss_fn = loss_function(variant, chunk)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)
    cuda = device.startswith("cuda")

    def step() -> float:
        hidden.grad, weight.grad = None, None
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        return loss.item()  # .item() also waits for the device

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline, peak_reset = torch.cuda.memory_allocated(), True
    else:
        peak_reset = _reset_peak_rss()
        baseline = _rss_bytes()
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    elif peak_reset:
        peak, method = _peak_rss_bytes(), "VmHWM after clear_refs"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    seconds = []
    for _ in range(timed_runs):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {
        "loss": loss,
        "peak_mib": (peak - baseline) / MIB,
        "median_s": statistics.median(seconds),
        "times_s": seconds,
        "peak_method": method,
        "baseline_below_earlier_peak": (not peak_reset) and baseline_maxrss > baseline,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_variant(size_name: str, variant: str, chunk: int | None, device: str) -> dict:
    """One row: measured in a fresh process, or skipped with the reason."""
    tokens, hidden_size, vocab = SIZES[size_name]
    row = {
        "size": size_name,
        "tokens": tokens,
        "hidden": hidden_size,
        "vocab": vocab,
        "variant": variant,
        "chunk": chunk,
        "device": device,
        "full_logits_mib": tokens * vocab * 4 / MIB,
        "weight_grad_mib": vocab * hidden_size * 4 / MIB,
    }
    if variant == TRL:
        try:
            import trl  # noqa: F401
        except ImportError:
            return {**row, "skipped": "TRL is not installed (pip install -e '.[bench]')"}
    need = estimated_bytes(variant, chunk, tokens, hidden_size, vocab) + MEMORY_MARGIN
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
    return {**row, **measured, "load_average_1min": [load_before, os.getloadavg()[0]]}


def format_table(rows: list[dict]) -> str:
    lines = [
        "| tokens x hidden x vocab | variant | chunk | peak MiB over baseline | fwd+bwd s | loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        shape = f"{row['tokens']} x {row['hidden']} x {row['vocab']}"
        chunk = row["chunk"] or "-"
        if "skipped" in row:
            lines.append(f"| {shape} | {row['variant']} | {chunk} | skipped: {row['skipped']} | - | - |")
        else:
            lines.append(
                f"| {shape} | {row['variant']} | {chunk} | {row['peak_mib']:,.0f} | {row['median_s']:.2f} "
                f"| {row['loss']:.6f} |"
            )
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    """The issue's goals for `fused_dft_loss` at the default chunk, per size, checked against the measured rows."""
    lines = []
    for size_name in SIZES:
        by_variant = {(r["variant"], r["chunk"]): r for r in rows if r["size"] == size_name}
        fused = by_variant.get((FUSED, FUSED_CHUNK))
        if fused is None:
            continue
        naive = by_variant.get((NAIVE, None))
        chunked = by_variant.get((CHUNKED_CE, FUSED_CHUNK))
        trl = by_variant.get((TRL, TRL_VOCAB_TILE))
        checks = [
            ("peak", "<= 1/8 of naive softmax", naive, "peak_mib", 1 / 8),
            ("peak", "<= 1.1x chunked CE", chunked, "peak_mib", 1.1),
            ("peak", "< TRL tiled, DFT", trl, "peak_mib", 1.0),
            ("time", "<= 1.1x chunked CE", chunked, "median_s", 1.1),
            ("time", "<= TRL tiled, DFT", trl, "median_s", 1.0),
        ]
        full_logits = by_variant.get((DFT_LOSS, None))
        if naive is not None and "skipped" in naive and full_logits is not None and "skipped" not in full_logits:
            # The naive path did not fit: compare with dft_loss, which builds the same full logits (the two
            # peaked within 1 MiB of each other at the medium size) and so bounds naive's peak from below.
            checks[0] = (
                "peak",
                f"<= 1/8 of naive softmax (skipped: {naive['skipped']}; vs dft_loss)",
                full_logits,
                "peak_mib",
                1 / 8,
            )
        parts = []
        for what, goal, other, key, factor in checks:
            if other is None or "skipped" in other or "skipped" in fused:
                parts.append(f"{what} {goal}: not measured")
                continue
            ratio = fused[key] / other[key]
            met = ratio < factor if factor == 1.0 and what == "peak" else ratio <= factor
            parts.append(f"{what} {goal}: {ratio:.2f}x, {'met' if met else 'NOT met'}")
        shape = f"{fused['tokens']} x {fused['hidden']} x {fused['vocab']}"
        lines.append(f"- {size_name} ({shape}), fused_dft_loss chunk {FUSED_CHUNK}: " + "; ".join(parts) + ".")
    return lines


def write_docs_section(result: dict) -> None:
    """Add or replace this benchmark's section of docs/benchmarks.md, leaving other sections as they are."""
    rows = result["rows"]
    measured = [r for r in rows if "skipped" not in r]
    threads = sorted({r["threads"] for r in measured})
    loads = [x for r in measured for x in r["load_average_1min"]]
    dates = ", ".join(f"{name} on {date}" for name, date in result["dates"].items())
    section = [
        SECTION_HEADING,
        "",
        f"Measured with `bench/loss_head.py` ({dates}): one forward+backward through the LM head and the loss, "
        f"float32, alpha={ALPHA}, every token trained, {result['machine']}, torch {measured[0]['torch']}, "
        f"{'/'.join(map(str, threads))} CPU threads. The variants, and what `chunked CE` is, are described in "
        "the script's docstring. Peak memory is the process's peak RSS during the first forward+backward minus "
        "its RSS just before (a fresh process per row; it includes the gradients of the hidden states and the "
        "weight, the same in every row of a size); that run is the warm-up, and time is the median of the "
        f"further runs ({', '.join(f'{k}: {v}' for k, v in TIMED_RUNS.items())}). A variant whose estimated need "
        "exceeded the machine's available memory is marked skipped. "
        "Raw numbers: `bench/results/loss_head.json`.",
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
        "`chunked CE` trains plain cross-entropy, so its loss column is the CE, not the DFT loss of the others.",
        *(
            [
                "Measured while other jobs ran (1-minute load average above 3 when the row started or ended, where "
                "this benchmark alone makes about 2; their times are inflated): "
                + ", ".join(f"{r['size']} {r['variant']} (chunk {r['chunk'] or '-'})" for r in loaded)
                + "."
            ]
            if (loaded := [r for r in measured if max(r["load_average_1min"]) > 3])
            else []
        ),
        *[
            f"Not measured yet: {name} ({' x '.join(map(str, SIZES[name]))}); run `--sizes {name}` on a machine "
            "with about 16 GB free and nothing else running."
            for name in SIZES
            if name not in result["dates"]
        ],
        "",
        "Goals of issue 5, checked against these rows:",
        "",
        *goal_lines(rows),
        "",
    ]
    text = DOCS_PATH.read_text() if DOCS_PATH.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    old_headings = (SECTION_HEADING, "## DFT loss: memory and time (CPU)")
    start = next((i for i, line in enumerate(lines) if line in old_headings), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
        text = "\n".join(lines) + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section)
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PATH.write_text(text)


def merge_results(new_rows: list[dict], sizes: list[str], today: str) -> dict:
    """Earlier rows of the sizes (or variants) not run now are kept, so one size or variant can be rerun alone."""
    old = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {"rows": [], "dates": {}}
    rerun = {(r["size"], r["variant"], r["chunk"]) for r in new_rows}
    rows = [r for r in old["rows"] if (r["size"], r["variant"], r["chunk"]) not in rerun] + new_rows
    order = [(variant, chunk) for variant, chunk in VARIANTS]
    rows.sort(key=lambda r: (list(SIZES).index(r["size"]), order.index((r["variant"], r["chunk"]))))
    dates = {name: date for name, date in old["dates"].items() if name not in sizes} | dict.fromkeys(sizes, today)
    machine = f"{platform.machine()} Linux, {os.cpu_count()} cores, {mem_total_gib():.0f} GiB"
    return {"alpha": ALPHA, "machine": machine, "dates": dates, "rows": rows}


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
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs section from the JSON, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.docs_only:
        write_docs_section(json.loads(RESULTS_PATH.read_text()))
        return
    if args.child:
        spec = json.loads(args.child)
        size = tuple(SIZES[spec["size"]])
        timed_runs = TIMED_RUNS[spec["size"]]
        print(json.dumps(measure_one(spec["variant"], spec["chunk"], size, timed_runs, spec["device"])))
        return

    sizes = [name for name in SIZES if name in args.sizes]
    new_rows = []
    for size_name in sizes:
        for variant, chunk in VARIANTS:
            if args.variants and variant not in args.variants:
                continue
            row = run_variant(size_name, variant, chunk, args.device)
            new_rows.append(row)
            outcome = row.get("skipped") or f"{row['peak_mib']:,.0f} MiB, {row['median_s']:.2f} s"
            print(f"{size_name} {variant} chunk={chunk}: {outcome}", file=sys.stderr, flush=True)
    result = merge_results(new_rows, sizes, datetime.date.today().isoformat())
    print(format_table(result["rows"]))
    print("\n".join(goal_lines(result["rows"])))
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2) + "\n")
    write_docs_section(result)


if __name__ == "__main__":
    main()
