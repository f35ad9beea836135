"""Does DFT help my data? Train the same base model on the same data with each loss setting, then the verdict.

    python -m evaluation.compare                      # ce, dft, dft alpha 0.5, asft, eaft on the embedded demo
    python -m evaluation.compare --seeds 1,2 data=custom data.sources=[/data/chats.jsonl] model=hf \\
        model.name_or_path=/models/Qwen2.5-1.5B-Instruct
    python -m evaluation.compare --arm ce=loss.type=ce --arm "dft-lr2x=loss.type=dft training.learning_rate=1e-4"
    python -m evaluation.compare --launcher single_node deepspeed=zero3 experiment=qwen2_5_7b_zero3
    python -m evaluation.compare --launcher slurm deepspeed=zero3 ...   # one sbatch job per run, then:
    python -m evaluation.compare --report-only --out outputs/compare

Every run (an arm's overrides, for each seed) starts from the same base model, prepares the same data, and
trains the same steps with `training.seed` = the seed, so the data order is the same for every arm of a seed;
arms may change the loss and the optimiser (a learning rate per loss: DFT's gradient is CE's scaled by p, so its
effective step is smaller), not the data, model, seed or batch. Each run goes to `<out>/<arm>/seed<seed>`.
Before anything trains, DFT arms are refused on a model that is not pre-trained (evaluation/probe.py).

The verdict (`<out>/verdict.md`, printed too; `<out>/verdict.png` plots each run's eval NLL over the steps and
its held-out exact match before and after) lists per run the held-out exact match and NLL (`heldout.json`), the
last eval NLL and avg p(correct), overall and per source, the final train loss, tokens/s and training time
(`metrics.jsonl`), checks from each rank-0 metrics log that every arm of a seed trained on the same samples in
the same order, and gives each arm's difference to the baseline arm (`ce` by default): mean and min..max over
seeds, so a gap within the seeds' spread reads as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.schema import RunConfig, load_run_config
from core.files import write_atomic
from core.provenance import provenance
from embedded.paths import REPO_ROOT
from evaluation.heldout import HELDOUT_JSON
from observability.artifacts import read_json_lines, read_metrics

# Every registered objective at its published setting, and DFT at alpha 0.5 (half CE, half DFT).
DEFAULT_ARMS = {
    "ce": ["loss.type=ce"],
    "dft": ["loss.type=dft", "loss.alpha=1"],
    "alpha0.5": ["loss.type=dft", "loss.alpha=0.5"],
    "asft": ["loss.type=asft", "loss.alpha=1", "loss.kl_coef=0.1"],
    "eaft": ["loss.type=eaft"],
}
# What an arm may not change: the runs of a seed must share base, data, order, steps and batch.
SHARED_KEYS = (
    "model.",
    "data.",
    "heldout.",
    "output_dir",
    "training.output_dir",
    "training.seed",
    "training.data_seed",
    "training.max_steps",
    "training.num_train_epochs",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
)
PROBE_SAMPLES = 32
VERDICT_MD, VERDICT_PNG, VERDICT_JSON = "verdict.md", "verdict.png", "verdict.json"
USER_ERROR = 2


@dataclass
class RunResult:
    """One finished run's numbers, read back from its own files."""

    arm: str
    seed: int
    directory: Path
    heldout: dict[str, Any] | None
    last_eval: dict[str, float]
    end: dict[str, float]
    tokens_per_second: float | None
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def parse_arms(specs: list[str] | None) -> dict[str, list[str]]:
    """`name=override override ...` each; the defaults when none is given."""
    if not specs:
        return dict(DEFAULT_ARMS)
    arms: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, overrides = spec.partition("=")
        if not sep or not name or "/" in name or not overrides.strip():
            raise ValueError(f"--arm {spec!r}: expected NAME=OVERRIDES, e.g. --arm 'dft=loss.type=dft loss.alpha=1'")
        if name in arms:
            raise ValueError(f"--arm {name}: given twice")
        arms[name] = shlex.split(overrides)
    for name, overrides in arms.items():
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if key.startswith(SHARED_KEYS):
                raise ValueError(
                    f"--arm {name}: {override} changes what every run of a seed must share (base model, data, "
                    "seed, steps, batch); pass it once, after the options, for every arm"
                )
    return arms


def run_overrides(common: list[str], arm: list[str], seed: int, directory: Path) -> list[str]:
    return [*common, *arm, f"training.seed={seed}", f"output_dir={directory}"]


def weighs_by_p_correct(run: RunConfig) -> bool:
    """Whether the run's objective weighs tokens by the model's own p(correct) (DFT's weights, alpha above 0)."""
    from dft.objectives import build_objective

    alpha = build_objective(run.loss).alpha
    return alpha is not None and alpha > 0


def probe_base_model(run: RunConfig) -> None:
    """Refuse DFT's weights on a model that is not pre-trained (exit 2), before any run trains."""
    from data_pipeline.prepare import build_datasets
    from data_pipeline.templates import load_chat_tokenizer
    from evaluation.probe import average_p_correct, untrained_message
    from modeling.loading import load_model, resolve_model_path

    model_path = resolve_model_path(run.model)
    tokenizer = load_chat_tokenizer(run, model_path)
    train_set, validation_set, _ = build_datasets(run.data, tokenizer, run.training.seed)
    rows = validation_set if validation_set is not None and len(validation_set) > 0 else train_set
    rows = [rows[i] for i in range(min(PROBE_SAMPLES, len(rows)))]
    model = load_model(run.model, model_path, bf16=False, deepspeed=False)
    p_correct = average_p_correct(model, tokenizer, rows)
    message = untrained_message(p_correct, model.config.vocab_size, run.model.name_or_path, len(rows))
    if message:
        raise ValueError(f"loss.type={run.loss.type}: {message}")
    print(f"compare: base model {run.model.name_or_path}: average p(correct) {p_correct:.3f}", flush=True)  # noqa: T201


def launch(launcher: str, overrides: list[str], arm: str, seed: int, directory: Path) -> int:
    """Start one run; returns its exit status (0 for a submitted Slurm job)."""
    env = dict(os.environ)
    if launcher == "python":
        command = [sys.executable, "train.py", *overrides]
    elif launcher == "single_node":
        command = ["launch/single_node.sh", *overrides]
    elif launcher == "slurm":
        env["OUTPUT_DIR"] = str(directory)  # slurm.sbatch sets output_dir itself, from OUTPUT_DIR
        shared = [o for o in overrides if not o.startswith("output_dir=")]
        command = ["sbatch", f"--job-name=compare-{arm}-seed{seed}", "launch/slurm.sbatch", *shared]
    else:
        raise ValueError(f"--launcher {launcher}: expected python, single_node or slurm")
    print(f"compare: {arm} seed {seed} -> {directory}\n  {shlex.join(command)}", flush=True)  # noqa: T201
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


def read_run(arm: str, seed: int, directory: Path) -> RunResult:
    records = read_metrics(directory)
    if not records:
        raise ValueError(f"{directory}: no metrics.jsonl: the run did not start, or is still queued")
    ends = [r for r in records if "train_runtime" in r]
    if not ends:
        raise ValueError(f"{directory}/metrics.jsonl: no end-of-training record: the run did not finish")
    evals = [r for r in records if "eval_nll" in r]
    speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    heldout_path = directory / HELDOUT_JSON
    rows = read_json_lines(directory / "logs" / "rank0_metrics.jsonl")
    samples = [row["samples"] for row in rows if row.get("mode") == "train" and "samples" in row]
    return RunResult(
        arm=arm,
        seed=seed,
        directory=directory,
        heldout=json.loads(heldout_path.read_text()) if heldout_path.is_file() else None,
        last_eval=evals[-1] if evals else {},
        end=ends[-1],
        tokens_per_second=statistics.fmean(speeds) if speeds else None,
        eval_curve=[(r["step"], r["eval_nll"]) for r in evals],
        samples=samples,
    )


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _heldout(result: RunResult, key: str, when: str = "after") -> float | None:
    return None if result.heldout is None else result.heldout[when][key]


def data_order_problems(results: list[RunResult]) -> list[str]:
    """Arms of one seed whose samples (per logging interval, rank 0) differ from the first arm's."""
    problems = []
    for seed in sorted({r.seed for r in results}):
        runs = [r for r in results if r.seed == seed]
        reference = runs[0]
        for run in runs[1:]:
            if not run.samples or run.samples != reference.samples:
                problems.append(f"seed {seed}: {run.arm} did not train on {reference.arm}'s samples in its order")
    return problems


def source_keys(results: list[RunResult]) -> list[str]:
    return sorted({k.split("/", 1)[1] for r in results for k in r.last_eval if k.startswith("eval_nll/")})


def differences(results: list[RunResult], baseline: str) -> list[tuple[str, str, float, float, float]]:
    """(arm, metric, mean, min, max) of each arm's difference to the baseline arm of the same seed."""
    metrics = {
        "held-out exact match (points)": lambda r: None if r.heldout is None else 100 * _heldout(r, "exact_match"),
        "held-out NLL": lambda r: _heldout(r, "nll"),
        "eval NLL": lambda r: r.last_eval.get("eval_nll"),
        "eval avg p(correct)": lambda r: r.last_eval.get("eval_avg_p_correct"),
    }
    by_key = {(r.arm, r.seed): r for r in results}
    rows = []
    for arm in dict.fromkeys(r.arm for r in results):
        if arm == baseline:
            continue
        for name, read in metrics.items():
            gaps = []
            for seed in sorted({r.seed for r in results if r.arm == arm}):
                base = by_key.get((baseline, seed))
                value, reference = read(by_key[(arm, seed)]), (read(base) if base else None)
                if value is not None and reference is not None:
                    gaps.append(value - reference)
            if gaps:
                rows.append((arm, name, statistics.fmean(gaps), min(gaps), max(gaps)))
    return rows


def verdict_markdown(results: list[RunResult], baseline: str) -> str:
    lines = ["# Loss comparison", ""]
    first = results[0]
    if first.heldout is not None:
        before = first.heldout["before"]
        lines += [
            f"Base model, before training: held-out exact match {before['exact_match']:.1%}, "
            f"held-out NLL {before['nll']:.3f} ({first.heldout['prompts']} prompts).",
            "",
        ]
    lines += [
        "| arm | seed | held-out exact match | held-out NLL | eval NLL | eval avg p(correct) | final train loss "
        "| tokens/s | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        exact = _heldout(r, "exact_match")
        lines.append(
            f"| {r.arm} | {r.seed} | {_fmt(None if exact is None else 100 * exact, '.1f')}% "
            f"| {_fmt(_heldout(r, 'nll'), '.3f')} | {_fmt(r.last_eval.get('eval_nll'), '.3f')} "
            f"| {_fmt(r.last_eval.get('eval_avg_p_correct'), '.3f')} | {_fmt(r.end.get('train_loss'), '.4f')} "
            f"| {_fmt(r.tokens_per_second, ',.0f')} | {_fmt(r.end.get('train_runtime'), '.1f')} |"
        )
    sources = source_keys(results)
    if sources:
        lines += ["", "Last eval, per source (NLL / avg p(correct)):", ""]
        lines += ["| arm | seed | " + " | ".join(sources) + " |", "|---|---|" + "---|" * len(sources)]
        for r in results:
            cells = [
                f"{_fmt(r.last_eval.get(f'eval_nll/{s}'), '.3f')} / "
                f"{_fmt(r.last_eval.get(f'eval_avg_p_correct/{s}'), '.3f')}"
                for s in sources
            ]
            lines.append(f"| {r.arm} | {r.seed} | " + " | ".join(cells) + " |")
    seeds = sorted({r.seed for r in results})
    rows = differences(results, baseline)
    if rows:
        lines += [
            "",
            f"Difference to {baseline} (same seed; mean and min..max over {len(seeds)} seed(s)):",
            "",
            "| arm | metric | mean | min..max |",
            "|---|---|---|---|",
        ]
        lines += [f"| {arm} | {name} | {mean:+.3f} | {low:+.3f}..{high:+.3f} |" for arm, name, mean, low, high in rows]
    problems = data_order_problems(results)
    lines += [
        "",
        "Data order: "
        + ("; ".join(problems) if problems else "every arm of a seed trained on the same samples in the same order."),
    ]
    best = [r for r in results if r.heldout is not None]
    if best:
        means = {
            arm: statistics.fmean(_heldout(r, "exact_match") for r in best if r.arm == arm)
            for arm in dict.fromkeys(r.arm for r in best)
        }
        top = max(means.values())
        leaders = ", ".join(arm for arm, mean in means.items() if mean == top)
        lines += ["", f"Best held-out exact match (mean over seeds): {leaders} ({top:.1%})."]
    return "\n".join(lines) + "\n"


def plot_verdict(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (nll_axis, exact_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = f"{r.arm} seed {r.seed}"
        if r.eval_curve:
            steps, values = zip(*r.eval_curve, strict=True)
            nll_axis.plot(steps, values, marker=".", label=label)
        if r.heldout is not None:
            last_step = int(r.end.get("step", 0))
            exact = [100 * r.heldout["before"]["exact_match"], 100 * r.heldout["after"]["exact_match"]]
            exact_axis.plot([0, last_step], exact, marker="o", label=label)
    nll_axis.set(title="eval NLL", xlabel="step", ylabel="assistant NLL")
    exact_axis.set(title="held-out exact match", xlabel="step", ylabel="%")
    for axis in (nll_axis, exact_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def verdict_record(results: list[RunResult], baseline: str) -> dict[str, Any]:
    """The verdict's numbers, for programs and for the results files README quotes (`--results`)."""
    return {
        "baseline": baseline,
        "runs": [
            {
                "arm": r.arm,
                "seed": r.seed,
                "heldout": None if r.heldout is None else {k: r.heldout[k] for k in ("prompts", "before", "after")},
                "eval_nll": r.last_eval.get("eval_nll"),
                "eval_avg_p_correct": r.last_eval.get("eval_avg_p_correct"),
                "train_loss": r.end.get("train_loss"),
                "tokens_per_second": r.tokens_per_second,
                "train_runtime": r.end.get("train_runtime"),
            }
            for r in results
        ],
        "differences": [
            {"arm": arm, "metric": name, "mean": mean, "min": low, "max": high}
            for arm, name, mean, low, high in differences(results, baseline)
        ],
        "same_data_order": not data_order_problems(results),
    }


def report(
    out: Path, arms: list[str], seeds: list[int], baseline: str, results_dir: Path | None = None, argv: list[str] = ()
) -> str:
    """Write the verdict (markdown, JSON, plot) into `out`, and with `results_dir` its markdown and JSON there too,
    with the provenance of the measurement."""
    results = [read_run(arm, seed, out / arm / f"seed{seed}") for seed in seeds for arm in arms]
    if baseline not in arms:
        baseline = arms[0]
    text = verdict_markdown(results, baseline)
    record = verdict_record(results, baseline)
    for directory in [out] + ([results_dir] if results_dir else []):
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / VERDICT_MD, text)
        measured = provenance(["python", "-m", "evaluation.compare", *argv])
        write_atomic(directory / VERDICT_JSON, json.dumps({**record, **measured}, indent=2) + "\n")
    plot_verdict(results, out / VERDICT_PNG)
    return text


def discover(out: Path) -> tuple[list[str], list[int]]:
    """The arms and seeds of an earlier comparison, from its directories."""
    arms = sorted(p.name for p in out.iterdir() if p.is_dir() and any(p.glob("seed*")))
    seeds = sorted({int(p.name.removeprefix("seed")) for arm in arms for p in (out / arm).glob("seed*")})
    if not arms:
        raise ValueError(f"{out}: no <arm>/seed<N> run directories")
    return arms, seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="where the runs and verdict go")
    parser.add_argument("--arm", action="append", help="NAME=OVERRIDES (repeat); default: ce, dft, alpha0.5")
    parser.add_argument("--seeds", help="comma-separated training seeds (default: the config's training.seed)")
    parser.add_argument("--baseline", default="ce", help="the arm the others are compared with (default ce)")
    parser.add_argument("--launcher", default="python", choices=("python", "single_node", "slurm"))
    parser.add_argument("--report-only", action="store_true", help="only read finished runs and write the verdict")
    parser.add_argument(
        "--results",
        type=Path,
        help="also write verdict.md and verdict.json (with date, commit, command and load) here, e.g. docs/results/x",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    out = args.out if args.out.is_absolute() else REPO_ROOT / args.out
    results_dir = (
        None if args.results is None else args.results if args.results.is_absolute() else REPO_ROOT / args.results
    )
    try:
        if args.report_only:
            arms, seeds = discover(out)
            print(report(out, arms, seeds, args.baseline, results_dir, argv), end="")  # noqa: T201
            return 0
        arms = parse_arms(args.arm)
        base_run = load_run_config(list(args.overrides))
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base_run.training.seed]
        if any(weighs_by_p_correct(load_run_config([*args.overrides, *arm])) for arm in arms.values()):
            probe_base_model(base_run)
        failed = []
        for seed in seeds:
            for arm, arm_overrides in arms.items():
                directory = out / arm / f"seed{seed}"
                overrides = run_overrides(list(args.overrides), arm_overrides, seed, directory)
                if launch(args.launcher, overrides, arm, seed, directory) != 0:
                    failed.append(f"{arm} seed {seed}")
        if failed:
            print(f"compare: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)  # noqa: T201
            return 1
        if args.launcher == "slurm":
            print(f"compare: jobs submitted; when they end: python -m evaluation.compare --report-only --out {out}")  # noqa: T201
            return 0
        print(report(out, list(arms), seeds, args.baseline, results_dir, argv), end="")  # noqa: T201
        print(f"compare: verdict in {out / VERDICT_MD}, plot in {out / VERDICT_PNG}")  # noqa: T201
        return 0
    except (ValueError, FileNotFoundError) as error:
        print(f"compare: {error}", file=sys.stderr)  # noqa: T201
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
