"""Full-parameter supervised fine-tuning with the DFT loss.

    python train.py                                   # embedded default: tiny model, bundled data, CPU
    python train.py loss.type=ce training.max_steps=50
    deepspeed --num_gpus=8 train.py experiment=qwen2_5_7b_zero3
    torchrun --nproc_per_node=8 train.py deepspeed=zero3 model.name_or_path=/models/Qwen2.5-7B-Instruct

The recipe: typed config -> logging -> model path and tokenizer -> held-out baseline
-> Trainer arguments (starts the process group) -> data -> model -> train -> save
-> held-out comparison -> teardown.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import deepspeed
import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import DataCollatorForSeq2Seq, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from data_pipeline.prepare import build_datasets
from data_pipeline.sources import check_source_paths
from dft.loss import IGNORE_INDEX
from dft.trainer import DFTTrainer
from evaluation.heldout import HeldoutResult, evaluate_heldout, format_comparison, load_heldout
from launcher.artifacts import CONFIG_FILE, RunArtifactsCallback, use_readable_progress, write_atomic
from launcher.config import RunConfig, register_configs, to_run_config
from launcher.distributed import accept_launcher_local_rank, is_rank_zero, setup_logging, teardown
from launcher.model import load_model, load_tokenizer, resolve_model_path
from launcher.preflight import check_deepspeed_config
from launcher.trackers import tracker_callbacks

logger = logging.getLogger("train")
register_configs()


def heldout_eval(run: RunConfig, model_path: str) -> HeldoutResult | None:
    """Greedy generations and NLL on held-out prompts, on rank 0 with a plain (unsharded) copy."""
    if run.heldout.file is None or not is_rank_zero():
        return None
    model = load_model(run.model, model_path, bf16=False, deepspeed=False)
    tokenizer = load_tokenizer(run.model, model_path)
    dialogues = load_heldout(run.heldout.file, run.heldout.max_samples)
    return evaluate_heldout(model, tokenizer, dialogues, run.heldout.max_new_tokens)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run = to_run_config(cfg)
    check_source_paths(run.data.sources + ([run.heldout.file] if run.heldout.file else []))
    check_deepspeed_config(run.deepspeed.config)
    output_dir = Path(run.output_dir)
    log_path = setup_logging(output_dir)
    if is_rank_zero():
        write_atomic(output_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("Output directory %s (log %s)", output_dir.resolve(), log_path)

    model_path = resolve_model_path(run.model)
    tokenizer = load_tokenizer(run.model, model_path)
    before = heldout_eval(run, model_path)

    training_kwargs = dataclasses.asdict(run.training)
    if not torch.cuda.is_available():
        training_kwargs["use_cpu"] = True  # the Trainer refuses bf16 on a GPU-less machine otherwise
    if training_kwargs["disable_tqdm"] is None and not sys.stdout.isatty():
        training_kwargs["disable_tqdm"] = True  # nohup/Slurm logs: plain lines that `tail -f` can read
    training_args = TrainingArguments(**training_kwargs)
    if training_args.deepspeed:
        deepspeed.init_distributed()  # zero.Init reads the world size from deepspeed.comm, unset under use_cpu
    try:
        train_set, validation_set, data_stats = build_datasets(
            run.data.sources,
            tokenizer,
            run.data.max_length,
            run.data.num_proc,
            run.data.validation_split_percentage,
            training_args.seed,
        )
        logger.info("Data:\n%s", data_stats.summary())

        model = load_model(run.model, model_path, training_args.bf16, training_args.deepspeed is not None)
        trainer = DFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_set,
            eval_dataset=validation_set,
            processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
            callbacks=[RunArtifactsCallback(output_dir), *tracker_callbacks(run, cfg)],
            loss_type=run.loss.type,
            alpha=run.loss.alpha,
        )
        use_readable_progress(trainer)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        model.config.use_cache = True
        trainer.save_model(str(output_dir))
        logger.info("Saved the final model and tokenizer to %s", output_dir.resolve())

        unset_hf_deepspeed_config()  # the comparison below loads a plain, unsharded copy
        after = heldout_eval(run, str(output_dir))
        if before is not None and after is not None:
            comparison = format_comparison(before, after, run.heldout.show)
            write_atomic(output_dir / "heldout.txt", comparison + "\n")
            logger.info("Held-out prompts, before and after training:\n%s", comparison)
    finally:
        teardown()


if __name__ == "__main__":
    accept_launcher_local_rank()
    main()
