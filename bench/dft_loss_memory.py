"""Peak memory and time of one forward+backward of the DFT loss on CPU: full logits vs `fused_dft_loss`.

Compares the naive path (`logits = hidden @ W.T`, then `dft.loss.dft_loss`) with `dft.loss.fused_dft_loss`, which
holds one `[chunk, vocab]` block of logits at a time, in float32 at 2048 tokens x hidden 256 x vocab 65536 and at a
smaller size.

How memory is measured: each variant runs in a fresh Python process (so no allocator cache or earlier peak carries
over). After torch is imported and the inputs exist, the process resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and records its current RSS; after one forward+backward it reads the
new peak (`VmHWM` in `/proc/self/status`). The reported figure is peak minus that baseline: every byte the loss and
its backward touched at their worst moment, as the OS saw it, including the gradients of the hidden states and of
the weight (the same in both variants: `vocab * hidden * 4` bytes for the weight) and allocator overhead. It is RSS,
not a sum of tensor sizes, so it cannot miss temporaries that a tensor-level count would. Where `clear_refs` is not
writable the process falls back to `ru_maxrss` minus the baseline, which can only under-report a peak below the
import-time one (flagged in the JSON).

Time: the median of a few further forward+backward runs in the same process (gradients reset between runs), with
torch's default thread count.

Run: `.venv/bin/python bench/dft_loss_memory.py` (about 1-2 minutes on 2 cores). Prints a table, writes
`bench/results/dft_loss_memory.json`, and writes the table into `docs/benchmarks.md` under its own heading.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "dft_loss_memory.json"
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_HEADING = "## DFT loss: memory and time (CPU)"
MIB = 2**20

# (tokens, hidden, vocab): the size of the brief, and a smaller one.
SIZES = [(2048, 256, 65536), (512, 256, 16384)]
# (variant, chunk size): None is the full-logits reference.
VARIANTS = [("dft_loss (full logits)", None), ("fused_dft_loss", 1024), ("fused_dft_loss", 256)]
TIMED_RUNS = 3
ALPHA = 1.0


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


def measure_one(tokens: int, hidden_size: int, vocab: int, chunk_size: int | None) -> dict:
    """Run in a fresh process: peak RSS over the baseline of one forward+backward, then the median time."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from dft.loss import dft_loss, fused_dft_loss

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)

    def step() -> float:
        hidden.grad, weight.grad = None, None
        if chunk_size is None:
            loss, _ = dft_loss(hidden @ weight.T, labels, ALPHA)
        else:
            loss, _ = fused_dft_loss(hidden, weight, labels, ALPHA, chunk_size=chunk_size)
        loss.backward()
        return loss.item()

    peak_reset = _reset_peak_rss()
    baseline = _rss_bytes()
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()
    peak = _peak_rss_bytes() if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {
        "tokens": tokens,
        "hidden": hidden_size,
        "vocab": vocab,
        "chunk_size": chunk_size,
        "loss": loss,
        "peak_mib": (peak - baseline) / MIB,
        "full_logits_mib": tokens * vocab * 4 / MIB,
        "weight_grad_mib": vocab * hidden_size * 4 / MIB,
        "median_ms": statistics.median(seconds) * 1000,
        "times_ms": [s * 1000 for s in seconds],
        "peak_method": "VmHWM after clear_refs" if peak_reset else "ru_maxrss",
        "baseline_below_earlier_peak": (not peak_reset) and baseline_maxrss > baseline,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_in_subprocess(tokens: int, hidden_size: int, vocab: int, chunk_size: int | None) -> dict:
    command = [sys.executable, __file__, "--child", str(tokens), str(hidden_size), str(vocab), str(chunk_size or 0)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = [
        "| tokens | hidden | vocab | variant | chunk | peak MiB over baseline | full logits MiB | fwd+bwd ms | loss |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['hidden']} | {row['vocab']} | {row['variant']} | {row['chunk_size'] or '-'} "
            f"| {row['peak_mib']:.0f} | {row['full_logits_mib']:.0f} | {row['median_ms']:.0f} | {row['loss']:.6f} |"
        )
    return "\n".join(lines)


def write_docs_section(table: str, rows: list[dict], today: str) -> None:
    """Add or replace this benchmark's section of docs/benchmarks.md, leaving other sections as they are."""
    section = "\n".join(
        [
            SECTION_HEADING,
            "",
            f"Measured {today} with `bench/dft_loss_memory.py`: float32, alpha={ALPHA}, every token trained, "
            f"torch {rows[0]['torch']}, {rows[0]['threads']} CPU threads. Peak memory is the process's peak RSS "
            "during one forward+backward minus its RSS just before (fresh process per row; it includes the "
            "gradients of the hidden states and the weight, identical in every row of a size). Time is the median "
            f"of {TIMED_RUNS} further runs. Raw numbers: `bench/results/dft_loss_memory.json`.",
            "",
            table,
            "",
        ]
    )
    text = DOCS_PATH.read_text() if DOCS_PATH.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    if SECTION_HEADING in lines:
        start = lines.index(SECTION_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section.splitlines()
        text = "\n".join(lines) + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PATH.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, type=int, metavar=("TOKENS", "HIDDEN", "VOCAB", "CHUNK"), help="internal")
    args = parser.parse_args()
    if args.child:
        tokens, hidden_size, vocab, chunk_size = args.child
        print(json.dumps(measure_one(tokens, hidden_size, vocab, chunk_size or None)))
        return

    rows = []
    for tokens, hidden_size, vocab in SIZES:
        for variant, chunk_size in VARIANTS:
            row = {"variant": variant, **run_in_subprocess(tokens, hidden_size, vocab, chunk_size)}
            rows.append(row)
            print(f"done: {tokens}x{hidden_size}x{vocab} {variant} chunk={chunk_size}", file=sys.stderr)
    today = datetime.date.today().isoformat()
    table = format_table(rows)
    print(table)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({"date": today, "alpha": ALPHA, "rows": rows}, indent=2) + "\n")
    write_docs_section(table, rows, today)


if __name__ == "__main__":
    main()
