"""scripts/gpu_check.sh: its dry run runs every part of the GPU check on CPU at a tiny size, in an environment that
holds only the GPU image's packages and the carried ones, and renders the docs section from the JSON it wrote
without touching docs/benchmarks.md; the environment really leaves out what neither provides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.docs import DOCS_PATH
from bench.gpu_check import FLOAT32_BOUND, SECTION_HEADING, carried_distributions, make_image_env, write_docs
from tests.helpers import REPO_ROOT


@pytest.mark.slow
def test_dry_run_runs_every_part_and_renders_the_docs_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    completed = subprocess.run(
        ["scripts/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    parts = result["parts"]
    assert result["dry_run"] and list(parts) == ["gpu_tests", "attention", "fused_head", "throughput", "train_run"]
    # No GPU here: the QLoRA test skips, with pytest's reason.
    assert parts["gpu_tests"]["status"] == "skipped"
    assert parts["gpu_tests"]["files"] == ["tests/modeling/test_qlora_gpu.py"]
    assert all(t["outcome"] == "skipped" and t["reason"] for t in parts["gpu_tests"]["tests"])
    for name in ("attention", "fused_head", "throughput", "train_run"):
        assert parts[name]["status"] == "passed", parts[name]
    attention = [r for r in parts["attention"]["rows"] if "skipped" not in r]
    assert {(r["family"], r["implementation"], r["layout"]) for r in attention} >= {
        ("qwen2", "sdpa", "packed"),
        ("gemma2", "eager", "packed"),
    }
    assert all(r["ok"] for r in attention)
    # The float32 bound tells the packed layout from the one whose samples attend to each other.
    for row in (r for r in attention if r["dtype"] == "float32"):
        assert row["leak_grad_error"] > 100 * FLOAT32_BOUND, row
    flash = [r for r in parts["attention"]["rows"] if r["implementation"] == "flash_attention_2"]
    assert flash and all("CUDA" in r["skipped"] for r in flash)
    assert [r["softcap"] for r in parts["fused_head"]["rows"]] == [None, 30.0]
    rows = {(r["side"], r["liger"]): r for r in parts["throughput"]["rows"]}
    assert rows[("project", False)]["tokens_per_s"] > 0 and "CUDA" in rows[("TRL", True)]["skipped"]
    assert parts["train_run"]["mfu"] is None and parts["train_run"]["peak_memory_gb"] > 0
    # The section renders into the copy the script made; the repository's docs are as they were.
    rendered = (out / "benchmarks.md").read_text()
    assert rendered.count(SECTION_HEADING) == 1 and "`scripts/gpu_check.sh --dry-run` on cpu" in rendered
    assert "## Loss head: memory and time" in rendered  # the other sections kept
    assert "--dry-run` on cpu" not in DOCS_PATH.read_text()


def test_image_env_holds_the_image_and_the_carried_packages_only(tmp_path: Path) -> None:
    python = make_image_env(tmp_path / "env")
    probe = (
        "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "('torch', 'transformers', 'peft', 'datasets', 'hydra', 'trl', 'matplotlib', 'deepspeed', 'swanlab')}))"
    )
    found = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert {"datasets", "hydra-core", "trl"} <= carried_distributions()
    assert found == {
        "torch": True,
        "transformers": True,
        "peft": True,
        "datasets": True,
        "hydra": True,
        "trl": True,
        "matplotlib": False,
        "deepspeed": False,
        "swanlab": False,
    }


def test_a_dry_run_json_never_becomes_the_repositorys_docs(tmp_path: Path) -> None:
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"dry_run": True}))
    with pytest.raises(SystemExit, match="dry run"):
        write_docs(path, docs_path=None)


def test_a_run_stopped_by_its_time_limit_renders_the_parts_it_finished(tmp_path: Path) -> None:
    """gpu_check.json is rewritten after every part, so a run its time limit killed still makes a section."""
    result = {
        "date": "2026-12-06",
        "commit": None,
        "command": "scripts/gpu_check.sh",
        "dry_run": False,
        "device": "NVIDIA H100 80GB HBM3",
        "versions": {"python": "3.12.3", "flash-attn": None},
        "carried_wheels": {"files": {"a.whl": 3 * 2**20}, "bytes": 3 * 2**20},
        "seconds": 470.0,
        "parts": {"gpu_tests": {"status": "skipped", "seconds": 9.0, "files": [], "tests": []}},
    }
    path, docs = tmp_path / "gpu_check.json", tmp_path / "benchmarks.md"
    path.write_text(json.dumps(result))
    write_docs(path, docs_path=docs)
    text = docs.read_text()
    assert "| gpu_tests | skipped | 9 | no gpu-marked test collected |" in text
    assert "| train_run | not reached | - | - |" in text and "3.0 MiB of carried wheels" in text
    assert "not installed: flash-attn" in text
