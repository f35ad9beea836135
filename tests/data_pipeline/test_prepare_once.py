"""A 2-rank launch prepares the data once, and a second launch with the same inputs reuses it.

Both ranks call `build_datasets` with the same `data.cache_dir`: one takes the fingerprint's file lock and
tokenises, the other waits on the lock (no collective call, so no distributed timeout) and loads the result.
Each rank's log (`<output_dir>/logs/rank<N>.log`) says which it did and names the prepared directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import DISTRIBUTED_TIMEOUT_S, LAUNCH_DIR, assert_prepared_once, prepared_lines, run_script

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
    prepared = assert_prepared_once(tmp_path / "first", cache_dir)
    built_at = (prepared / "stats.json").stat().st_mtime_ns

    launch(tmp_path / "second", cache_dir, launch_env)
    second = prepared_lines(tmp_path / "second")
    assert {action for action, _, _ in second.values()} == {"Reusing"}, f"a rank tokenised again: {second}"
    assert {directory for _, directory, _ in second.values()} == {prepared}
    assert (prepared / "stats.json").stat().st_mtime_ns == built_at
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == [prepared.name]
