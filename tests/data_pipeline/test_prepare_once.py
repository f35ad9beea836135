"""A 2-rank launch prepares the data once, and a second launch with the same inputs reuses it.

Both ranks call `build_datasets` with the same `data.cache_dir`: one takes the fingerprint's file lock and
tokenises, the other waits on the lock (no collective call, so no distributed timeout) and loads the result.
Each rank's log (`<output_dir>/logs/rank<N>.log`) says which it did and names the prepared directory.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import DISTRIBUTED_TIMEOUT_S, LAUNCH_DIR, run_script

pytestmark = pytest.mark.distributed

# The shortest run that still builds the data on both ranks: 2 steps, no evaluation, held-out or validation.
SHORT_RUN = (
    "deepspeed=zero3",
    "debug=quick",
    "training.max_steps=2",
    "training.eval_strategy=no",
    "heldout.file=null",
    "data.validation_split_percentage=0",
)
# data_pipeline/prepare.py's line, after our log format's time stamp (observability/rank_logging.py).
PREPARED_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d [\d:]+,\d+) INFO data_pipeline\.prepare: "
    r"(?P<action>Wrote|Reusing) the prepared dataset (?P<directory>\S+)$",
    re.MULTILINE,
)


def prepared_lines(output_dir: Path) -> dict[int, tuple[str, Path, datetime]]:
    """Per rank: whether it wrote or reused the prepared dataset, which directory, and when it said so."""
    lines = {}
    for rank in (0, 1):
        log = (output_dir / "logs" / f"rank{rank}.log").read_text(encoding="utf-8")
        found = PREPARED_LINE.findall(log)
        assert len(found) == 1, f"rank {rank} logged {len(found)} prepared-dataset lines:\n{log[-3000:]}"
        (time, action, directory) = found[0]
        lines[rank] = (action, Path(directory), datetime.strptime(time, "%Y-%m-%d %H:%M:%S,%f"))
    return lines


def launch(output_dir: Path, cache_dir: Path, launch_env: dict[str, str]) -> None:
    run_script(
        [str(LAUNCH_DIR / "single_node.sh"), *SHORT_RUN, f"data.cache_dir={cache_dir}", f"output_dir={output_dir}"],
        env={**launch_env, "NUM_GPUS": "2"},
        timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[output_dir / "logs"],
    )


@pytest.mark.usefixtures("base_model_dir")  # built once here, not by both ranks racing
def test_two_ranks_prepare_once_and_a_second_launch_reuses_the_cache(
    tmp_path: Path, launch_env: dict[str, str]
) -> None:
    cache_dir = tmp_path / "cache"
    launch(tmp_path / "first", cache_dir, launch_env)
    first = prepared_lines(tmp_path / "first")
    actions = sorted(action for action, _, _ in first.values())
    assert actions == ["Reusing", "Wrote"], f"expected one rank to tokenise and the other to reuse: {first}"
    (prepared,) = {directory for _, directory, _ in first.values()}
    assert prepared.parent == cache_dir and (prepared / "train").is_dir()
    # The rank that reused did so once the other had written (it waited on the lock), not in parallel.
    (written_at,) = (time for action, _, time in first.values() if action == "Wrote")
    (reused_at,) = (time for action, _, time in first.values() if action == "Reusing")
    assert reused_at >= written_at
    # Nothing else was built: one prepared directory, and no temporary build directory or second fingerprint.
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == [prepared.name]
    built_at = (prepared / "stats.json").stat().st_mtime_ns

    launch(tmp_path / "second", cache_dir, launch_env)
    second = prepared_lines(tmp_path / "second")
    assert {action for action, _, _ in second.values()} == {"Reusing"}, f"a rank tokenised again: {second}"
    assert {directory for _, directory, _ in second.values()} == {prepared}
    assert (prepared / "stats.json").stat().st_mtime_ns == built_at
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == [prepared.name]
