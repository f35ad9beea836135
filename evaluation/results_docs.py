"""The figures README quotes, generated from the results files the measuring commands wrote (docs/results/).

A quoted block sits between two markers that name its file and how to render it:

    <!-- results docs/results/demo.json heldout -->
    ...generated text...
    <!-- /results -->

`python -m evaluation.results_docs` rewrites every such block from its file; `--check` (what the test runs)
exits 1 and prints the difference when a block is not what its file gives, so a figure cannot be edited by hand
or drift from the run that measured it. Renderers:

- `heldout`: a train.py run's before/after numbers (`heldout.results_file`): exact match, NLL, wall time.
- `verdict`: an `evaluation.compare --results` verdict: a row per arm and seed, then each arm's difference to the
  baseline (mean, min..max over seeds).
- `run:<arm>:<seed>`: one run of such a verdict, as `heldout` shows a run (a demo that is one arm of a comparison).
- `pairs`: a preference run's held-out pairs before/after (`heldout.results_file` of a reward or dpo run):
  pairwise accuracy, margin, mean chosen and rejected reward.
- `eval`: a run's validation NLL, first and last evaluation (`evaluation.run_record`: continued pre-training).
- `estimate`: `python -m modeling.estimate --json`'s model states per mode, as its table (computed, not measured:
  the file has no provenance, and a test recomputes it).
- `prepare_scaling`: `bench.data_prepare_throughput`'s kept runs (bench/results/): our preparation's 1 -> 2 workers
  scaling, the median of the runs and the worst.
- `prepare_memory`: `bench.prepare_memory`'s results (bench/results/): peak memory against corpus size, its ratios.

The benchmarks' own sections of docs/benchmarks.md are written by the benchmarks (tests/bench/test_docs_sections.py);
these two renderers quote their files where README states their figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.files import write_atomic
from embedded.paths import REPO_ROOT

BLOCK = re.compile(r"(<!-- results (\S+) ([\w:.]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)
DOCUMENTS = ("README.md",)
PREPARE_PIPELINE = "ours (read + prepare)"
"""The row of bench.data_prepare_throughput that is train.py's preparation (`OURS` there; bench/ is above this)."""


def _measured(record: dict[str, Any]) -> str:
    wall = f", {record['wall_seconds']:.0f} s wall" if "wall_seconds" in record else ""
    load = record["load_average_1min"]
    if isinstance(load, list):  # before and after the run
        load = f"{load[0]} before, {load[1]} after"
    return (
        f"Measured {record['date']} at commit {record['commit']}{wall}, 1-minute load {load} "
        f"on {record['cpus']} cores: `{record['command']}`"
    )


def _heldout_lines(heldout: dict[str, Any]) -> str:
    before, after = heldout["before"], heldout["after"]
    tokens = f"  ({heldout['reply_tokens']} reply tokens)" if "reply_tokens" in heldout else ""
    return (
        "```\n"
        f"held-out exact match ({heldout['prompts']} prompts): before {before['exact_match']:.1%}  "
        f"after {after['exact_match']:.1%}\n"
        f"held-out assistant NLL:            before {before['nll']:.3f}  after {after['nll']:.3f}{tokens}\n"
        "```\n"
    )


def render_heldout(record: dict[str, Any]) -> str:
    return f"{_heldout_lines(record)}\n{_measured(record)}.\n"


def render_run(record: dict[str, Any], arm: str, seed: str) -> str:
    run = next((r for r in record["runs"] if r["arm"] == arm and str(r["seed"]) == seed), None)
    if run is None or run["heldout"] is None:
        raise ValueError(f"no run of arm {arm!r}, seed {seed}, with held-out numbers in this verdict")
    heldout = _heldout_lines(run["heldout"])
    return f"{heldout}\nThe `{arm}` arm, seed {seed}, of the comparison below. {_measured(record)}.\n"


def _percent(run: dict[str, Any], when: str) -> str:
    return "n/a" if run["heldout"] is None else f"{100 * run['heldout'][when]['exact_match']:.1f}%"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_verdict(record: dict[str, Any]) -> str:
    lines = [
        "| arm | seed | held-out exact match (before -> after) | held-out NLL (before -> after) | eval NLL "
        "| final train loss |",
        "|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        heldout = run["heldout"]
        nll = "n/a" if heldout is None else f"{heldout['before']['nll']:.3f} -> {heldout['after']['nll']:.3f}"
        lines.append(
            f"| {run['arm']} | {run['seed']} | {_percent(run, 'before')} -> {_percent(run, 'after')} | {nll} "
            f"| {_number(run['eval_nll'], '.3f')} | {_number(run['train_loss'], '.4f')} |"
        )
    lines += ["", f"Difference to {record['baseline']} (same seed; mean, min..max over the seeds):", ""]
    lines += [
        f"- {d['arm']}, {d['metric']}: {d['mean']:+.3f} ({d['min']:+.3f}..{d['max']:+.3f})"
        for d in record["differences"]
    ]
    order = (
        "every arm of a seed trained on the same samples in the same order"
        if record["same_data_order"]
        else ("the arms did NOT train on the same samples in the same order")
    )
    return "\n".join(lines) + f"\n\nData order: {order}. {_measured(record)}.\n"


def render_eval(record: dict[str, Any]) -> str:
    first, last = record["eval_first"], record["eval_last"]
    return (
        "```\n"
        f"validation NLL (nats per token): step {first['step']} {first['nll']:.2f} -> step {last['step']} "
        f"{last['nll']:.2f}  ({record['steps']} steps, final training loss {record['train_loss']:.2f})\n"
        "```\n"
        f"\n{_measured(record)}.\n"
    )


def render_estimate(record: dict[str, Any]) -> str:
    from modeling.estimate import ModeEstimate, format_table  # torch and peft: only for this block

    fields = {field.name for field in dataclasses.fields(ModeEstimate)}
    rows = [ModeEstimate(**{k: v for k, v in mode.items() if k in fields}) for mode in record["modes"]]
    return format_table(rows, record["gpus"]) + "\n"


def render_pairs(record: dict[str, Any]) -> str:
    from evaluation.pairs import format_pair_comparison

    return f"```\n{format_pair_comparison(record, record['pairs'])}\n```\n\n{_measured(record)}.\n"


def _load_span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.1f}" if round(low, 1) == round(high, 1) else f"{low:.1f}-{high:.1f}"


def render_prepare_scaling(record: dict[str, Any]) -> str:
    runs = record["runs"]
    values = [
        row["scaling_per_repeat_median"]
        for run in runs
        for row in run["rows"]
        if row["pipeline"] == PREPARE_PIPELINE and row["workers"] == 2
    ]
    loads = [x for run in runs for x in run["load_average_1min"]]
    cores = "/".join(sorted({str(run["cpus"]) for run in runs}))
    kept = f"{len(runs)} kept run{'s' * (len(runs) > 1)}"
    return (
        f"On {cores} cores, 2 workers prepare at {statistics.median(values):.0%} of twice one worker's tokens/s: the "
        f"median of {kept} of `python -m bench.data_prepare_throughput` (the worst {min(values):.0%}; each run's "
        f"value the median over its repeats), 1-minute load {_load_span(loads)} around them, the last on "
        f"{runs[-1]['date']}.\n"
    )


def render_prepare_memory(record: dict[str, Any]) -> str:
    loads = [x for row in record["rows"] for x in row["load_average_1min"]]
    sizes = " ".join(str(size) for size in record["sizes_mb"])
    return (
        "".join(f"- {line}\n" for line in record["ratios"])
        + f"\nMeasured {record['date']} with `python -m bench.prepare_memory --sizes-mb {sizes}` on "
        f"{record['machine']['cpus']} cores, 1-minute load {_load_span(loads)} around the runs.\n"
    )


RENDERERS: dict[str, Callable[..., str]] = {
    "heldout": render_heldout,
    "pairs": render_pairs,
    "verdict": render_verdict,
    "run": render_run,
    "eval": render_eval,
    "estimate": render_estimate,
    "prepare_scaling": render_prepare_scaling,
    "prepare_memory": render_prepare_memory,
}


def regenerate(text: str, root: Path = REPO_ROOT) -> str:
    """`text` with every results block rendered anew from its file.

    Raises:
        ValueError: a block names a missing file or an unknown renderer.
    """

    def render(match: re.Match) -> str:
        opening, path, kind, _, closing = match.groups()
        name, *arguments = kind.split(":")
        if name not in RENDERERS:
            raise ValueError(f"results block {path} {kind}: no renderer {name!r}; one of {sorted(RENDERERS)}")
        if not (root / path).is_file():
            raise ValueError(f"results block {path} {kind}: no such file (run the command that measures it)")
        return opening + RENDERERS[name](json.loads((root / path).read_text()), *arguments) + closing

    return BLOCK.sub(render, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.results_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs from its file")
    args = parser.parse_args(argv)
    stale = []
    for name in DOCUMENTS:
        path = REPO_ROOT / name
        text = path.read_text(encoding="utf-8")
        fresh = regenerate(text)
        if fresh == text:
            continue
        if args.check:
            stale.append(name)
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True), name, name))
        else:
            write_atomic(path, fresh)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
