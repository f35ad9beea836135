"""Data preparation's peak memory against the size of the corpus, for chat and for raw text.

A seeded generator writes a corpus of about each size asked for (`--sizes-mb`, 200 and 2000 by default) in two
kinds: chat, the synthetic ChatML dialogues of `bench/data_prepare_throughput.py` as JSONL; and text, a `.txt`
file of one generated document per line (20-400 words each), as `data.sample_by=line` reads it. Each corpus is
prepared by `python -m data_pipeline.prepare` as a user runs it (`data.num_proc=2 data.max_length=512`, the
default 5% validation share, a fresh `data.cache_dir`; text with `training.objective=pretrain`), in a fresh process
per run with `TOKENIZERS_PARALLELISM=false`, offline.

Peak memory is the kernel's high-water mark of resident memory (`ru_maxrss`, VmHWM): that of the preparing process
itself, and the largest of its worker processes (the forked conversion and tokenisation workers, and the
processes that write a large prepared set). Resident memory counts the pages of memory-mapped files the process
has read, as well as its own allocations. Throughput is the tokens of the prepared set (training and validation
rows, each counted once) over the wall time of the whole command. The cores are shared with other jobs here: the
load average before and after each run is saved with it.

Run from the repo root: `.venv/bin/python -m bench.prepare_memory [--sizes-mb 200 2000] [--kinds chat text]`.
Prints a table, writes `bench/results/prepare_memory.json` and this benchmark's section of `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.data_prepare_throughput import SEED, WORDS, write_corpus
from bench.docs import replace_docs_section
from core.files import write_atomic
from embedded.paths import REPO_ROOT

RESULTS_PATH = REPO_ROOT / "bench" / "results" / "prepare_memory.json"
SECTION_HEADING = "## Data preparation memory against corpus size (CPU)"
KINDS = ("chat", "text")
OVERRIDES = ("data.num_proc=2", "data.max_length=512", "heldout.file=null")
# Bytes per dialogue of `write_corpus`'s JSONL, measured on 40,000 of them: sizes the chat corpus.
CHAT_BYTES_PER_DIALOGUE = 720
MB = 1 << 20
# How often the preparing process samples its own anonymous and file-backed resident memory.
SAMPLE_SECONDS = 0.05


def write_text_corpus(path: Path, size_bytes: int) -> None:
    """Seeded documents of 20-400 words, one per line, until the file holds `size_bytes`."""
    rng = random.Random(SEED)
    written = 0
    with path.open("w", encoding="utf-8") as corpus:
        while written < size_bytes:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400))).capitalize() + ".\n"
            corpus.write(line)
            written += len(line)


def _own_memory_mb() -> dict[str, float]:
    """This process's resident memory now, split as /proc reports it: anonymous (its own allocations) and file
    (pages of mapped files: the libraries' code and the memory-mapped Arrow files it has read)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


def prepare_in_child(overrides: list[str]) -> None:
    """The measured run: the `prepare` command, then its own and its workers' peak resident memory as JSON."""
    from data_pipeline.prepare import main

    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            for key, value in _own_memory_mb().items():
                peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    main(overrides)
    done.set()
    sampler.join()
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN gives the largest of the processes this one has waited for.
    print(  # noqa: T201
        json.dumps(
            {
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_anon_mb": peaks["RssAnon"],
                "peak_file_mb": peaks["RssFile"],
                "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def measure(kind: str, corpus: Path, cache_dir: Path) -> dict:
    overrides = [f"data.sources=[{corpus}]", f"data.cache_dir={cache_dir}", *OVERRIDES]
    if kind == "text":
        overrides.append("training.objective=pretrain")
    command = [sys.executable, "-m", "bench.prepare_memory", "--child", *overrides]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    # A session of its own, killed whole when it ends, its output in files: no worker outlives the run holding a pipe.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, text=True, cwd=REPO_ROOT, env=env, start_new_session=True
        )
        returncode = child.wait()
        seconds = time.perf_counter() - start
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        stdout.seek(0)
        stderr.seek(0)
        lines, errors = stdout.read().strip().splitlines(), stderr.read()
    if returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {returncode}:\n{errors[-3000:]}")
    memory = json.loads(lines[-1])
    stats = json.loads((Path(lines[-2]) / "stats.json").read_text())
    (source,) = stats["sources"].values()
    return {
        "kind": kind,
        "corpus_mb": corpus.stat().st_size / MB,
        "records": source["records"],
        "tokens": source["tokens"],
        "train_samples": stats["train_samples"],
        "validation_samples": stats["validation_samples"],
        "seconds": seconds,
        "tokens_per_s": source["tokens"] / seconds,
        **memory,
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| corpus | size (MB) | records | tokens | seconds | tokens/s | peak RSS, preparing process (MB) | "
        "of which anonymous, peak (MB) | mapped files, peak (MB) | peak RSS, largest worker (MB) | "
        "load average (before, after) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        load = ", ".join(f"{value:.1f}" for value in row["load_average_1min"])
        lines.append(
            f"| {row['kind']} | {row['corpus_mb']:,.0f} | {row['records']:,} | {row['tokens']:,} | "
            f"{row['seconds']:.0f} | {row['tokens_per_s']:,.0f} | {row['peak_rss_mb']:,.0f} | "
            f"{row['peak_anon_mb']:,.0f} | {row['peak_file_mb']:,.0f} | {row['peak_worker_rss_mb']:,.0f} | {load} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """Per kind, the largest corpus's peaks and throughput over the smallest's."""
    sentences = []
    for kind in KINDS:
        runs = sorted((row for row in rows if row["kind"] == kind), key=lambda row: row["corpus_mb"])
        if len(runs) < 2:
            continue
        small, large = runs[0], runs[-1]
        sentences.append(
            f"{kind}: {large['corpus_mb'] / small['corpus_mb']:.1f}x the corpus gives "
            f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x the preparing process's peak RSS "
            f"({large['peak_anon_mb'] / small['peak_anon_mb']:.2f}x its anonymous memory), "
            f"{large['peak_worker_rss_mb'] / small['peak_worker_rss_mb']:.2f}x the largest worker's and "
            f"{large['tokens_per_s'] / small['tokens_per_s']:.2f}x the tokens/s"
        )
    return sentences


def write_docs_section(table: str, results: dict) -> None:
    machine = results["machine"]
    sizes = " ".join(str(size) for size in results["sizes_mb"])
    section = [
        SECTION_HEADING,
        "",
        f"Measured {results['date']} with `bench/prepare_memory.py --sizes-mb {sizes}` on {machine['cpus']} CPU "
        f"cores shared with other jobs ({machine['platform']}, Python {machine['python']}). Each corpus is prepared by "
        f"`python -m data_pipeline.prepare {' '.join(OVERRIDES[:2])}` with the default 5% validation share into a "
        "fresh cache: chat is synthetic ChatML JSONL (the dialogues of the throughput benchmark above), text a "
        "`.txt` file of one generated document per line (`training.objective=pretrain`). Peak RSS is the kernel's "
        "high-water mark (`ru_maxrss`) of the preparing process and of the largest of its workers; resident memory "
        "includes the pages of memory-mapped files a process has read. tokens/s is over the whole command, start-up "
        "included, on shared cores (the load average is in the table).",
        "",
        table,
        "",
        *(f"- {sentence}" for sentence in results["ratios"]),
        "",
        "How memory stays flat: the records are streamed from the files into an Arrow file (a batch in memory at a "
        "time), conversion and tokenisation stream each worker's rows into Arrow files, the accounting reads only "
        "the length offsets of the token columns, the validation split, its shuffle and the repetition by weight "
        "are index arrays, raw text is cut into blocks a batch of documents at a time, the prepared sets are "
        "written 200 shuffled rows at a time, and every process hands back the pages of the memory-mapped Arrow "
        "files it has read after each batch (`release_mapped_pages` in `data_pipeline/parallel.py`): the kernel "
        "maps 64 KB around every place a row is read from, so a batch of shuffled rows maps pages all over the "
        "source files, and before they were handed back they stayed in the reading process's RSS until it ended. "
        "What still grows with the corpus is per-record state in the preparing process: the accounting's and the "
        "split's arrays (a few bytes a record) and the pages of the small per-record columns it reads across "
        "every batch.",
        "",
    ]
    replace_docs_section(section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--no-docs", action="store_true", help="print and save the JSON, leave docs/ alone")
    parser.add_argument(
        "--docs-from-results", action="store_true", help="rewrite the docs section from the saved JSON, run nothing"
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        prepare_in_child(args.child)
        return
    if args.docs_from_results:
        results = json.loads(RESULTS_PATH.read_text())
        write_docs_section(format_table(results["rows"]), results)
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for kind in args.kinds:
            for size_mb in args.sizes_mb:
                corpus = Path(scratch, f"{kind}_{size_mb}mb.{'jsonl' if kind == 'chat' else 'txt'}")
                if kind == "chat":
                    write_corpus(corpus, size_mb * MB // CHAT_BYTES_PER_DIALOGUE)
                else:
                    write_text_corpus(corpus, size_mb * MB)
                rows.append(measure(kind, corpus, Path(scratch, f"cache_{kind}_{size_mb}")))
                corpus.unlink()
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)  # noqa: T201
    table = format_table(rows)
    results = {
        "date": datetime.date.today().isoformat(),
        "sizes_mb": args.sizes_mb,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "overrides": list(OVERRIDES),
        "rows": rows,
        "ratios": ratios(rows),
    }
    print(table)  # noqa: T201
    print("\n".join(results["ratios"]))  # noqa: T201
    write_atomic(RESULTS_PATH, json.dumps(results, indent=2) + "\n")
    if not args.no_docs:
        write_docs_section(table, results)


if __name__ == "__main__":
    main()
