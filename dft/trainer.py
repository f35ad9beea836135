"""`DFTTrainer`: a `transformers.Trainer` whose loss is DFT, with its metrics.

Features and their config keys:
- `loss.type=dft`: `sum_t CE_t * (alpha * p_t.detach() + 1 - alpha) / N` (see `dft.loss`);
  `loss.type=ce`: the model's own cross-entropy, exactly as the stock Trainer computes it.
- `loss.implementation=fused` (default): the model runs with its LM head swapped, for that call only,
  for `fused_dft_loss`, so the `[tokens, vocab]` logits are never built. The loss runs inside the head
  module's own forward call, so under ZeRO-3 DeepSpeed's module hooks gather the partitioned (possibly
  tied) head weight for the forward and again for the backward, and reduce its gradient, as for a stock
  head. A model's `final_logit_softcapping` is applied inside the fused loss.
  `loss.implementation=reference`: full logits, then `dft_loss`. `loss.chunk_size`: fused chunk size.
- `loss.alpha`, `loss.alpha_warmup_steps`: alpha rises linearly from 0 to `loss.alpha` over that many
  optimizer steps (0: constant); the value in use is logged as `dft_alpha`.
- Exact normalisation: `N` is the Trainer's `num_items_in_batch`, the trainable tokens of the
  whole optimizer step over gradient accumulation and ranks (`training.average_tokens_across_devices`).
- Metrics beside `loss`: `nll` (plain cross-entropy of the same tokens), `avg_p_correct`
  (mean probability of the correct token); evaluation logs `eval_nll` and `eval_avg_p_correct`.
  Each is a token-weighted mean over the logging interval: sums and counts are all-reduced over
  ranks, then divided, never averages of averages. Each rank also appends its own interval sums to
  `<output_dir>/logs/rank<N>_metrics.jsonl`, to find the rank (and so the data shard) that misbehaves.
- Per-source metrics, when `source_names` (the prepared data's `stats.sources`, in order) lists two or
  more sources and the batches carry `source_ids` (`data_pipeline.collate.SampleIdCollator`):
  `nll/<source>`, `avg_p_correct/<source>`, `dft_loss/<source>` (the mean per-token `w_t * CE_t`,
  `loss.type=dft` only) and `num_tokens/<source>`, `eval_`-prefixed in evaluation, `<source>` the
  file's stem. Token-weighted like the rest, reduced in the same single all-reduce; a source with no
  token in the interval is left out. The rank files get each source's sums under `sources`.
- Sample origins: `step_origins` holds the `file:line` of every sample this rank fed to the current
  optimizer step (from the batches' `origins`); it is reset at the first micro-batch of the next step,
  so callbacks read the finished step's samples in `on_pre_optimizer_step` and `on_step_end`.
  The model never sees `source_ids` or `origins`: `compute_loss` pops them.
- Throughput and cost per logging interval: `tokens_per_second` and `trainable_tokens_per_second`
  (global) with their `_per_device` values, `step_time` (seconds per optimizer step),
  `peak_memory_gb` (max over ranks: allocated device memory on GPUs, process peak RSS on CPU), and on
  GPUs `mfu`: `6 * N_params + 12 * layers * hidden * seq_len` FLOPs per token (forward and backward,
  the PaLM appendix B estimate, `seq_len` the mean row length) times tokens/s per device, over the
  device's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.trainer_utils import seed_worker

from dft.loss import GROUP_SUM_COLUMNS, DFTStats, dft_loss, fused_dft_loss
from launcher.checkpoints import AtomicCheckpointMixin

logger = logging.getLogger(__name__)

TRAIN, EVAL = "train", "eval"
# Batch keys beside the model inputs (written by data_pipeline/collate.py), popped before the model call:
# per-token source ids shaped like `labels`, and each sample's `file:line` as a list of str.
SOURCE_IDS_KEY, ORIGINS_KEY = "source_ids", "origins"
SAMPLE_BATCH_KEYS = (SOURCE_IDS_KEY, ORIGINS_KEY)
# Dense bf16 peak FLOP/s by device name, for the MFU estimate (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
LOSS_TYPES = ("dft", "ce")
IMPLEMENTATIONS = ("fused", "reference")


class _FusedHeadResult:
    """What the swapped head leaves behind besides its output: the micro-batch's detached statistics."""

    stats: DFTStats | None = None


@contextlib.contextmanager
def fused_lm_head(
    model: torch.nn.Module,
    labels: torch.Tensor,
    alpha: float,
    num_items_in_batch: torch.Tensor | int | None,
    chunk_size: int,
    token_groups: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> Iterator[_FusedHeadResult]:
    """Within this context the model's LM head returns the scalar fused DFT loss in place of the logits.

    The head module keeps its identity (only its `forward` is shadowed by an instance attribute), so hooks
    registered on it, DeepSpeed ZeRO-3's parameter gathering and gradient reduction included, run as for
    a stock head. The model's final logit soft-cap, applied by its forward after the head, is switched off
    for the call and applied inside the loss instead, where it acts on the logits and not on the loss.

    Args:
        model: the unwrapped causal LM (`get_output_embeddings()` gives its head, a linear layer).
        labels, alpha, num_items_in_batch, chunk_size, token_groups, num_groups: as for `fused_dft_loss`.

    Yields:
        A record whose `stats` the head's call fills in.
    """
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__}: the LM head {type(head).__name__} has no weight matrix; "
            "use loss.implementation=reference"
        )
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    result = _FusedHeadResult()

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # head.weight here, not before the call: under ZeRO-3 it is gathered only inside the head's forward.
        loss, result.stats = fused_dft_loss(
            hidden_states,
            head.weight,
            labels,
            alpha,
            num_items_in_batch=num_items_in_batch,
            chunk_size=chunk_size,
            logit_softcap=softcap,
            lm_head_bias=head.bias,
            token_groups=token_groups,
            num_groups=num_groups,
        )
        return loss

    head.forward = forward
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        yield result
    finally:
        del head.forward  # back to the class's forward
        if softcap is not None:
            config.final_logit_softcapping = softcap


def source_metric_names(source_names: Sequence[str]) -> list[str]:
    """Short unique names for metric keys: each file's stem (`data/chat.jsonl.gz` -> `chat`).

    A stem shared by several files gets its parent directory's name in front (`a_train`, `b_train`), and a
    name still shared gets its source index behind.
    """
    paths = [Path(name) for name in source_names]
    stems = [Path(path.name.removesuffix(".gz")).stem for path in paths]
    names = [
        stem if stems.count(stem) == 1 else f"{path.parent.name}_{stem}"
        for path, stem in zip(paths, stems, strict=True)
    ]
    return [name if names.count(name) == 1 else f"{name}_{index}" for index, name in enumerate(names)]


class DFTTrainer(AtomicCheckpointMixin, Trainer):
    # compute_loss divides by the step's token count itself: the Trainer must not divide by GA again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        loss_type: str = "dft",
        alpha: float = 1.0,
        implementation: str = "fused",
        alpha_warmup_steps: int = 0,
        chunk_size: int = 1024,
        source_names: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not one of {list(LOSS_TYPES)}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r} is not one of {list(IMPLEMENTATIONS)}")
        if alpha_warmup_steps < 0:
            raise ValueError(f"alpha_warmup_steps={alpha_warmup_steps} must be >= 0")
        super().__init__(*args, **kwargs)
        self.loss_type = loss_type
        self.alpha = alpha
        self.implementation = implementation
        self.alpha_warmup_steps = alpha_warmup_steps
        self.chunk_size = chunk_size
        self._alpha_in_use = self.current_alpha()
        # Per mode: sum of p_correct, sum of nll, trainable tokens, all input tokens, rows.
        self._metric_sums = {mode: torch.zeros(5, dtype=torch.float64) for mode in (TRAIN, EVAL)}
        self._interval_start: float | None = None
        self._interval_first_step = 0
        self._current_rows = 0
        # Per-source metrics only mean something with two sources or more; with fewer none are computed.
        self.source_keys = source_metric_names(source_names) if len(source_names) >= 2 else []
        self._source_sums = {
            mode: torch.zeros(len(self.source_keys), len(GROUP_SUM_COLUMNS), dtype=torch.float64)
            for mode in (TRAIN, EVAL)
        }
        self.step_origins: list[str] = []
        self._origins_step: int | None = None

    def current_alpha(self) -> float:
        """`alpha * min(1, step / alpha_warmup_steps)` at the current optimizer step; `alpha` without warm-up."""
        if self.alpha_warmup_steps == 0:
            return self.alpha
        return self.alpha * min(1.0, self.state.global_step / self.alpha_warmup_steps)

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps only the model's inputs: also keep the columns the collator reads.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += list(getattr(self.data_collator, "dataset_columns", ()))

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)  # the caller's batch keeps its keys
        source_ids, origins = (inputs.pop(key, None) for key in SAMPLE_BATCH_KEYS)
        if origins is not None and model.training:
            self._note_origins(origins)
        groups = self._token_groups(source_ids)
        group_kwargs = {} if groups is None else {"token_groups": groups, "num_groups": len(self.source_keys)}
        labels = inputs["labels"]
        if self.loss_type == "ce":
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            with torch.no_grad():
                _, stats = dft_loss(outputs.logits, labels, alpha=0.0, **group_kwargs)
        else:
            self._alpha_in_use = alpha = self.current_alpha()
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            if self.implementation == "fused":
                unwrapped = self.accelerator.unwrap_model(model)
                with fused_lm_head(
                    unwrapped, labels, alpha, num_items_in_batch, self.chunk_size, **group_kwargs
                ) as head:
                    # Through the (DeepSpeed/DDP) wrapper, so its forward bookkeeping runs as usual.
                    outputs = model(**model_inputs)
                if head.stats is None:
                    raise RuntimeError(
                        f"loss.implementation=fused: {type(unwrapped).__name__}'s forward did not call its LM head "
                        "module, so the fused loss never ran; use loss.implementation=reference"
                    )
                # The head's output, as the wrapper returned it: under ZeRO-3 it carries the hook that
                # gathers the head weight again before the loss's backward.
                loss, stats = outputs.logits, head.stats
                outputs = CausalLMOutputWithPast(loss=loss)  # no logits exist to return
            else:
                outputs = model(**model_inputs)
                loss, stats = dft_loss(
                    outputs.logits, labels, alpha, num_items_in_batch=num_items_in_batch, **group_kwargs
                )
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every rank's tokens while DDP/ZeRO average gradients over
                # ranks: scale back up, as the stock compute_loss does.
                loss = loss * self.accelerator.num_processes
            elif num_items_in_batch is None and model.training:
                loss = loss / self.current_gradient_accumulation_steps
        attention_mask = inputs.get("attention_mask")
        input_tokens = int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        self._current_rows = inputs["input_ids"].shape[0]
        self._record(stats, input_tokens, TRAIN if model.training else EVAL)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not all(inputs.get(name) is not None for name in self.label_names):
            # Without labels the Trainer calls the model itself, not compute_loss.
            inputs = {k: v for k, v in inputs.items() if k not in SAMPLE_BATCH_KEYS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _note_origins(self, origins: list[str]) -> None:
        # global_step moves after each optimizer step: a new value means this is the next step's first micro-batch.
        if self._origins_step != self.state.global_step:
            self.step_origins = []
            self._origins_step = self.state.global_step
        self.step_origins.extend(origins)

    def _token_groups(self, source_ids: torch.Tensor | None) -> torch.Tensor | None:
        if source_ids is None or not self.source_keys:
            return None
        if bool(((source_ids < 0) | (source_ids >= len(self.source_keys))).any()):
            raise ValueError(
                f"the batch's source ids span {int(source_ids.min())}..{int(source_ids.max())} but source_names "
                f"lists {len(self.source_keys)} sources: pass source_names=list(stats.sources) of the prepared "
                "data the batches come from"
            )
        return source_ids

    def _record(self, stats: DFTStats, input_tokens: int, mode: str) -> None:
        if mode == TRAIN and self._interval_start is None:
            self._interval_start = time.perf_counter()
            self._interval_first_step = self.state.global_step
        rows = float(self._current_rows)
        self._metric_sums[mode] += torch.tensor(
            [float(stats.sum_p_correct), float(stats.sum_nll), float(stats.num_tokens), float(input_tokens), rows],
            dtype=torch.float64,
        )
        if stats.group_sums is not None:
            self._source_sums[mode] += stats.group_sums.cpu()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = EVAL if "eval_loss" in logs else TRAIN if "loss" in logs else None
        if mode is None:  # the end-of-training summary
            super().log(logs, start_time)
            return
        local, local_sources = self._metric_sums[mode].clone(), self._source_sums[mode].clone()
        self._metric_sums[mode].zero_()
        self._source_sums[mode].zero_()
        self._append_rank_record(mode, local, local_sources)
        # One collective for the global and the per-source sums.
        flat = torch.cat([local, local_sources.flatten()]).to(self.args.device)
        sums = self.accelerator.reduce(flat, reduction="sum").cpu()
        sum_p, sum_nll, num_tokens, input_tokens, rows = sums[: local.numel()].tolist()
        prefix = "eval_" if mode == EVAL else ""
        if num_tokens > 0:
            logs[f"{prefix}nll"] = sum_nll / num_tokens
            logs[f"{prefix}avg_p_correct"] = sum_p / num_tokens
        logs.update(self._source_metrics(sums[local.numel() :].view_as(local_sources), prefix))
        if mode == TRAIN:
            logs.update(self._throughput(num_tokens, input_tokens, input_tokens / max(rows, 1.0)))
            if self.loss_type == "dft":
                logs["dft_alpha"] = self._alpha_in_use
        super().log(logs, start_time)

    def _source_metrics(self, source_sums: torch.Tensor, prefix: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, (sum_p, sum_nll, sum_weighted, tokens) in zip(self.source_keys, source_sums.tolist(), strict=True):
            if tokens == 0:
                continue
            metrics[f"{prefix}nll/{key}"] = sum_nll / tokens
            metrics[f"{prefix}avg_p_correct/{key}"] = sum_p / tokens
            if self.loss_type == "dft":
                metrics[f"{prefix}dft_loss/{key}"] = sum_weighted / tokens
            metrics[f"{prefix}num_tokens/{key}"] = int(tokens)
        return metrics

    def _append_rank_record(self, mode: str, local_sums: torch.Tensor, local_source_sums: torch.Tensor) -> None:
        sum_p, sum_nll, num_tokens, input_tokens, _ = local_sums.tolist()
        record = {
            "step": self.state.global_step,
            "mode": mode,
            "sum_p_correct": sum_p,
            "sum_nll": sum_nll,
            "num_tokens": num_tokens,
            "input_tokens": input_tokens,
        }
        sources = {
            key: dict(zip(GROUP_SUM_COLUMNS, values, strict=True))
            for key, values in zip(self.source_keys, local_source_sums.tolist(), strict=True)
            if values[-1] > 0
        }
        if sources:
            record["sources"] = sources
        path = Path(self.args.output_dir) / "logs" / f"rank{self.args.process_index}_metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _throughput(self, trainable_tokens: float, input_tokens: float, mean_row_length: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - (self._interval_start or time.perf_counter()), 1e-9)
        steps = max(self.state.global_step - self._interval_first_step, 1)
        self._interval_start = None
        world = self.accelerator.num_processes
        if torch.cuda.is_available():
            peak_bytes = torch.cuda.max_memory_allocated()
        else:
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        peak = self.accelerator.gather(torch.tensor([float(peak_bytes)], device=self.args.device)).max().item()
        metrics = {
            "tokens_per_second": input_tokens / elapsed,
            "tokens_per_second_per_device": input_tokens / elapsed / world,
            "trainable_tokens_per_second": trainable_tokens / elapsed,
            "trainable_tokens_per_second_per_device": trainable_tokens / elapsed / world,
            "step_time": elapsed / steps,
            "peak_memory_gb": peak / 2**30,
        }
        mfu = self._mfu(input_tokens / elapsed / world, mean_row_length)
        if mfu is not None:
            metrics["mfu"] = mfu
        return metrics

    def _mfu(self, tokens_per_second_per_device: float, seq_len: float) -> float | None:
        # A packed row counts as one sequence: its block-diagonal attention is over-counted.
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
        peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
        if peak is None:
            return None
        config = self.accelerator.unwrap_model(self.model).config
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len
        return flops_per_token * tokens_per_second_per_device / peak

    # Set by train.py for data.packing_max_tokens (a `data_pipeline.packing.TokenBudgetBatchSampler`): the training
    # micro-batches, as lists of sample indices, in place of `per_device_train_batch_size` random samples.
    train_batch_sampler: torch.utils.data.Sampler[list[int]] | None = None

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The stock training loader, or one whose micro-batches come from `train_batch_sampler` when it is set.

        The sampler is not rank-aware: `accelerator.prepare` wraps it in accelerate's `BatchSamplerShard`, which
        gives rank `r` micro-batches `r, r + W, ...` of each epoch, and with `even_batches` (the default) lets the
        ranks left one short at the end repeat the epoch's first micro-batches, so every rank runs as many forward
        and backward passes as the others. The Trainer counts `num_items_in_batch` from the labels of the micro-batches
        it actually draws, so the loss normalisation stays exact whatever their sizes.
        """
        sampler = self.train_batch_sampler
        if sampler is None:
            return super().get_train_dataloader()
        world = self.accelerator.num_processes
        if world > 1 and not self.accelerator.even_batches:
            raise ValueError(
                "data.packing_max_tokens needs accelerate's even_batches=true (training.accelerator_config): "
                "otherwise ranks run different numbers of micro-batches and the collectives hang"
            )
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        num_batches = len(sampler)
        repeated = -num_batches % world
        logger.info(
            "Training micro-batches from %s: %d per epoch, %d per rank over %d rank(s)%s",
            type(sampler).__name__,
            num_batches,
            -(-num_batches // world),
            world,
            f"; {repeated} rank(s) repeat one of the epoch's first micro-batches to match the others"
            if repeated
            else "",
        )
        return self.accelerator.prepare(loader)
