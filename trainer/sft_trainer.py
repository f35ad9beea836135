"""The Trainers train.py runs, each one class over the concerns of the packages below it.

Their own layer, under the entry points, so that train.py and the benchmarks train with the very same classes.
"""

from __future__ import annotations

from cluster.atomic_save import AtomicCheckpointMixin
from data_pipeline.loader import TokenBudgetLoaderMixin
from dft.trainer import DFTTrainer
from observability.training_metrics import RankMetricsMixin, ThroughputMetricsMixin
from preference.trainer import PreferenceLossMixin


class SFTTrainer(AtomicCheckpointMixin, RankMetricsMixin, ThroughputMetricsMixin, TokenBudgetLoaderMixin, DFTTrainer):
    """The run's Trainer: the DFT loss and its metrics (`dft.trainer`), with atomic checkpoints
    (`cluster.atomic_save`), per-rank sums and throughput (`observability.training_metrics`) and token-budget
    micro-batches (`data_pipeline.loader`)."""


class PreferenceTrainer(PreferenceLossMixin, SFTTrainer):
    """`SFTTrainer` with a pairwise loss on chosen/rejected pairs (`preference.trainer`): a reward model's or DPO's
    (keyword `objective`)."""
