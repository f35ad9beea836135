"""Checkpoints that appear whole or not at all: `AtomicCheckpointMixin`, mixed into the run's Trainer.

Every rank writes the Trainer's usual checkpoint (weights, optimizer and scheduler state, RNG states,
`trainer_state.json`; under DeepSpeed each rank's ZeRO shards in `global_step*/`) into
`<output_dir>/.partial/checkpoint-<step>`. After a barrier, rank 0 writes the manifest and publishes the
directory (`cluster.manifest`). `save_total_limit` rotation runs after the rename, over the published
checkpoints only. The next save deletes what a killed save left in `.partial/`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from cluster.manifest import STAGING_DIR, TRAINER_STATE_FILE, build_manifest, publish_checkpoint


class AtomicCheckpointMixin:
    """Trainer mixin: each `checkpoint-<step>` appears whole or not at all (see the module doc).

    Put it before `transformers.Trainer` in the bases. The Trainer's own `_save_checkpoint` does the
    writing, pointed at `.partial/` through `_get_output_dir`; this class publishes the result.
    """

    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / STAGING_DIR
        staging, final = staging_root / name, run_dir / name
        if self.args.should_save and staging_root.exists():
            shutil.rmtree(staging_root)  # a save killed earlier: saves run one at a time, so none is in progress
        self.accelerator.wait_for_everyone()  # no rank writes into .partial/ before it is cleared
        self._staging_run_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        if self.state.best_model_checkpoint == os.path.join(staging_root, name):
            # The Trainer recorded the best checkpoint where it wrote it; record where it will be.
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staging / TRAINER_STATE_FILE))
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        if self.args.should_save:
            zero_stage = self.deepspeed.zero_optimization_stage() if self.is_deepspeed_enabled else None
            manifest = build_manifest(staging, self.state.global_step, self.args.world_size, zero_stage)
            publish_checkpoint(staging, final, manifest)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()  # no rank reads checkpoint-<step> before it exists
