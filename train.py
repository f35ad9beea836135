"""Full-parameter supervised fine-tuning with the DFT loss.

    python train.py                                   # embedded default: tiny model, bundled data, CPU
    python train.py loss.type=ce training.max_steps=50
    deepspeed --num_gpus=8 train.py experiment=qwen2_5_7b_zero3
    torchrun --nproc_per_node=8 train.py deepspeed=zero3 model.name_or_path=/models/Qwen2.5-7B-Instruct

The recipe: typed config -> logging -> model path and tokenizer -> held-out baseline
-> Trainer arguments (starts the process group) -> fine_tune (data -> model -> train -> save, verified)
-> held-out comparison and samples.md -> teardown.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import hydra
from datasets import Dataset
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
from transformers.trainer_utils import IntervalStrategy, TrainOutput

from cluster.check import refuse_bad_overrides
from cluster.distributed import (
    accept_launcher_local_rank,
    init_deepspeed_distributed,
    set_collective_timeout,
    teardown,
)
from cluster.export import verify_export
from cluster.resilience import ResilienceCallback
from cluster.resume import resolve_resume_checkpoint, resume_training_config, saved_model
from cluster.universal import UntieUniversalOptimizerSteps
from config.deepspeed import check_deepspeed_config
from config.schema import RunConfig, register_configs, start_up_warnings, to_run_config, to_training_arguments
from config.sources import SourceSpec
from core.errors import exit_on_user_error
from core.files import write_atomic
from core.provenance import provenance
from core.ranks import is_rank_zero, launch_world_size
from data_pipeline.loader import token_budget_sampler
from data_pipeline.prepare import build_datasets
from data_pipeline.sources import check_source_paths
from data_pipeline.stats import source_metric_names
from data_pipeline.templates import load_chat_tokenizer
from evaluation.heldout import HELDOUT_JSON, HELDOUT_TEXT, HeldoutResult, comparison_record, format_comparison
from evaluation.pairs import format_pair_comparison, heldout_pairs_config, naming_heldout_file, pair_comparison
from evaluation.run_heldout import heldout_baseline, heldout_eval
from evaluation.samples import samples_markdown
from modeling.adapter import add_adapter, check_adapter_supported, load_adapter_model, merge_adapter
from modeling.loading import load_model, resolve_model_path
from observability.artifacts import CONFIG_FILE, RunArtifactsCallback, redact_secrets, use_readable_progress
from observability.banner import end_summary, startup_banner
from observability.drift_guard import DriftGuardCallback
from observability.rank_logging import library_prints_to_log, setup_logging
from observability.trackers import tracker_callbacks
from trainer.modes import training_mode

STARTED = time.monotonic()  # the run's wall time (from here: imports take seconds more), for the results it records
logger = logging.getLogger("train")
register_configs()


def plain_copy(run: RunConfig, model_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An unsharded copy for rank 0's generations, whatever the training sharding."""
    return load_model(run.model, model_path, bf16=False, deepspeed=False), load_chat_tokenizer(run, model_path)


def trained_copy(run: RunConfig, model_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Rank 0's unsharded copy of what was saved: the model, or the base with the saved adapter on it."""
    if run.model.adapter == "none":
        return plain_copy(run, run.output_dir)
    base = load_model(run.model, model_path, bf16=False, deepspeed=False)
    return load_adapter_model(base, run.output_dir), load_chat_tokenizer(run, run.output_dir)


def final_reports(
    run: RunConfig, model_path: str, before: HeldoutResult | None, validation_set: Dataset | None
) -> None:
    """Rank 0: the held-out before/after table and samples.md, from the saved model."""
    output_dir = Path(run.output_dir)
    # Raw text has no prompt to reply to, and a reward model no reply to write.
    samples = validation_set is not None and len(validation_set) > 0 and training_mode(run).writes_replies
    if before is None and not samples:
        return
    model, tokenizer = trained_copy(run, model_path)
    if before is not None:
        after = heldout_eval(run, model, tokenizer)
        comparison = format_comparison(before, after, run.heldout.show)
        write_atomic(output_dir / HELDOUT_TEXT, comparison + "\n")
        record = comparison_record(before, after)
        write_atomic(output_dir / HELDOUT_JSON, json.dumps(record, indent=2) + "\n")
        if run.heldout.results_file:
            measured = {**provenance(), "wall_seconds": round(time.monotonic() - STARTED, 1), **record}
            write_atomic(run.heldout.results_file, json.dumps(measured, indent=2) + "\n")
        logger.info("Held-out prompts, before and after training:\n%s", comparison)
    if samples:
        rows = validation_set.select(range(min(run.heldout.show, len(validation_set))))
        write_atomic(
            output_dir / "samples.md",
            samples_markdown(model, tokenizer, rows, run.heldout.max_new_tokens, run.heldout.batch_size),
        )


def pair_reports(run: RunConfig, log_history: list[dict], pairs: int) -> None:
    """Rank 0: the held-out pairs' before/after table (evaluation at step 0 and at the end), as for chat prompts."""
    comparison = pair_comparison(log_history)
    if comparison is None:
        logger.warning(
            "No before/after table for the held-out pairs: it takes an evaluation at step 0 and one after training "
            "(training.eval_on_start=true, training.eval_strategy=steps or epoch)"
        )
        return
    output_dir = Path(run.output_dir)
    table = format_pair_comparison(comparison, pairs)
    record = {"pairs": pairs, **comparison}
    write_atomic(output_dir / HELDOUT_TEXT, table + "\n")
    write_atomic(output_dir / HELDOUT_JSON, json.dumps(record, indent=2) + "\n")
    if run.heldout.results_file:
        measured = {**provenance(), "wall_seconds": round(time.monotonic() - STARTED, 1), **record}
        write_atomic(run.heldout.results_file, json.dumps(measured, indent=2) + "\n")
    logger.info("Held-out pairs, before and after training:\n%s", table)


class FineTuned(NamedTuple):
    result: TrainOutput
    validation_set: Dataset | None
    """Rank 0's reports sample it."""
    model: PreTrainedModel
    """As trained: this rank's shard under ZeRO-3, the base and its adapter for an adapter run."""


def fine_tune(
    run: RunConfig,
    run_config: dict,
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    training_args: TrainingArguments,
    resilience: ResilienceCallback,
    resume_from: str | None,
) -> FineTuned:
    """Every rank, inside the process group: data -> model -> train -> save -> verified export (and, for an
    adapter run with `model.merge_adapter`, the merged model on rank 0)."""
    output_dir = Path(run.output_dir)
    mode = training_mode(run)
    with exit_on_user_error():
        train_set, validation_set, data_stats = build_datasets(run.data, tokenizer, training_args.seed)
        if mode.heldout_pairs and run.heldout.file:
            # A preference run evaluates on its held-out pairs, prepared as its training pairs are.
            heldout = heldout_pairs_config(run.data, run.heldout.file, run.heldout.max_samples)
            with naming_heldout_file(run.heldout.file):
                validation_set, _, heldout_stats = build_datasets(heldout, tokenizer, training_args.seed)
            logger.info("Held-out pairs (the evaluation set):\n%s", heldout_stats.summary())
    logger.info("Data:\n%s", data_stats.summary())
    if validation_set is None and training_args.eval_strategy != IntervalStrategy.NO:
        # The Trainer refuses an eval strategy without an eval dataset; with nothing held out there is nothing to do.
        logger.info("No validation set (data.validation_split_percentage=0, or too little data): evaluation is off")
        training_args.eval_strategy, training_args.eval_on_start = IntervalStrategy.NO, False
        training_args.do_eval = False

    deepspeed = training_args.deepspeed is not None
    model = load_model(
        run.model, model_path, training_args.bf16, deepspeed, mode.head, tokenizer.pad_token_id, training_args.seed
    )
    # A KL term or DPO compares the policy with the frozen starting model: a second copy for a full fine-tune
    # (sharded like the policy under ZeRO-3); an adapter run uses its base with the adapter off, so none is loaded.
    reference_model = (
        load_model(run.model, model_path, training_args.bf16, deepspeed)
        if mode.needs_reference(run) and run.model.adapter == "none"
        else None
    )
    with exit_on_user_error():
        model = add_adapter(model, run.model, training_args.seed)
    data_seed = training_args.seed if training_args.data_seed is None else training_args.data_seed
    train_batch_sampler = token_budget_sampler(train_set, run.data.packing_max_tokens, data_seed)
    trainer = mode.trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=validation_set,
        processing_class=tokenizer,
        data_collator=mode.collator(run, tokenizer),
        callbacks=[
            RunArtifactsCallback(output_dir, run.logger.console),
            *tracker_callbacks(run, run_config),
            resilience,
            DriftGuardCallback(run.drift_guard),
            UntieUniversalOptimizerSteps(),
        ],
        reference_model=reference_model,
        source_keys=source_metric_names(list(data_stats.sources)),
        train_batch_sampler=train_batch_sampler,
        **mode.trainer_kwargs(run),
    )
    resilience.step_origins = lambda: trainer.step_origins
    use_readable_progress(trainer)
    banner = startup_banner(
        run,
        training_args,
        model,
        train_set,
        validation_set,
        resume_from,
        train_batch_sampler,
        loss_line=mode.describe_loss(run),
    )
    logger.info("Run:\n%s", banner)
    result = trainer.train(resume_from_checkpoint=resume_from)
    model.config.use_cache = True
    trainer.save_model(str(output_dir))
    logger.info("Saved the final model and tokenizer to %s", output_dir.resolve())
    verify_export(model, output_dir, is_rank_zero(), zero3=is_deepspeed_zero3_enabled())
    if mode.heldout_pairs and run.heldout.file and is_rank_zero():
        pair_reports(run, trainer.state.log_history, len(validation_set))
    if run.model.merge_adapter:
        unset_hf_deepspeed_config()  # the merge loads a plain copy of the base on rank 0, outside ZeRO-3
        if is_rank_zero():
            merge_adapter(model_path, output_dir, run.model.trust_remote_code, mode.head, tokenizer.pad_token_id)
    return FineTuned(result, validation_set, model)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:  # each job of a sweep in its own directory, named by its overrides
        cfg.output_dir = hydra_config.runtime.output_dir
    with exit_on_user_error():  # config, path and data mistakes: one line and status 2, not a traceback
        if hydra_config.mode == RunMode.MULTIRUN and launch_world_size() > 1:
            raise ValueError(
                f"train.py -m runs a sweep's jobs one after another in one process, and a {launch_world_size()}-rank "
                "launch cannot restart its process group between them: launch each setting on its own "
                "(SWEEP=key=a,b LAUNCHER=single_node launch/sweep.sh ..., or LAUNCHER=slurm)"
            )
        run = to_run_config(cfg, hydra_config.overrides.task)
        check_source_paths(run.data.specs + ([SourceSpec(run.heldout.file)] if run.heldout.file else []))
        check_deepspeed_config(run.deepspeed.config)
        check_adapter_supported(run.model, fp16=run.training.fp16)
        output_dir = Path(run.output_dir)
        log_path = setup_logging(output_dir)
        run_config = redact_secrets(OmegaConf.to_container(cfg, resolve=True))
        if is_rank_zero():
            write_atomic(output_dir / CONFIG_FILE, OmegaConf.to_yaml(run_config))
        logger.info("Output directory %s (log %s)", output_dir.resolve(), log_path)
        resume_from = resolve_resume_checkpoint(run.training.resume_from_checkpoint, output_dir)
        # A ZeRO-3 checkpoint of another world size: converted, and training.deepspeed set to load it re-sharded.
        run.training = resume_training_config(run.training, resume_from, launch_world_size(), run.deepspeed.config)
        if is_rank_zero():
            for setting in start_up_warnings(run):
                logger.warning("%s", setting)
            if resume_from is None and (previous := saved_model(output_dir)) is not None:
                logger.warning("%s already holds a trained model (%s): this run replaces it", output_dir, previous.name)

    with exit_on_user_error():  # a released model that is not cached and cannot be fetched: one line
        model_path = resolve_model_path(run.model)
    tokenizer = load_chat_tokenizer(run, model_path)
    generates_heldout = run.heldout.file and not training_mode(run).heldout_pairs
    before = heldout_baseline(run, model_path, tokenizer) if generates_heldout and is_rank_zero() else None

    set_collective_timeout(timedelta(seconds=run.training.ddp_timeout))  # before the Trainer's world group
    training_args = to_training_arguments(run.training, launch_world_size())
    if run.training.global_batch_size is not None and is_rank_zero():
        logger.info(
            "training.global_batch_size=%d: %d micro-batch(es) of %d on each of %d rank(s) per optimizer step",
            run.training.global_batch_size,
            training_args.gradient_accumulation_steps,
            training_args.per_device_train_batch_size,
            launch_world_size(),
        )
    # Catches preemption signals from here on; fine_tune lets it name a skipped step's samples.
    resilience = ResilienceCallback(run.resilience)
    if training_args.deepspeed:
        # zero.Init reads the world size from deepspeed.comm, unset under use_cpu; keep the short collective timeout.
        with library_prints_to_log():
            init_deepspeed_distributed(timeout=timedelta(seconds=training_args.ddp_timeout))
    try:
        result, validation_set, _ = fine_tune(
            run, run_config, model_path, tokenizer, training_args, resilience, resume_from
        )
        unset_hf_deepspeed_config()  # the reports below load a plain, unsharded copy
        if is_rank_zero():
            final_reports(run, model_path, before, validation_set)
        logger.info("Done:\n%s", end_summary(output_dir, result.metrics))
    finally:
        teardown(output_dir)


if __name__ == "__main__":
    accept_launcher_local_rank()
    refuse_bad_overrides(sys.argv[1:])
    main()
