"""cluster.check: every path the config names is checked before ranks spawn, every problem listed at once.

In process for the CLI itself; then through launch/single_node.sh and launch/nohup.sh, which must stop
with status 2 and the key and path of the problem, without starting the DeepSpeed launcher or a run.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from cluster.check import EXIT_PROBLEMS, main
from tests.helpers import LAUNCH_DIR, REPO_ROOT, make_checkpoint

FAIL_FAST_S = 120  # imports of torch and transformers only (tens of seconds on a loaded 2-core machine)


def test_shipped_default_config_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0, capsys.readouterr().err
    assert "config and paths OK" in capsys.readouterr().err


def test_every_problem_is_listed_at_once_with_its_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    status = main(
        [
            f"data.sources=[{tmp_path / 'missing.jsonl'},{REPO_ROOT / 'data' / 'sample'},{tmp_path / '*.jsonl'}]",
            f"heldout.file={tmp_path / 'heldout.jsonl'}",
            f"deepspeed.config={tmp_path / 'ds.json'}",
            f"model.name_or_path={tmp_path / 'model'}",
            f"model.tokenizer_name_or_path={a_file}",
            f"training.resume_from_checkpoint={tmp_path / 'checkpoint-4'}",
            f"output_dir={a_file / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert status == EXIT_PROBLEMS, err
    expected = [
        f"data.sources[0]: no such file '{tmp_path / 'missing.jsonl'}'",
        f"data.sources[2]: the glob '{tmp_path / '*.jsonl'}' matches no file",
        f"heldout.file: no such file '{tmp_path / 'heldout.jsonl'}'",
        f"deepspeed.config: no such file '{tmp_path / 'ds.json'}'",
        f"model.name_or_path: no such directory '{tmp_path / 'model'}'",
        f"model.tokenizer_name_or_path: '{a_file}' is a file",
        f"training.resume_from_checkpoint='{tmp_path / 'checkpoint-4'}': does not exist",
        f"output_dir: '{a_file}' is a file",
    ]
    for line in expected:
        assert line in err, f"{line!r} not in:\n{err}"
    assert "8 problem(s)" in err and "data.sources[1]" not in err, err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+model.trust_remote_kode=true"], "unknown config key 'model.trust_remote_kode'"),
        (["training.max_steps=many"], "training.max_steps=many"),
        (["loss.alpha=2"], "loss.alpha=2.0 must be in [0, 1]"),
    ],
)
def test_config_errors_are_reported_with_the_key(
    overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(overrides) == EXIT_PROBLEMS
    assert expected in capsys.readouterr().err


def test_hydra_flags_make_it_step_aside(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config-name", "other", "data.sources=[nope.jsonl]"]) == 0
    assert "skipped" in capsys.readouterr().err


def run_launch_script(script: str, env: dict[str, str], *overrides: str) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(
        [str(LAUNCH_DIR / script), *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=FAIL_FAST_S, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def test_single_node_sh_stops_on_a_missing_data_file_before_deepspeed_starts(
    tmp_path: Path, launch_env: dict[str, str]
) -> None:
    missing, output_dir = tmp_path / "chats.jsonl", tmp_path / "run"
    status, output, _ = run_launch_script(
        "single_node.sh",
        {**launch_env, "NUM_GPUS": "2"},
        "deepspeed=zero3",
        f"data.sources=[{missing}]",
        f"output_dir={output_dir}",
    )
    assert status == EXIT_PROBLEMS, f"status {status}\n{output[-3000:]}"
    assert f"data.sources[0]: no such file '{missing}'" in output, output[-3000:]
    assert "runner.py" not in output and not output_dir.exists(), f"the DeepSpeed launcher started:\n{output[-3000:]}"


def test_nohup_sh_stops_on_a_missing_heldout_file_before_detaching(tmp_path: Path, launch_env: dict[str, str]) -> None:
    missing, log_dir = tmp_path / "heldout.jsonl", tmp_path / "logs"
    status, output, _ = run_launch_script(
        "nohup.sh", {**launch_env, "LOG_DIR": str(log_dir)}, f"heldout.file={missing}", f"output_dir={tmp_path / 'r'}"
    )
    assert status == EXIT_PROBLEMS, f"status {status}\n{output[-3000:]}"
    assert f"heldout.file: no such file '{missing}'" in output, output[-3000:]
    assert not log_dir.exists() and "Started" not in output, f"a run was started:\n{output[-3000:]}"


def test_world_size_is_checked_against_the_checkpoint_auto_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A ZeRO checkpoint is converted to a universal checkpoint when the run resumes: the check lets it through.
    for stage in (2, 3):
        make_checkpoint(tmp_path / f"zero{stage}", 4, weights="global_step", world_size=2, zero_stage=stage)
        overrides = [
            f"deepspeed=zero{stage}",
            f"output_dir={tmp_path / f'zero{stage}'}",
            "training.resume_from_checkpoint=auto",
        ]
        assert main(["--world-size", "2", *overrides]) == 0, capsys.readouterr().err
        assert main(["--world-size", "1", *overrides]) == 0, capsys.readouterr().err
    # One that cannot be converted (its `latest` names a tag directory that is not there) is refused on fewer ranks.
    checkpoint = make_checkpoint(tmp_path / "broken", 4, weights="global_step", world_size=2, zero_stage=2)
    (checkpoint / "latest").write_text("global_step9")
    overrides = ["deepspeed=zero2", f"output_dir={tmp_path / 'broken'}", "training.resume_from_checkpoint=auto"]
    assert main(["--world-size", "1", *overrides]) == EXIT_PROBLEMS
    assert "sharded over 2 ranks and this run has 1" in capsys.readouterr().err
