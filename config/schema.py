"""Typed configuration: the schema every Hydra composition is checked against.

The dataclasses below are registered with Hydra's ConfigStore as the base of
`conf/config.yaml`, so a misspelled key or a value of the wrong type fails at
composition time, before anything is built, with Hydra naming the full key.
`TrainingConfig` is generated from `transformers.TrainingArguments` itself, so
every Trainer field is settable as `training.<field>=...` under its usual
name and type, and a new transformers release brings its new fields along;
it adds two fields of its own, `training.objective` (`sft`, `pretrain`, `reward` or `dpo`) and
`training.global_batch_size`, which `to_training_arguments` turns into the Trainer's arguments.
`to_run_config` turns the composed config into these dataclasses, which runs
each `__post_init__` value check.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf
from transformers import TrainingArguments

from config.sources import ON_ERROR_CHOICES, PAIRS_FORMAT, TEXT_FORMAT, TEXT_SUFFIXES, SourceSpec, parse_sources

_PRIMITIVES = (bool, int, float, str)


def _schema_type(hint: Any) -> Any:
    """Map a TrainingArguments annotation to one OmegaConf can check (primitives, else Any)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return Optional[_schema_type(members[0])]
        return Any
    if hint in _PRIMITIVES:
        return hint
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return str
    return Any


def _schema_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [v.value if isinstance(v, enum.Enum) else v for v in value]
    return value


# training.objective: sft trains the assistant turns of chat data; pretrain (continued pre-training) trains every
# token of raw text (`format: text` sources, see data_pipeline/text.py); reward trains a scalar score head on
# preference pairs (`format: pairs`), dpo the language model itself on them. Not a TrainingArguments field.
OBJECTIVE_KEY = "objective"
OBJECTIVES = ("sft", "pretrain", "reward", "dpo")
# The source format each objective reads; a source with `format: auto` (or none) takes it. SFT detects its chat
# format per record.
OBJECTIVE_SOURCE_FORMAT = {"sft": None, "pretrain": TEXT_FORMAT, "reward": PAIRS_FORMAT, "dpo": PAIRS_FORMAT}


# training.global_batch_size: samples (packed rows under data.pack_length) per optimizer step over every rank. When
# set, gradient_accumulation_steps follows the world size, so a job requeued onto fewer or more nodes keeps its
# batch, hence its schedule and the data it skips on resume. Not a TrainingArguments field.
GLOBAL_BATCH_KEY = "global_batch_size"


def _check_training(training: Any) -> None:
    _check_choice("training.objective", training.objective, OBJECTIVES)
    if training.global_batch_size is not None and training.global_batch_size < 1:
        raise ValueError(
            f"training.global_batch_size must be a positive number of samples, not {training.global_batch_size}"
        )


def gradient_accumulation_for(global_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """The gradient accumulation steps that make `global_batch_size` on `world_size` ranks.

    Raises:
        ValueError: the global batch is not a multiple of per_device_train_batch_size x ranks.
    """
    per_pass = per_device_batch_size * world_size
    if global_batch_size % per_pass:
        raise ValueError(
            f"training.global_batch_size={global_batch_size} is not a multiple of per_device_train_batch_size "
            f"({per_device_batch_size}) x ranks ({world_size}) = {per_pass}: choose a per-device batch that divides "
            f"global_batch_size / ranks, or a global batch that is a multiple of {per_pass}"
        )
    return global_batch_size // per_pass


def _training_config_class() -> type:
    hints = typing.get_type_hints(TrainingArguments)
    fields = [(OBJECTIVE_KEY, str, field(default="sft")), (GLOBAL_BATCH_KEY, Optional[int], field(default=None))]
    for f in dataclasses.fields(TrainingArguments):
        if not f.init:
            continue
        schema_type = _schema_type(hints[f.name])
        default = _schema_default(f)
        if default is None and schema_type is not Any and typing.get_origin(schema_type) is not typing.Union:
            schema_type = Optional[schema_type]
        if isinstance(default, (list, dict)):
            fields.append((f.name, schema_type, field(default_factory=lambda d=default: type(d)(d))))
        else:
            fields.append((f.name, schema_type, field(default=default)))
    return dataclasses.make_dataclass(
        "TrainingConfig",
        fields,
        namespace={
            "__doc__": "Every `transformers.TrainingArguments` field, typed, `objective` (`OBJECTIVES`) and "
            "`global_batch_size` (`GLOBAL_BATCH_KEY`).",
            "__post_init__": _check_training,
        },
    )


TrainingConfig = _training_config_class()

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# The objectives `dft.objectives` registers (checked equal there by a test): kept here so the config check does not
# import torch.
LOSS_TYPES = ("dft", "ce", "asft", "eaft")
LOSS_IMPLEMENTATIONS = ("fused", "reference")
LOGGER_BACKENDS = ("none", "swanlab", "wandb", "tensorboard")
CONSOLE_LINES = ("short", "full")
TRUNCATIONS = ("keep_start", "keep_end", "drop")
PRETRAIN_BLOCKS = ("packed", "concat")
# How a `.txt` source becomes documents: the `sample_by` values of `datasets.load_dataset("text")`, its default first.
SAMPLE_BY = SAMPLE_BY_LINE, SAMPLE_BY_PARAGRAPH, SAMPLE_BY_DOCUMENT = ("line", "paragraph", "document")
SYSTEM_MESSAGES = ("keep", "merge")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {list(choices)}")


ADAPTERS = ("none", "lora", "qlora")


@dataclass
class LoraConfig:
    """`model.lora.*`: the LoRA adapter of `model.adapter=lora|qlora` (peft's `LoraConfig`)."""

    r: int = 16
    """Rank of each adapter's two matrices."""
    alpha: float = 32.0
    """Scale: the adapter's update is `alpha / r * B @ A`."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (suffixes, as peft matches them) that get an adapter; all-linear: every linear layer but the
    LM head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. a classification head)."""
    train_embeddings: bool = False
    """Train the input embeddings and the LM head in full, saved with the adapter: for tokens added to the
    tokenizer, whose rows are untrained in the base."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r} must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name the layers to adapt, or all-linear")


@dataclass
class ModelConfig:
    name_or_path: str = "embedded:tiny-qwen2"
    """A hub id or local directory, or `embedded:<name>` for a tiny model built and cached locally."""
    tokenizer_name_or_path: Optional[str] = None
    """Defaults to `name_or_path`."""
    dtype: str = "auto"
    """Weights dtype at load: auto (bfloat16 when `training.bf16`, else float32), bfloat16, float16, float32."""
    attn_implementation: str = "auto"
    """auto: flash_attention_2 when the package and a GPU are present, else the model's default (sdpa, or
    eager for architectures sdpa cannot run exactly, such as Gemma 2's attention soft-cap)."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model; off unless you trust its author."""
    cache_dir: str = ".cache/models"
    """Where embedded models are built once and reused."""
    adapter: str = "none"
    """none: full-parameter training; lora: a LoRA adapter on the frozen base (`model.lora.*`, peft); qlora: the
    same on a 4-bit base (bitsandbytes, CUDA only). Adapter runs save the adapter in `output_dir`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    merge_adapter: bool = False
    """After an adapter run, also write the base with the adapter merged into `<output_dir>/merged`, verified
    against the adapter model (modeling/adapter.py)."""

    def __post_init__(self) -> None:
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_choice("model.adapter", self.adapter, ADAPTERS)
        if self.merge_adapter and self.adapter == "none":
            raise ValueError("model.merge_adapter=true needs an adapter run: set model.adapter=lora")


SOURCE_KINDS = {TEXT_FORMAT: "raw text", PAIRS_FORMAT: "preference pairs", "chat": "chat"}
OBJECTIVES_OF_KIND = {
    TEXT_FORMAT: "training.objective=pretrain",
    PAIRS_FORMAT: "training.objective=reward or dpo",
    "chat": "training.objective=sft",
}
SOURCE_KIND_HINTS = {
    TEXT_FORMAT: "Raw text: .txt files or records with a 'text' field (format: text)",
    PAIRS_FORMAT: "Pairs: records with a prompt and 'chosen'/'rejected' replies (format: pairs)",
    "chat": "Chat: ChatML messages, ShareGPT conversations, Alpaca or prompt/completion records",
}


def source_kind(spec: SourceSpec) -> str:
    """`text`, `pairs`, or `chat` for every chat format."""
    return spec.format if spec.format in (TEXT_FORMAT, PAIRS_FORMAT) else "chat"


@dataclass
class DataConfig:
    sources: list[Any] = MISSING
    """Chat sources: each a file, glob or directory (JSONL or JSON array, gzip or not), or a mapping
    `{path, weight, max_samples, format, fields}` (see data_pipeline/sources.py). Records may be ChatML/OpenAI
    `messages`, ShareGPT `conversations`, Alpaca or `prompt`/`completion`, detected per record. With
    `training.objective=pretrain`: raw text, `.txt` files (documents as `sample_by` says) or records with a `text`
    field."""
    max_length: int = 512
    """Tokens per sample at most; longer ones are cut or dropped as `truncation` says (raw text: cut into blocks of
    this many tokens, nothing dropped; see `pretrain_blocks`)."""
    truncation: str = "keep_start"
    """A sample longer than `max_length`: keep_start keeps its first `max_length` tokens (a long prompt can leave no
    answer); keep_end keeps its last ones, so the last assistant turn survives and the prompt is cut from the left;
    drop drops it (counted as longer_than_max_length). A sample left with no trainable token is dropped and counted.
    Preference pairs keep both sequences comparable: one prompt cut for both (keep_start keeps its start, keep_end
    cuts it from the left to leave room for the longer reply, keeping at least half of `max_length` of it), then
    both replies cut at their end to fit; drop drops a pair either of whose sequences is too long, and a pair left
    with an empty reply on either side is dropped and counted (see data_pipeline/pairs.py)."""
    num_proc: int = 2
    """Worker processes for tokenisation."""
    validation_split_percentage: float = 0.0
    """Share of samples held out for `eval_loss`/`eval_nll` (deterministic with `training.seed`)."""
    on_error: str = "raise"
    """A bad record: raise stops with `file:line: problem`; skip drops it and counts it per reason in stats.json."""
    cache_dir: Optional[str] = ".cache/datasets"
    """Prepared datasets, one directory per fingerprint of the inputs (python -m data_pipeline.prepare); null
    prepares in memory at every run."""
    chat_template: Optional[str] = None
    """A Jinja file, or a template the project ships (`chatml`), to render dialogues with instead of the
    tokenizer's own; saved with the model. null: the tokenizer's template, as the model ships it (with or without
    `{% generation %}` markers: see data_pipeline/tokenize.py)."""
    system_message: str = "keep"
    """keep: a system message is rendered as the template renders it (a template without a system role, such as
    Gemma's, then refuses the record with its file:line); merge: it is written at the start of the first user turn,
    a blank line between them."""
    train_reasoning: bool = True
    """Train an assistant turn's reasoning (its thinking block) with its reply; false trains only the reply, what
    follows the closing `</think>` (see data_pipeline/tokenize.py)."""
    pretrain_blocks: str = "packed"
    """Raw text (`training.objective=pretrain`) into samples: packed makes each document (and its end-of-text token)
    a sample, a longer one cut into `max_length` pieces, trained padding-free so no token attends across documents;
    concat joins all documents with the end-of-text token and cuts the stream into `max_length` blocks, as the classic
    `run_clm.py` does (attention crosses documents inside a block; the last, shorter block is kept). See
    data_pipeline/text.py."""
    sample_by: str = SAMPLE_BY_LINE
    """Raw text: how a `.txt` source becomes documents, as `datasets.load_dataset("text", sample_by=...)` reads it:
    line (default) makes each line a document (one article per line, as LLaMA-Factory's wiki_demo.txt); paragraph
    the text between blank lines; document the whole file (a book). Blank rows are counted and left out. Each
    document is closed with the end-of-text token."""
    packing: Optional[bool] = None
    """Padding-free packing: each micro-batch becomes one row, position ids restarting per sample and a
    block-diagonal attention mask, so no token is padding (see data_pipeline/packing.py). null: on for raw text with
    `pretrain_blocks=packed`, off otherwise. Not for preference pairs (refused)."""
    packing_max_tokens: Optional[int] = None
    """With packing: micro-batches of at most this many tokens, filled by best-fit decreasing bin packing (over 98%
    full), instead of `training.per_device_train_batch_size` samples each; at least `data.max_length`. null: off."""

    def __post_init__(self) -> None:
        if len(self.sources) == 0:
            raise ValueError("data.sources is empty: give at least one chat file, e.g. data.sources=[chats.jsonl]")
        # Parsed once per run; a bad entry fails here, naming data.sources[i]. Not a field: not a config key.
        self.specs: list[SourceSpec] = parse_sources(self.sources)
        # Raw text for continued pre-training, preference pairs, or chat data: one run trains one objective
        # (RunConfig checks which).
        self.record_kind = source_kind(self.specs[0])
        self.raw_text = self.record_kind == TEXT_FORMAT
        self.pairs = self.record_kind == PAIRS_FORMAT
        for index, spec in enumerate(self.specs):
            if source_kind(spec) != self.record_kind:
                raise ValueError(
                    f"data.sources[{index}] ({spec.path!r}) is {SOURCE_KINDS[source_kind(spec)]} but data.sources[0] "
                    f"is {SOURCE_KINDS[self.record_kind]}: continued pre-training (raw text), SFT (chat) and "
                    "preference training (pairs) are separate runs; give one kind of source"
                )
        _check_choice("data.pretrain_blocks", self.pretrain_blocks, PRETRAIN_BLOCKS)
        _check_choice("data.sample_by", self.sample_by, SAMPLE_BY)
        # What `packing` resolves to; the field keeps what the user set (null included).
        self.padding_free = (
            self.packing if self.packing is not None else self.raw_text and self.pretrain_blocks == "packed"
        )
        if self.pairs and self.packing:
            raise ValueError(
                "data.packing=true with preference pairs: a pair's chosen and rejected sequences are padded side by "
                "side (data_pipeline/pairs.py), not packed; set data.packing=false (or null)"
            )
        if self.packing_max_tokens is not None:
            if not self.padding_free:
                raise ValueError("data.packing_max_tokens is set but data.packing=false: set data.packing=true")
            if self.packing_max_tokens < self.max_length:
                raise ValueError(
                    f"data.packing_max_tokens={self.packing_max_tokens} is below data.max_length={self.max_length}: "
                    "a sample of max_length tokens would fit no micro-batch; raise it to at least data.max_length"
                )
        _check_choice("data.on_error", self.on_error, ON_ERROR_CHOICES)
        _check_choice("data.truncation", self.truncation, TRUNCATIONS)
        _check_choice("data.system_message", self.system_message, SYSTEM_MESSAGES)
        if self.max_length < 8:
            raise ValueError(f"data.max_length={self.max_length} is too small (at least 8 tokens)")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc} must be >= 1")
        if not 0.0 <= self.validation_split_percentage < 100.0:
            raise ValueError(f"data.validation_split_percentage={self.validation_split_percentage} must be in [0, 100)")


@dataclass
class LossConfig:
    type: str = "dft"
    """The objective (`dft.objectives`): dft, CE weighted by alpha * p_correct.detach() + (1 - alpha); ce, plain
    cross-entropy; asft, DFT plus `kl_coef` x KL(starting model || policy); eaft, CE weighted by the model's
    normalised top-k entropy."""
    alpha: Optional[float] = None
    """DFT's weight of the probability term, for dft and asft: 1 is the paper's DFT, 0 is cross-entropy. null takes
    the objective's own default (`dft.objectives.resolve_alpha`): 0.5 for dft, the best held-out exact match of
    every verdict README quotes (alpha 1 was the weakest arm on both tasks and collapsed on a released model), and
    1 for asft, the paper's (DFT plus the KL anchor)."""
    kl_coef: float = 0.1
    """asft: weight of the per-token KL(reference || policy) to the frozen starting model (LLaMA-Factory's
    `asft_alpha`, default 0.1)."""
    eaft_top_k: int = 20
    """eaft: how many of the largest logits the entropy is computed over (LLaMA-Factory's 20)."""
    eaft_exponent: float = 1.0
    """eaft: the weight is the normalised top-k entropy to this power (LLaMA-Factory's `eaft_alpha`, 1)."""
    implementation: str = "fused"
    """fused: chunked loss from the hidden states, the `[tokens, vocab]` logits are never built (works under
    ZeRO-3); reference: the model's full logits, then the same objective (`dft.loss.objective_loss`)."""
    alpha_warmup_steps: int = 0
    """Optimizer steps over which alpha rises linearly from 0 to `loss.alpha`; 0 keeps it constant."""
    chunk_size: Any = "auto"
    """Trainable tokens per chunk of logits in the fused loss (its extra memory is one `[chunk, vocab]` float32
    block), or `auto`: sized from the batch's shapes by `dft.loss.auto_chunk_size` (the block no larger than the
    batch's hidden states, at least 256 tokens). Typed `Any` because OmegaConf has no `int | str` field."""

    def __post_init__(self) -> None:
        _check_choice("loss.type", self.type, LOSS_TYPES)
        _check_choice("loss.implementation", self.implementation, LOSS_IMPLEMENTATIONS)
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha={self.alpha} must be in [0, 1]")
        if self.kl_coef < 0 or (self.type == "asft" and self.kl_coef == 0):
            raise ValueError(
                f"loss.kl_coef={self.kl_coef} must be >= 0, and above 0 for loss.type=asft (0 is plain dft)"
            )
        if self.eaft_top_k < 2:
            raise ValueError(f"loss.eaft_top_k={self.eaft_top_k} must be >= 2: an entropy over one logit is 0")
        if self.eaft_exponent < 0:
            raise ValueError(f"loss.eaft_exponent={self.eaft_exponent} must be >= 0")
        if self.alpha_warmup_steps < 0:
            raise ValueError(f"loss.alpha_warmup_steps={self.alpha_warmup_steps} must be >= 0 (0: constant alpha)")
        chunk_is_count = isinstance(self.chunk_size, int) and not isinstance(self.chunk_size, bool)
        if self.chunk_size != "auto" and not (chunk_is_count and self.chunk_size >= 1):
            raise ValueError(f"loss.chunk_size={self.chunk_size!r} must be auto or a whole number of tokens >= 1")


@dataclass
class PreferenceConfig:
    """`preference.*`: training on chosen/rejected pairs, `training.objective=reward` (a scalar score head) or `dpo`
    (the language model against a frozen reference). See preference/."""

    margin: float = 0.0
    """reward: the pairwise loss is -log sigmoid(r_chosen - r_rejected - margin); 0 is the Bradley-Terry loss."""
    center_rewards_coefficient: Optional[float] = None
    """reward: adds this x mean((r_chosen + r_rejected)^2), which keeps the rewards centred on 0 (TRL's
    `center_rewards_coefficient`, 0.01 in its docs); null: off."""
    beta: float = 0.1
    """dpo: the temperature of the implicit reward beta * (log pi - log pi_ref); TRL's default 0.1."""
    precompute_reference: bool = False
    """dpo, full fine-tune: compute the frozen reference's log-probabilities of every training and evaluation pair
    once before the first step (one pass, the ranks sharing it), then free the reference, so training holds one
    model, not two (TRL's `precompute_ref_log_probs`). An adapter run has no second copy to free (its reference is
    the base with the adapter off) and refuses it."""

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"preference.margin={self.margin} must be >= 0")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"preference.center_rewards_coefficient={self.center_rewards_coefficient} must be >= 0")
        if self.beta <= 0:
            raise ValueError(f"preference.beta={self.beta} must be > 0")


@dataclass
class DeepSpeedConfig:
    config: Optional[str] = None
    """Path of a DeepSpeed JSON under ds_config/, or null for a plain (DDP or single-process) run."""


@dataclass
class LoggerConfig:
    backend: str = "none"
    """none, swanlab, wandb or tensorboard; only rank 0 starts a tracker."""
    project: str = "dft-sft"
    run_name: Optional[str] = None
    """Defaults to the output directory's name."""
    mode: str = "offline"
    """Tracker mode: online, offline (or local for SwanLab)."""
    tags: list[str] = field(default_factory=list)
    console: str = "short"
    """The step line on the console and in the log: short (step, loss, nll, avg_p_correct, learning rate, grad norm,
    tokens/s, elapsed time, ETA) or full (every logged value: per source, per device, ...). metrics.jsonl and the
    trackers always get everything."""

    def __post_init__(self) -> None:
        _check_choice("logger.backend", self.backend, LOGGER_BACKENDS)
        _check_choice("logger.console", self.console, CONSOLE_LINES)


@dataclass
class HeldoutConfig:
    file: Optional[str] = None
    """ChatML JSONL whose dialogues end with the reference reply; null skips the before/after table."""
    max_samples: int = 60
    max_new_tokens: int = 16
    batch_size: int = 16
    """Prompts generated (and scored) together, left-padded: the same tokens as one at a time, several times
    faster (docs/benchmarks.md)."""
    show: int = 8
    """Rows of generations printed in the before/after table."""
    results_file: Optional[str] = None
    """Also write the before/after numbers to this JSON file, with the run's provenance (date, commit, command,
    load) and wall time: how the figures README quotes are recorded (docs/results/)."""


SIGNAL_NAMES = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")


@dataclass
class ResilienceConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals that preempt the run: every rank stops at the next step boundary, a checkpoint is saved and the
    process exits with status 75 (see cluster/resilience.py). Slurm sends SIGUSR1 ahead of the time limit
    (launch/slurm.sbatch) and SIGTERM on preemption or scancel."""
    max_consecutive_nonfinite: int = 5
    """Optimizer steps in a row skipped for a non-finite loss or gradient before the run stops with a checkpoint."""
    inject_nonfinite_at_steps: list[int] = field(default_factory=list)
    """Testing aid: optimizer steps (1-based) whose loss is made NaN, to exercise the skip."""
    inject_nonfinite_on_ranks: list[int] = field(default_factory=list)
    """Testing aid: the ranks that inject; empty: every rank."""

    def __post_init__(self) -> None:
        for name in self.signals:
            _check_choice("resilience.signals[]", name, SIGNAL_NAMES)
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"resilience.max_consecutive_nonfinite={self.max_consecutive_nonfinite} must be >= 1")


DRIFT_GUARD_ACTIONS = ("off", "warn", "stop")


@dataclass
class DriftGuardConfig:
    """`drift_guard.*`: the watch for an objective that keeps falling while the plain cross-entropy of the same tokens
    rises far above its best, as DFT collapses (observability/drift_guard.py, which states the rule and its why)."""

    action: str = "warn"
    """off: no check; warn: log a warning once (rank 0) and write `<output_dir>/drift_guard.json`; stop: the same,
    and the run stops there, saving the model as at that step (exit status 0)."""
    patience: int = 2
    """Consecutive logging events of one kind (training logs, evaluations: counted apart) that must show the drift
    before the guard acts."""
    warmup_logs: int = 2
    """The first logging events of each kind that are not checked (a noisy start); they still set the best nll. The
    first event is always the best so far, so 1 checks from the second."""
    min_rise: float = 0.5
    """Nats: the nll must be more than this above its best so far (the floor of the margin, for a low best nll)."""
    relative_rise: float = 0.5
    """Share of the best nll: it must also be more than this above its best (the margin at a high best nll)."""

    def __post_init__(self) -> None:
        _check_choice("drift_guard.action", self.action, DRIFT_GUARD_ACTIONS)
        if self.patience < 1:
            raise ValueError(f"drift_guard.patience={self.patience} must be >= 1")
        if self.warmup_logs < 0:
            raise ValueError(f"drift_guard.warmup_logs={self.warmup_logs} must be >= 0")
        if self.min_rise <= 0:
            raise ValueError(
                f"drift_guard.min_rise={self.min_rise} must be > 0 nats: the floor keeps interval-to-interval noise, "
                "and loss.type=ce's small gap between loss and nll, from reading as drift"
            )
        if self.relative_rise < 0:
            raise ValueError(f"drift_guard.relative_rise={self.relative_rise} must be >= 0")


@dataclass
class RunConfig:
    output_dir: str = "outputs/demo"
    """One directory for every rank (no per-rank timestamps): model, config, metrics, logs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    drift_guard: DriftGuardConfig = field(default_factory=DriftGuardConfig)

    def __post_init__(self) -> None:
        objective = self.training.objective
        wanted = OBJECTIVE_SOURCE_FORMAT[objective] or "chat"
        have = self.data.record_kind
        if have != wanted:
            spec = self.data.specs[0]
            raise ValueError(
                f"training.objective={objective} trains on {SOURCE_KINDS[wanted]}, but data.sources[0] "
                f"({spec.path!r}) is {SOURCE_KINDS[have]} (format {spec.format}): {SOURCE_KINDS[have]} takes "
                f"{OBJECTIVES_OF_KIND[have]}. {SOURCE_KIND_HINTS[wanted]}"
            )
        if self.preference.precompute_reference and (objective != "dpo" or self.model.adapter != "none"):
            raise ValueError(
                "preference.precompute_reference=true is for training.objective=dpo with model.adapter=none: it "
                "frees the reference copy of a full fine-tune; "
                + (
                    f"training.objective={objective} has no reference"
                    if objective != "dpo"
                    else f"a model.adapter={self.model.adapter} run's reference is its base with the adapter off, "
                    "no copy"
                )
            )
        if self.training.label_smoothing_factor > 0:
            raise ValueError(
                f"training.label_smoothing_factor={self.training.label_smoothing_factor}: every loss.type computes "
                "each token's loss itself (dft/objectives.py, on the fused head too), and none smooths labels; "
                "set it to 0"
            )


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_run_config(overrides: list[str]) -> RunConfig:
    """Compose `conf/config.yaml` with `train.py`'s overrides into the typed `RunConfig`, outside `@hydra.main`
    (the `prepare`, `inspect` and `check` commands)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_run_config(compose(config_name="config", overrides=overrides), overrides)


def to_run_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> RunConfig:
    """Resolve interpolations and build the typed dataclasses (runs every `__post_init__` check).

    Args:
        cfg: the composed config.
        overrides: the command line's overrides, to tell which of `output_dir` and `training.output_dir` the user set.
    """
    _reject_unknown_keys(cfg, RunConfig, prefix="")
    _one_output_dir(cfg, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(
            f"missing mandatory config values: {missing} (set them on the command line, e.g. {missing[0]}=...)"
        )
    _objective_source_format(cfg)
    if cfg.training.get("hub_token"):
        raise ValueError(
            "training.hub_token: set the HF_TOKEN environment variable instead; a token in the config "
            "would be saved in config.yaml, training_args.bin and the tracker's run config"
        )
    return OmegaConf.to_object(cfg)


def _objective_source_format(cfg: DictConfig) -> None:
    """A source without a format reads as its objective's (`OBJECTIVE_SOURCE_FORMAT`): under
    `training.objective=pretrain` raw text (`format: text`), so a JSONL of `{"text": ...}` records needs no mapping;
    under reward and dpo preference pairs (`format: pairs`). Written into the composed config, so the saved
    config.yaml says so."""
    record_format = OBJECTIVE_SOURCE_FORMAT.get(cfg.training.get(OBJECTIVE_KEY))
    if record_format is None:
        return
    sources = []
    for entry in cfg.data.sources:
        if isinstance(entry, DictConfig):
            entry = OmegaConf.to_container(entry, resolve=True)
        elif isinstance(entry, str):
            entry = {"path": entry}
        # A .txt file is raw text whatever the objective (parse_sources), and refused as such where text is not wanted.
        if isinstance(entry, dict) and entry.get("format") in (None, "auto") and not _is_text_path(entry.get("path")):
            entry = {**entry, "format": record_format}
        sources.append(entry)  # anything else is refused by parse_sources, naming data.sources[i]
    cfg.data.sources = sources


def _is_text_path(path: Any) -> bool:
    return isinstance(path, str) and path.endswith(TEXT_SUFFIXES)


def _one_output_dir(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """`output_dir` is the run's one directory and `training.output_dir` follows it (`${output_dir}` in the presets).
    An HF user's `training.output_dir=X` alone moves the run there; set to another directory than an explicit
    `output_dir`, it is refused: a run never writes into two places."""
    training_dir = cfg.training.get("output_dir")
    if training_dir is None or training_dir == cfg.output_dir:
        return
    if any(override.lstrip("+~").split("=", 1)[0] == "output_dir" for override in overrides):
        raise ValueError(
            f"output_dir={cfg.output_dir} and training.output_dir={training_dir} name two directories; a run writes "
            "one: set output_dir alone (training.output_dir follows it)"
        )
    cfg.output_dir = training_dir
    cfg.training.output_dir = "${output_dir}"


def inert_training_settings(training: TrainingConfig) -> list[str]:
    """The `training.*` values that do nothing with the rest of the config: a user set them expecting an effect."""
    defaults = TrainingConfig()
    inert = []
    if training.save_strategy == "no":
        inert += [
            f"training.{key}={_plain(getattr(training, key))} does nothing with training.save_strategy=no "
            "(set training.save_strategy=steps to save checkpoints)"
            for key in ("save_steps", "save_total_limit")
            if getattr(training, key) != getattr(defaults, key)
        ]
    if training.eval_strategy == "no" and training.eval_steps != defaults.eval_steps:
        inert.append(
            f"training.eval_steps={_plain(training.eval_steps)} does nothing with training.eval_strategy=no "
            "(set training.eval_strategy=steps to evaluate)"
        )
    return inert


def start_up_warnings(run: RunConfig) -> list[str]:
    """What rank 0 warns about at start-up: the inert `training.*` values, and settings that run but rarely do
    what the user wants."""
    warnings = inert_training_settings(run.training)
    if OBJECTIVE_SOURCE_FORMAT[run.training.objective] == PAIRS_FORMAT:
        defaults = LossConfig()
        warnings += [
            f"loss.{key}={_plain(getattr(run.loss, key))} does nothing with training.objective="
            f"{run.training.objective}: its pairwise loss is set by preference.* (the fused head serves DPO)"
            for key in ("type", "alpha", "kl_coef", "implementation")
            if getattr(run.loss, key) != getattr(defaults, key)
        ]
    if run.training.objective == "pretrain" and run.loss.type == "dft":
        warnings.append(
            "training.objective=pretrain with loss.type=dft: DFT scales each token's loss by the model's own "
            "probability of it, so the tokens it does not know yet, the new domain's, learn least; continued "
            "pre-training normally uses loss.type=ce (conf/experiment/pretrain_demo.yaml does)"
        )
    return warnings


def _plain(value: Any) -> Any:
    # TrainingArguments types step counts as float (a share of the run below 1): show a whole number as typed.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    # Hydra's `+key=value` opens the struct flag, so OmegaConf would accept a misspelled key there.
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            raise ValueError(f"unknown config key '{prefix}{key}'{did_you_mean(f'{prefix}{key}')}")
        child_schema = hints[key]
        if dataclasses.is_dataclass(child_schema) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], child_schema, prefix=f"{prefix}{key}.")


def did_you_mean(key: str) -> str:
    """` (did you mean 'a.b'?)` with the schema's closest key to a misspelled dotted `key`, or the valid keys at its
    level when none is close."""
    *parents, name = key.split(".")
    schema: Any = RunConfig
    for parent in parents:
        fields = {f.name: f for f in dataclasses.fields(schema)}
        child = typing.get_type_hints(schema).get(parent) if parent in fields else None
        if child is None or not dataclasses.is_dataclass(child):
            return ""
        schema = child
    known = sorted(f.name for f in dataclasses.fields(schema))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{'.'.join([*parents, close[0]])}'?)"
    return f" (valid keys under '{'.'.join(parents) or '<root>'}': {known})"


def to_training_arguments(training: TrainingConfig, world_size: int = 1) -> TrainingArguments:
    """`training.*` as the Trainer's arguments, with the values a launch decides: the gradient accumulation that
    makes `training.global_batch_size` on `world_size` ranks (when set), CPU-only training where there is no GPU,
    and no tqdm bar where stdout is not a terminal (unless `training.disable_tqdm` is set)."""
    kwargs = dataclasses.asdict(training)
    del kwargs[OBJECTIVE_KEY]  # ours, not the Trainer's
    if (global_batch_size := kwargs.pop(GLOBAL_BATCH_KEY)) is not None:
        kwargs["gradient_accumulation_steps"] = gradient_accumulation_for(
            global_batch_size, training.per_device_train_batch_size, world_size
        )
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # the Trainer refuses bf16 on a GPU-less machine otherwise
    if kwargs["disable_tqdm"] is None and not sys.stdout.isatty():
        kwargs["disable_tqdm"] = True  # nohup/Slurm logs: plain lines that `tail -f` can read
    return TrainingArguments(**kwargs)
