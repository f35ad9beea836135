"""docs/benchmarks.md holds what the benchmarks wrote: each generated section equals the one its writer renders from
the results file the benchmark saved (or, for a GPU benchmark not run yet, from the absence of one), so a figure
there cannot be edited by hand or outlive a rerun, and every section of the file has its writer."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import bench.docs
from bench import (
    data_prepare_throughput,
    gpu_check,
    heldout_generation,
    loss_head,
    packing_throughput,
    prepare_memory,
    train_throughput,
    train_throughput_gpu,
)

WRITERS: dict[str, tuple[Path, Callable[[dict | None], None]]] = {
    "loss_head": (loss_head.RESULTS_PATH, loss_head.write_docs_section),
    "data_prepare_throughput": (data_prepare_throughput.RESULTS_PATH, data_prepare_throughput.write_docs_section),
    "train_throughput": (train_throughput.RESULTS_PATH, train_throughput.write_docs_section),
    "packing_throughput": (packing_throughput.RESULTS_PATH, packing_throughput.write_docs_section),
    "prepare_memory": (
        prepare_memory.RESULTS_PATH,
        lambda r: prepare_memory.write_docs_section(prepare_memory.format_table(r["rows"]), r),
    ),
    "heldout_generation": (
        heldout_generation.RESULTS_PATH,
        lambda r: bench.docs.replace_docs_section(heldout_generation.docs_section(r)),
    ),
    "train_throughput_gpu": (train_throughput_gpu.RESULTS_PATH, train_throughput_gpu.write_docs_section),
    "gpu_check": (gpu_check.RESULTS_PATH, lambda r: bench.docs.replace_docs_section(gpu_check.docs_section(r))),
}
# Their sections say what running them will measure until a GPU run's results file exists.
RENDER_ABSENCE = {"train_throughput_gpu", "gpu_check"}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_docs_section_is_what_its_results_file_renders(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_path, write = WRITERS[name]
    if not results_path.is_file() and name not in RENDER_ABSENCE:
        pytest.skip(f"{results_path.name}: not measured yet")
    copy = tmp_path / "benchmarks.md"
    shutil.copy(bench.docs.DOCS_PATH, copy)
    monkeypatch.setattr(bench.docs, "DOCS_PATH", copy)
    text = results_path.read_text() if results_path.is_file() else "null"
    # Writers state the core count around the runs: render with the measuring machine's, as saved in the results.
    cores = re.search(r"(\d+) cores", text) or re.search(r'"cpus": (\d+)', text)
    if cores:
        monkeypatch.setattr(os, "cpu_count", lambda: int(cores.group(1)))
    write(json.loads(text))
    assert copy.read_text() == bench.docs.DOCS_PATH.read_text(), (
        f"docs/benchmarks.md's section of bench/{name}.py differs from what its results file gives: rerun the "
        "benchmark, or regenerate the section from the file"
    )


def test_every_section_of_the_benchmarks_page_has_a_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering every writer's section into an empty page gives the page's sections, in the page's order: none is
    written by hand."""
    headings = [line for line in bench.docs.DOCS_PATH.read_text().splitlines() if line.startswith("## ")]
    empty = tmp_path / "benchmarks.md"
    monkeypatch.setattr(bench.docs, "DOCS_PATH", empty)
    for results_path, write in WRITERS.values():
        write(json.loads(results_path.read_text()) if results_path.is_file() else None)
    rendered = [line for line in empty.read_text().splitlines() if line.startswith("## ")]
    assert sorted(rendered) == sorted(headings)
