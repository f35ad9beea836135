"""`PreferenceLossMixin`: the Trainer side of `training.objective=reward|dpo`, over the loss Trainer's machinery.

It goes before `dft.trainer.DFTTrainer` in a Trainer's bases (`trainer/`) and replaces its `compute_loss`; the rest
(the frozen reference of `_reference`, sample origins, the interval sums the rank and throughput metrics read,
logging) is the loss Trainer's. Each batch holds B pairs as 2B rows, the chosen sequences first
(`data_pipeline.pairs`).

Features and their config keys (`preference.*`, a `PreferenceConfig`):
- `training.objective=reward`: the model is a scalar score head on the base (`modeling.loading.SCORE`); its score of
  each row (at the row's last token that is not padding) is the reward; the loss is
  `-log sigmoid(r_chosen - r_rejected - preference.margin)` (+ `preference.center_rewards_coefficient` x
  `mean((r_chosen + r_rejected)^2)`), `preference.losses.pairwise_reward_loss`.
- `training.objective=dpo`: the language model itself; the reward is `beta (log pi(y|x) - log pi_ref(y|x))`,
  each log-probability summed over the reply's tokens from the fused head (no `[tokens, vocab]` logits), the
  reference the frozen starting model (a ZeRO-3-sharded copy, or the base with the adapter off); the loss is
  DPO's sigmoid loss with `preference.beta`, `preference.losses.dpo_sigmoid_loss`.
- `preference.precompute_reference` (dpo, full fine-tune): the reference's log-probabilities of every training and
  evaluation pair are computed once when the training loader is first built (the ranks share the pass), kept as a
  dataset column the collator hands over (`reference_logps`), and the reference copy is freed before the first
  step.
- Normalisation: the loss of a micro-batch is the mean over its pairs, divided by the gradient-accumulation steps;
  the step's gradient is then the mean over its pairs when every micro-batch holds as many (DDP/ZeRO average over
  ranks): the Trainer's `num_items_in_batch` counts tokens, which a pairwise loss does not weigh by.
- Metrics of each logging interval, from all-reduced sums over pairs (`eval_`-prefixed in evaluation):
  `accuracy` (share of pairs whose chosen reward is above the rejected one), `margin` (mean `r_chosen -
  r_rejected`), `chosen_reward`, `rejected_reward`; dpo adds `chosen_logps` and `rejected_logps` (mean summed
  log-probabilities of the policy). Per source (two sources or more): `accuracy/<source>`, `margin/<source>`.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import datasets
import torch
from accelerate.utils import gather_object
from transformers.modeling_outputs import ModelOutput

from config.schema import PreferenceConfig
from core.keys import LABELS_KEY, REFERENCE_LOGPS_KEY, SAMPLE_BATCH_KEYS
from core.metric_sums import EVAL, TRAIN
from preference.logprobs import reference_label_logprobs, summed_label_logprobs
from preference.losses import dpo_sigmoid_loss, pairwise_reward_loss

logger = logging.getLogger(__name__)

REWARD, DPO = "reward", "dpo"
# Per interval and mode, all sums over pairs: row 0 every pair, row 1 + i source i's.
PAIR_SUM_COLUMNS = (
    "pairs",
    "correct",
    "sum_margin",
    "sum_chosen",
    "sum_rejected",
    "sum_chosen_logps",
    "sum_rejected_logps",
)


class PreferenceLossMixin:
    """Trainer mixin: the pairwise loss of `objective` (`reward` or `dpo`) and its pair metrics."""

    def __init__(self, *args: Any, objective: str, preference: PreferenceConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if objective not in (REWARD, DPO):
            raise ValueError(f"PreferenceLossMixin: objective={objective!r} is not one of {[REWARD, DPO]}")
        self.preference_objective = objective
        self.preference_config = preference
        self._pair_sums = {mode: self._zero_pair_sums() for mode in (TRAIN, EVAL)}

    def _zero_pair_sums(self) -> torch.Tensor:
        return torch.zeros(1 + len(self.source_keys), len(PAIR_SUM_COLUMNS), dtype=torch.float64)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        source_ids = self._take_sample_keys(inputs, model.training)
        labels = inputs.pop(LABELS_KEY)
        reference_logps = inputs.pop(REFERENCE_LOGPS_KEY, None)  # precomputed (precompute_reference), else None
        rows = inputs["input_ids"].shape[0]
        if rows % 2:
            raise ValueError(f"a preference batch holds chosen and rejected rows in two halves, got {rows} rows")
        pairs = rows // 2
        config = self.preference_config
        logps = None
        if self.preference_objective == REWARD:
            outputs = model(**inputs)
            rewards = outputs.logits.squeeze(-1).float()
            loss = pairwise_reward_loss(
                rewards[:pairs], rewards[pairs:], config.margin, config.center_rewards_coefficient
            )
            rewards = rewards.detach()
        else:
            unwrapped = self.accelerator.unwrap_model(model)
            if reference_logps is None:
                reference_logps = reference_label_logprobs(
                    self._reference(model), inputs, labels, self.loss_config.chunk_size
                )
            with summed_label_logprobs(unwrapped, labels, self.loss_config.chunk_size) as head:
                outputs = model(**inputs)
            logps = head.logprobs.float()
            loss, chosen_rewards, rejected_rewards = dpo_sigmoid_loss(
                logps[:pairs], logps[pairs:], reference_logps[:pairs], reference_logps[pairs:], config.beta
            )
            rewards = torch.cat([chosen_rewards, rejected_rewards]).detach()
            logps = logps.detach()
            outputs = ModelOutput(loss=loss)
        if model.training:
            loss = loss / self.current_gradient_accumulation_steps
        mode = TRAIN if model.training else EVAL
        self._record_pairs(rewards, logps, self._pair_sources(source_ids, pairs), mode)
        self._current_rows = rows
        attention_mask = inputs.get("attention_mask")
        input_tokens = int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        # No token sums (nll, p_correct) for a pairwise loss: the input tokens and rows still feed throughput.
        self._record(None, input_tokens, mode)
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self._precomputes_reference():
            # Both sets now, while the reference exists: it is freed before the first step.
            self.train_dataset = self._with_reference_logps(self.train_dataset, "training")
            if isinstance(self.eval_dataset, datasets.Dataset):
                self.eval_dataset = self._with_reference_logps(self.eval_dataset, "evaluation")
            self._reference_copy = self.reference_model = None
            gc.collect()
            logger.info("Freed the reference model: training holds the policy alone")
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset: Any = None) -> torch.utils.data.DataLoader:
        if eval_dataset is None and self._precomputes_reference() and isinstance(self.eval_dataset, datasets.Dataset):
            self.eval_dataset = self._with_reference_logps(self.eval_dataset, "evaluation")
        return super().get_eval_dataloader(eval_dataset)

    def _precomputes_reference(self) -> bool:
        return self.preference_objective == DPO and self.preference_config.precompute_reference

    @torch.no_grad()
    def _with_reference_logps(self, dataset: datasets.Dataset, name: str) -> datasets.Dataset:
        """`dataset` with the reference's [chosen, rejected] log-probabilities of each pair as a column.

        The ranks share the pass, batch `i` on rank `i % world`; every rank runs as many forwards (ZeRO-3 gathers
        each layer's weights collectively, a rank out of batches repeats its first), then all gather the results.
        """
        if REFERENCE_LOGPS_KEY in dataset.column_names:
            return dataset
        started = time.monotonic()
        reference = self._reference(self.model)
        size, world, rank = (
            self.args.per_device_eval_batch_size,
            self.accelerator.num_processes,
            self.args.process_index,
        )
        batches = [range(start, min(start + size, len(dataset))) for start in range(0, len(dataset), size)]
        rounds = -(-len(batches) // world)
        logger.info(
            "Precomputing the reference's log-probabilities of %d %s pairs (%d rounds of %d batches)",
            len(dataset),
            name,
            rounds,
            world,
        )
        computed: dict[int, list[float]] = {}
        for round_index in range(rounds):
            index = round_index * world + rank
            rows = batches[index] if index < len(batches) else batches[0]
            batch = self._prepare_inputs(self.data_collator([dataset[row] for row in rows]))
            model_inputs = {k: v for k, v in batch.items() if k not in (*SAMPLE_BATCH_KEYS, LABELS_KEY)}
            logps = reference_label_logprobs(reference, model_inputs, batch[LABELS_KEY], self.loss_config.chunk_size)
            if index < len(batches):
                pairs = len(rows)
                computed.update({row: [float(logps[i]), float(logps[pairs + i])] for i, row in enumerate(rows)})
            if (round_index + 1) % max(1, rounds // 10) == 0:
                logger.info("  reference log-probabilities: round %d/%d", round_index + 1, rounds)
        every = {row: values for part in gather_object([computed]) for row, values in part.items()}
        logger.info(
            "Precomputed %d %s pairs' reference log-probabilities in %.1f s",
            len(every),
            name,
            time.monotonic() - started,
        )
        return dataset.add_column(REFERENCE_LOGPS_KEY, [every[row] for row in range(len(dataset))])

    def _pair_sources(self, source_ids: torch.Tensor | None, pairs: int) -> torch.Tensor | None:
        if source_ids is None or not self.source_keys:
            return None
        per_row = source_ids[:, 0] if source_ids.dim() == 2 else source_ids
        return per_row[:pairs].long().cpu()

    def _record_pairs(
        self, rewards: torch.Tensor, logps: torch.Tensor | None, sources: torch.Tensor | None, mode: str
    ) -> None:
        pairs = rewards.shape[0] // 2
        rewards = rewards.double().cpu()
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        logps = logps.double().cpu() if logps is not None else torch.zeros_like(rewards)
        values = torch.stack(
            [
                torch.ones(pairs, dtype=torch.float64),
                (chosen > rejected).double(),
                chosen - rejected,
                chosen,
                rejected,
                logps[:pairs],
                logps[pairs:],
            ],
            dim=1,
        )
        sums = self._pair_sums[mode]
        sums[0] += values.sum(0)
        if sources is not None:
            sums[1:].index_add_(0, sources, values)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = EVAL if "eval_loss" in logs else TRAIN if "loss" in logs else None
        if mode is not None:
            sums = self._pair_sums[mode]
            self._pair_sums[mode] = self._zero_pair_sums()
            total = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
            logs.update(
                pair_metrics(total, self.source_keys, self.preference_objective, "eval_" if mode == EVAL else "")
            )
        super().log(logs, start_time)


def pair_metrics(total: torch.Tensor, source_keys: list[str], objective: str, prefix: str) -> dict[str, float]:
    """The interval's pair metrics from all ranks' `PAIR_SUM_COLUMNS` sums (row 0 all pairs, then per source)."""
    column = {name: index for index, name in enumerate(PAIR_SUM_COLUMNS)}
    metrics: dict[str, float] = {}
    pairs = float(total[0, column["pairs"]])
    if pairs == 0:
        return metrics
    means = {
        "correct": "accuracy",
        "sum_margin": "margin",
        "sum_chosen": "chosen_reward",
        "sum_rejected": "rejected_reward",
    }
    if objective == DPO:
        means.update(sum_chosen_logps="chosen_logps", sum_rejected_logps="rejected_logps")
    for sum_name, name in means.items():
        metrics[f"{prefix}{name}"] = float(total[0, column[sum_name]]) / pairs
    for key, row in zip(source_keys, total[1:], strict=True):
        if row[column["pairs"]] > 0:
            metrics[f"{prefix}accuracy/{key}"] = float(row[column["correct"]] / row[column["pairs"]])
            metrics[f"{prefix}margin/{key}"] = float(row[column["sum_margin"]] / row[column["pairs"]])
    return metrics
