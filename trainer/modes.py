"""What differs between `training.objective`s in a run, in one registration each: `TRAINING_MODES`.

A mode names its model head (`modeling.loading`: the LM head, or a scalar score head), the collator its prepared
rows need, the Trainer class and its extra keyword arguments, whether it needs the frozen starting model, and
whether the trained model writes replies (held-out generations, samples.md). Its data is read by the data pipeline
from the sources' format (`data.sources` under the objective: chat, `text` or `pairs`, `config.schema`), and its
loss lives with its Trainer (`dft/` for sft and pretrain, `preference/` for reward and dpo). train.py asks
`training_mode(run)` and has no branch per objective; a new mode is one entry here plus its loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer

from config.schema import RunConfig
from core.keys import IGNORE_INDEX
from data_pipeline.collate import PairCollator, SampleIdCollator
from data_pipeline.packing import PaddingFreeCollator
from dft.objectives import build_objective, describe_objective
from modeling.heads import CAUSAL_LM, SCORE
from trainer.sft_trainer import PreferenceTrainer, SFTTrainer


@dataclass(frozen=True)
class TrainingMode:
    name: str
    head: str
    """`modeling.loading.CAUSAL_LM` or `SCORE`."""
    trainer_class: type[Trainer]
    collator: Callable[[RunConfig, PreTrainedTokenizerBase], Any]
    trainer_kwargs: Callable[[RunConfig], dict[str, Any]]
    needs_reference: Callable[[RunConfig], bool]
    """Whether the frozen starting model is compared with (a KL term, DPO's reference)."""
    describe_loss: Callable[[RunConfig], str]
    """The start-up banner's loss line."""
    writes_replies: bool
    """The trained model answers prompts: samples.md from the validation set."""
    heldout_pairs: bool
    """`heldout.file` is a pairs file the Trainer evaluates (before/after pairwise accuracy, `evaluation.pairs`),
    not chat prompts to generate replies to (`evaluation.heldout`)."""


def _token_collator(run: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    if run.data.padding_free:
        return SampleIdCollator(PaddingFreeCollator())
    return SampleIdCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))


def _pair_collator(run: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    return SampleIdCollator(PairCollator(tokenizer))


def _token_loss(run: RunConfig) -> dict[str, Any]:
    return {"loss": run.loss}


def _pair_loss(objective: str) -> Callable[[RunConfig], dict[str, Any]]:
    def kwargs(run: RunConfig) -> dict[str, Any]:
        # The loss Trainer underneath keeps only its machinery (chunk size, reference, sums): a pairwise loss has no
        # per-token objective, so it runs as ce (no alpha to log).
        token_loss = dataclasses.replace(run.loss, type="ce", alpha=None)
        return {"loss": token_loss, "objective": objective, "preference": run.preference}

    return kwargs


def _needs_kl_reference(run: RunConfig) -> bool:
    return build_objective(run.loss).needs_reference


def _describe_token_loss(run: RunConfig) -> str:
    return describe_objective(run.loss, run.model.adapter)


def _describe_reward(run: RunConfig) -> str:
    text = f"pairwise reward loss -log sigmoid(r_chosen - r_rejected - {run.preference.margin:g})"
    if run.preference.center_rewards_coefficient:
        text += f" + {run.preference.center_rewards_coefficient:g} mean((r_chosen + r_rejected)^2)"
    return text + ", scalar score head"


def _describe_dpo(run: RunConfig) -> str:
    reference = "a frozen copy" if run.model.adapter == "none" else "the base with the adapter off (no copy)"
    return f"DPO sigmoid loss (beta {run.preference.beta:g}); reference: {reference}, {run.loss.implementation} head"


def _never(run: RunConfig) -> bool:
    return False


def _always(run: RunConfig) -> bool:
    return True


TRAINING_MODES = {
    mode.name: mode
    for mode in (
        TrainingMode(
            "sft",
            head=CAUSAL_LM,
            trainer_class=SFTTrainer,
            collator=_token_collator,
            trainer_kwargs=_token_loss,
            needs_reference=_needs_kl_reference,
            describe_loss=_describe_token_loss,
            writes_replies=True,
            heldout_pairs=False,
        ),
        TrainingMode(
            "pretrain",
            head=CAUSAL_LM,
            trainer_class=SFTTrainer,
            collator=_token_collator,
            trainer_kwargs=_token_loss,
            needs_reference=_needs_kl_reference,
            describe_loss=_describe_token_loss,
            writes_replies=False,
            heldout_pairs=False,
        ),
        TrainingMode(
            "reward",
            head=SCORE,
            trainer_class=PreferenceTrainer,
            collator=_pair_collator,
            trainer_kwargs=_pair_loss("reward"),
            needs_reference=_never,
            describe_loss=_describe_reward,
            writes_replies=False,
            heldout_pairs=True,
        ),
        TrainingMode(
            "dpo",
            head=CAUSAL_LM,
            trainer_class=PreferenceTrainer,
            collator=_pair_collator,
            trainer_kwargs=_pair_loss("dpo"),
            needs_reference=_always,
            describe_loss=_describe_dpo,
            writes_replies=False,
            heldout_pairs=True,
        ),
    )
}


def training_mode(run: RunConfig) -> TrainingMode:
    """The mode of `training.objective` (every value `config.schema.OBJECTIVES` allows is registered: a test)."""
    return TRAINING_MODES[run.training.objective]
