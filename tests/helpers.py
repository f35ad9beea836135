"""What several tests share, in one module: paths and run configs, tiny models, training arguments, the trainers
the tests compose, loss inputs, data files, released chat templates and LLaMA-Factory's data (from PyPI sdists),
the runners of `train.py` and the launch scripts with the checks of what they leave behind, and cluster nodes made of
network namespaces (`netns_nodes`) with a runner of one launcher per node.

Test modules import from here only (never from another test module, nor from a conftest, which holds fixtures);
the scripts the tests start in subprocesses (`tests/data_pipeline/token_budget_ranks.py`,
`tests/dft/zero3_fused_loss_check.py`) do too.

Every launch test runs a script of `launch/` as a user would, from the repo root, with the interpreter running
pytest (`PYTHON`) and a free rendezvous port (`launch_environment`). On a failure or a timeout the message carries
the tail of the launcher's output and of every rank's log (`describe_run`), so the CI log says which rank failed
and why. Runs that are compared with each other use one configuration, `COMPARABLE_RUN`.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import itertools
import json
import logging
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2ForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2ForCausalLM,
    TrainingArguments,
)

import cluster.atomic_save
from cluster.manifest import MANIFEST_FILE, TRAINER_STATE_FILE, build_manifest
from cluster.resilience import NONFINITE_LOG, ResilienceCallback
from config.schema import DataConfig, LossConfig, load_run_config, to_training_arguments
from core.files import build_once
from core.keys import IGNORE_INDEX
from data_pipeline.loader import TokenBudgetLoaderMixin
from data_pipeline.templates import load_chat_tokenizer
from dft.trainer import DFTTrainer
from embedded.families import FamilySize, family_model
from embedded.paths import REPO_ROOT, SAMPLE_DIR
from embedded.paths import TOKENIZER_DIR as TOKENIZER_DIR
from modeling.loading import resolve_model_path
from observability.artifacts import METRICS_FILE, read_metrics
from observability.training_metrics import RankMetricsMixin

# --- Paths and run configurations -------------------------------------------------------------------------------

CONF_DIR = REPO_ROOT / "conf"
LAUNCH_DIR = REPO_ROOT / "launch"
# conf/data/sample.yaml's two files.
SAMPLE_SOURCES = [str(SAMPLE_DIR / "chat_letters.jsonl"), str(SAMPLE_DIR / "reverse_alpaca.json")]
TAIL_LINES = 40
DISTRIBUTED_TIMEOUT_S = 240

# 8 steps, a checkpoint every 4 and a loss logged at each: small enough for CPU ranks, long enough to resume.
COMPARABLE_RUN = (
    "debug=quick",
    "training.max_steps=8",
    "training.save_strategy=steps",
    "training.save_steps=4",
    "training.logging_steps=1",
    "training.eval_strategy=no",
)
NO_HELDOUT = "heldout.file=null"  # rank 0's generations before and after: no effect on training, seconds of time
RESUME_STEP, LAST_STEP = 4, 8
GLOBAL_BATCH = 64  # 2 ranks x the tiny_cpu default of 32: what zero3_deepspeed_run and one_rank_zero3_run train with
# A checkpoint after every step, so the weights before and after a skipped one can be compared.
EVERY_STEP = (
    "debug=quick",
    "training.save_strategy=steps",
    "training.save_steps=1",
    "training.logging_steps=1",
    "training.eval_strategy=no",
)


# The model-family matrix (tests/modeling): 16 samples, so each optimizer step is one epoch of them and the
# logged loss and avg p(correct) of step k are the model's after k - 1 updates on the same set: a training curve.
FAMILY_MATRIX_SAMPLES = (
    f"data.sources=[{{path:{SAMPLE_SOURCES[0]},max_samples:12}},{{path:{SAMPLE_SOURCES[1]},max_samples:4}}]",
    "data.validation_split_percentage=0",
)
FAMILY_MATRIX_STEPS = 12
FAMILY_MATRIX_RUN = (
    *FAMILY_MATRIX_SAMPLES,
    f"training.max_steps={FAMILY_MATRIX_STEPS}",
    "training.logging_steps=1",
    "training.eval_strategy=no",
    "training.eval_on_start=false",
    "training.save_strategy=no",
    "training.warmup_steps=2",
    "training.lr_scheduler_type=constant_with_warmup",
    "training.learning_rate=5e-4",
    "training.per_device_train_batch_size=4",
    "heldout.file=null",
)
# What users run on a GPU node: ZeRO-3, activation checkpointing, bf16 weights and compute, the fused loss head;
# on 2 ranks with 2 accumulated micro-batches each.
FAMILY_MATRIX_RECIPE = (
    "deepspeed=zero3",
    "training.bf16=true",
    "training.activation_checkpointing=true",
    "training.gradient_accumulation_steps=2",
    "loss.implementation=fused",
)
# Its reference: one process, fp32, no checkpointing, the full-logits loss, the same 16 samples per step
# (4 micro-batches of 4: rank r of 2 draws micro-batches r, r + 2 of the same shuffled order).
FAMILY_MATRIX_REFERENCE = (
    "deepspeed=none",
    "training.bf16=false",
    "model.dtype=float32",
    "training.activation_checkpointing=false",
    "training.gradient_accumulation_steps=4",
    "loss.implementation=reference",
)


# A LoRA run of the family matrix's 16 samples, 12 steps (tests/modeling/test_lora*.py).
LORA_RUN = (
    *FAMILY_MATRIX_RUN,
    NO_HELDOUT,
    "model.adapter=lora",
    "model.lora.r=8",
    "training.gradient_accumulation_steps=4",  # 4 micro-batches of 4: every step trains on all 16 samples
    "training.learning_rate=3e-3",  # 6x the full fine-tune rate (adapters take more); 12 steps move the loss ~16%
    "training.activation_checkpointing=true",
    "loss.type=dft",
    "loss.implementation=fused",
)


# What tests/modeling/lora_zero3_check.py writes in its run directory: the frozen weights it compared.
LORA_FROZEN_REPORT = "frozen_check.json"


def fine_tune_in_process(overrides: list[str]) -> Any:
    """train.py's own `fine_tune` (data -> model -> train -> save -> verified export) for `overrides`, in this
    process: no held-out reports, no process-group start or teardown (a caller under a launcher starts it).
    Returns its `FineTuned` (result, validation set, trained model)."""
    import train  # here: importing train.py registers its configs and pulls in Hydra and DeepSpeed

    run = load_run_config(overrides)
    model_path = resolve_model_path(run.model)
    tokenizer = load_chat_tokenizer(run, model_path)
    training_args = to_training_arguments(run.training)
    return train.fine_tune(run, {}, model_path, tokenizer, training_args, ResilienceCallback(run.resilience), None)


def family_matrix_overrides(family: str, model_cache: str | Path, output_dir: Path, distributed: bool) -> list[str]:
    """train.py overrides of one family's run in the model-family matrix (`embedded:tiny-<family>`)."""
    recipe = FAMILY_MATRIX_RECIPE if distributed else FAMILY_MATRIX_REFERENCE
    return [
        *FAMILY_MATRIX_RUN,
        *recipe,
        f"model.name_or_path=embedded:tiny-{family}",
        f"model.cache_dir={model_cache}",
        f"output_dir={output_dir}",
    ]


def data_config(sources: list[Any], **overrides: Any) -> DataConfig:
    """`data.*` as the schema checks it, prepared in memory unless `cache_dir` is given."""
    return DataConfig(sources=sources, **{"cache_dir": None, **overrides})


# --- Tiny models and trainers -----------------------------------------------------------------------------------

VOCAB = 300


# The tests' tiny models: the family builders of embedded/families.py at a size where a float64 reference is cheap.
TINY_SIZE = FamilySize(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=64)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised 2-layer Qwen2 with tied embeddings (the lm_head weight is the embedding)."""
    return family_model("qwen2", TINY_SIZE, seed, attn_implementation="sdpa")


def tiny_gemma2(seed: int = 0) -> Gemma2ForCausalLM:
    """A randomly initialised 2-layer Gemma 2 with a final logit soft-cap of 2 (30 in the release): small, so
    the cap changes the loss visibly at this size."""
    return family_model("gemma2", TINY_SIZE, seed, final_logit_softcapping=2.0)


def training_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """`TrainingArguments` for a test: on CPU, nothing saved, reported or drawn as a progress bar, unless overridden."""
    defaults = {"use_cpu": True, "report_to": "none", "save_strategy": "no", "disable_tqdm": True}
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})


class PackedTrainer(TokenBudgetLoaderMixin, DFTTrainer):
    """The DFT Trainer with token-budget micro-batches (`train_batch_sampler=`), as train.py's Trainer has them."""


class RankMetricsTrainer(RankMetricsMixin, DFTTrainer):
    """The DFT Trainer that also writes each rank's interval sums to `logs/rank<N>_metrics.jsonl`."""


def make_trainer(model: torch.nn.Module, output_dir: Path, **loss: Any) -> DFTTrainer:
    """A `DFTTrainer` for calling `compute_loss` directly; `loss` holds `LossConfig` fields."""
    trainer = DFTTrainer(model=model, args=training_args(output_dir), loss=LossConfig(**loss))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests do not run
    return trainer


def loss_and_grads(
    trainer: DFTTrainer, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One training-mode `compute_loss` and its backward: the loss and every parameter's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


# The samples of tests/data_pipeline/token_budget_ranks.py, which the test reads back.
TOKEN_BUDGET_EPOCHS = 2


def token_budget_samples(count: int, max_length: int) -> list[dict[str, list[int]]]:
    """Samples of random lengths whose first token is their index, so a packed row says which samples it holds."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for index in range(count):
        length = int(torch.randint(4, max_length + 1, (), generator=generator))
        input_ids = [index] + [1] * (length - 1)
        out.append({"input_ids": input_ids, "labels": input_ids})
    return out


# --- Loss inputs ------------------------------------------------------------------------------------------------

# The LM head of the loss-function tests: small, with a vocabulary no chunk size divides.
LOSS_HIDDEN, LOSS_VOCAB = 16, 37


def random_inputs(seed: int, batch: int = 3, seq: int = 9, ignore_share: float = 0.3, scale: float = 0.6):
    """Hidden states, an LM-head weight and bias, and labels with a share of ignored positions."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, LOSS_HIDDEN, generator=generator)
    weight = torch.randn(LOSS_VOCAB, LOSS_HIDDEN, generator=generator) * scale
    bias = torch.randn(LOSS_VOCAB, generator=generator)
    labels = torch.randint(0, LOSS_VOCAB, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignore_share] = IGNORE_INDEX
    return hidden, weight, bias, labels


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def num_valid(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# --- Data files -------------------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def write_chats(path: Path, count: int) -> Path:
    """A JSONL file of `count` copies of one short ChatML dialogue."""
    path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(count)))
    return path


# A Qwen2.5-style layout: tool schemas in the system turn, tool calls as JSON inside the reply, tool results as
# user turns.
QWEN_STYLE_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{%- generation %}"
    "{{- message['content'] }}"
    "{%- for call in message.get('tool_calls', []) %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{- call['function']['arguments'] | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
)


def write_mixed_corpus(directory: Path) -> None:
    """Every supported format in one directory: Alpaca and prompt/completion in a JSON array, ChatML with tools,
    text parts and extra columns, ShareGPT with untrained turns and function calls, and a gzipped JSONL."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    array = [
        {"instruction": "Reverse.", "input": "a b", "output": "b a", "system": "Be terse.", "history": [["Hi", "Yo"]]},
        {"prompt": "2+2?", "completion": "4", "id": 1},
        {"instruction": "Say ok.", "output": "ok", "meta": {"lang": "en"}},
    ]
    (directory / "alpaca_and_pc.json").write_text(json.dumps(array, indent=1))
    lines = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "score": 3},
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
                {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "value": "two"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "joined"}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "1+2?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "3", "tool_call_id": "c1"},
                {"role": "assistant", "content": "3"},
            ],
            "tools": tools,
        },
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "not trained", "loss": 0},
                {"from": "human", "value": "1+2?"},
                {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1}})},
                {"from": "observation", "value": "3"},
                {"from": "gpt", "value": "trained"},
            ],
            "tools": json.dumps(tools),
        },
    ]
    (directory / "chats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (directory / "more.jsonl.gz").write_bytes(gzip.compress((json.dumps(lines[0]) + "\n").encode()))


# --- Released chat templates and LLaMA-Factory's data --------------------------------------------------------------
# From package sdists on PyPI, nothing from a model hub. The templates are the models' own, from their
# tokenizer_config.json files, as llama.cpp keeps them for its tests (`models/templates/`), vendored in the
# llama-cpp-python sdist; LLaMA-Factory's sdist ships its `data/` folder. Each sdist is downloaded once with pip (no
# build, no dependencies) and its files kept under `.cache/`, one folder per pinned version, so a newer pin is fetched
# (and its new templates picked up) on its own. A template goes on the embedded byte-level tokenizer with its markup
# as tokens (`template_tokenizer`): the `<|...|>`, `<｜...｜>`, `[INST]`-like and `<tag>` literals it writes become
# special tokens, as role headers and end-of-turn markers are in the real vocabularies, with the family's BOS and EOS.

TEMPLATES_SDIST, TEMPLATES_IN_SDIST = "llama-cpp-python==0.3.36", "/vendor/llama.cpp/models/templates/"
LLAMAFACTORY_SDIST, LLAMAFACTORY_DATA, _JSON = "llamafactory==0.9.5", "/data/", (".json", ".jsonl")
RELEASED_CACHE = REPO_ROOT / ".cache" / "released_templates"

# Quoted markup a template writes: `<|im_end|>`, `<｜User｜>`, `[INST]`, `<|turn>`, `<start_of_turn>`, `</think>`.
_MARKUP = re.compile(
    r"<\|[^|<>'\" ]{1,40}\|>|<｜[^｜]{1,40}｜>|\[/?[A-Z][A-Z_]{1,30}\]|<\|[a-z_]{2,30}>|<[a-z_]{2,30}\|>"
    r"|</?[A-Za-z][A-Za-z_0-9]{1,30}>"
)
# Tokens a template defines for itself (`{%- set eos_token = '<seed:eos>' %}`).
_SET_TOKEN = re.compile(r"set\s+\w*_token\s*=\s*['\"]([^'\"]+)['\"]")
# (part of the template's name, BOS, EOS) of the families whose BOS or EOS is not the embedded tokenizer's.
_FAMILY_BOS_EOS = (
    ("gpt-oss", "<|startoftext|>", "<|return|>"),
    ("Hermes", "<|begin_of_text|>", "<|im_end|>"),
    ("lama-3", "<|begin_of_text|>", "<|eot_id|>"),
    ("functionary", "<|begin_of_text|>", "<|eot_id|>"),
    ("istral", "<s>", "</s>"),
    ("Devstral", "<s>", "</s>"),
    ("Apriel", "<s>", "</s>"),
    ("gemma", "<bos>", "<eos>"),
    ("eepSeek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("deepseek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("Phi-3.5", "<s>", "<|endoftext|>"),
    ("MiniMax", "]~!b[", "[e~["),
    ("ohere", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    ("granite", None, "<|end_of_text|>"),
)


def sdist_files(spec: str, keep: Callable[[str], bool]) -> Path:
    """The folder holding the files of the PyPI sdist `spec` whose member names `keep` selects, fetched once."""

    def fetch(directory: Path) -> None:
        command = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--no-binary", ":all:", "--quiet"]
        result = subprocess.run([*command, "-d", str(directory)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"could not download the {spec} sdist from the package index:\n{result.stderr}"
        (sdist,) = directory.glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            for member in archive:
                if member.isfile() and keep(member.name):
                    (directory / Path(member.name).name).write_bytes(archive.extractfile(member).read())
        sdist.unlink()

    directory = RELEASED_CACHE / spec.replace("==", "-")
    build_once(directory, fetch)
    return directory


def template_collection() -> dict[str, str]:
    """Every template of the pinned collection: file name (without `.jinja`) -> Jinja text."""
    directory = sdist_files(TEMPLATES_SDIST, lambda name: TEMPLATES_IN_SDIST in name and name.endswith(".jinja"))
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(directory.glob("*.jinja"))}


def llamafactory_data(*names: str) -> list[Path]:
    """Files of LLaMA-Factory's `data/` folder, as its sdist ships them (its JSON and JSONL files are kept)."""
    directory = sdist_files(LLAMAFACTORY_SDIST, lambda name: LLAMAFACTORY_DATA in name and name.endswith(_JSON))
    paths = [directory / name for name in names]
    assert all(path.is_file() for path in paths), f"{LLAMAFACTORY_SDIST} ships no {names} in {LLAMAFACTORY_DATA}"
    return paths


def template_tokenizer(name: str, template: str | dict[str, str]) -> PreTrainedTokenizerBase:
    """The embedded tokenizer with `template` (or several named ones), its markup as special tokens and the BOS and
    EOS of the family `name` belongs to."""
    texts = list(template.values()) if isinstance(template, dict) else [template]
    markup = sorted({token for text in texts for token in (*_MARKUP.findall(text), *_SET_TOKEN.findall(text))})
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    special: dict = {"additional_special_tokens": markup}
    for part, bos, eos in _FAMILY_BOS_EOS:
        if part in name:
            special |= {"eos_token": eos} | ({"bos_token": bos} if bos else {})
            break
    tokenizer.add_special_tokens(special)
    tokenizer.chat_template = template
    return tokenizer


# The dialogues every released template is run on (test_template_collection.py) and the tests of single
# templates take theirs from.
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _weather_call(city: str, number: int) -> dict[str, Any]:
    # Nine alphanumeric characters: the ids Mistral's templates require.
    return {
        "type": "function",
        "id": f"call{number:05d}",
        "function": {"name": "get_weather", "arguments": {"city": city}},
    }


def _weather_result(content: str, number: int) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": f"call{number:05d}", "name": "get_weather", "content": content}


_FIRST_QUESTION, _SECOND_QUESTION = (
    {"role": "user", "content": "Name a prime number."},
    {"role": "user", "content": "And an even one?"},
)
_FIRST_REPLY, _SECOND_REPLY = (
    {"role": "assistant", "content": "Seven."},
    {"role": "assistant", "content": "Two, the only even prime."},
)
# Every message's text is distinct, so a trained run can be told to hold one message and no other.
TEMPLATE_DIALOGUES: dict[str, tuple[list[dict[str, Any]], list | None]] = {
    "single turn": ([_FIRST_QUESTION, _FIRST_REPLY], None),
    "multi-turn": ([_FIRST_QUESTION, _FIRST_REPLY, _SECOND_QUESTION, _SECOND_REPLY], None),
    "system": (
        [
            {"role": "system", "content": "You answer in one short line."},
            _FIRST_QUESTION,
            _FIRST_REPLY,
            _SECOND_QUESTION,
            _SECOND_REPLY,
        ],
        None,
    ),
    "tool call": (
        [
            {"role": "user", "content": "Is it raining in Lyon?"},
            {"role": "assistant", "content": "", "tool_calls": [_weather_call("Lyon", 1)]},
            _weather_result('{"rain": false}', 1),
            {"role": "assistant", "content": "No, it is dry in Lyon."},
        ],
        WEATHER_TOOLS,
    ),
    "parallel calls": (
        [
            {"role": "user", "content": "Weather in Lyon and Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [_weather_call("Lyon", 2), _weather_call("Oslo", 3)]},
            _weather_result('{"sky": "clear"}', 2),
            _weather_result('{"sky": "snow"}', 3),
            {"role": "assistant", "content": "Clear in Lyon, snow in Oslo."},
        ],
        WEATHER_TOOLS,
    ),
    "text with a call": (
        [
            {"role": "user", "content": "Is it windy in Nice?"},
            {"role": "assistant", "content": "Let me look that up.", "tool_calls": [_weather_call("Nice", 4)]},
            _weather_result('{"wind": "calm"}', 4),
            {"role": "assistant", "content": "It is calm in Nice."},
        ],
        WEATHER_TOOLS,
    ),
    "reasoning": (
        [
            {"role": "user", "content": "Is 9 prime?"},
            {"role": "assistant", "reasoning_content": "Nine is three times three.", "content": "No, 9 = 3 x 3."},
        ],
        None,
    ),
}


# --- Checkpoints ------------------------------------------------------------------------------------------------


def make_checkpoint(
    output_dir: Path,
    step: int,
    state: bool = True,
    weights: str | None = "model.safetensors",
    manifest: bool = True,
    world_size: int = 1,
    zero_stage: int | None = None,
) -> Path:
    """A fake `checkpoint-<step>`: `weights` is a file name, `global_step` for ZeRO shards (one per rank), or None.

    With `manifest`, the manifest of what was written, as a save would leave it.
    """
    checkpoint = output_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    if state:
        (checkpoint / TRAINER_STATE_FILE).write_text("{}")
    if weights == "global_step":
        (checkpoint / f"global_step{step}").mkdir()
        for rank in range(world_size):
            shard = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            (checkpoint / f"global_step{step}" / shard).write_bytes(b"shard")
    elif weights is not None:
        (checkpoint / weights).write_bytes(b"weights")
    if manifest:
        (checkpoint / MANIFEST_FILE).write_text(json.dumps(build_manifest(checkpoint, step, world_size, zero_stage)))
    return checkpoint


def assert_same_checkpoint(checkpoint: Path, reference: Path) -> None:
    """Weights and optimizer state of two checkpoints are bitwise equal."""
    weights, reference_weights = load_file(checkpoint / "model.safetensors"), load_file(reference / "model.safetensors")
    for name, tensor in reference_weights.items():
        assert torch.equal(weights[name], tensor), f"{name} differs between {checkpoint.name} and {reference.name}"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    reference_state = torch.load(reference / "optimizer.pt", weights_only=True)["state"]
    for index, entry in reference_state.items():
        for key, value in entry.items():
            assert torch.equal(state[index][key], value), f"optimizer state {index}.{key} changed in {checkpoint.name}"


def read_nonfinite_log(output_dir: Path) -> list[dict]:
    path = output_dir / "logs" / NONFINITE_LOG
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_real_origins(origins: list[str]) -> None:
    """Each origin is `file:line` of a record that exists: a user can open the sample that broke the step."""
    assert origins, "the skipped step names no sample"
    for origin in origins:
        path, line = origin.rsplit(":", 1)
        with open(path, "rb") as handle:
            assert 1 <= int(line) <= sum(1 for _ in handle), origin


def trained_runs(row: dict[str, list[int]], tokenizer: Any) -> list[str]:
    """Each contiguous run of trained tokens of a tokenised row, decoded with its special tokens."""
    pairs = zip(row["input_ids"], row["labels"], strict=True)
    return [
        tokenizer.decode([token for token, _ in run])
        for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX)
        if trained
    ]


# --- Running train.py and the launch scripts --------------------------------------------------------------------


def run_train(output_dir: Path | None, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py output_dir=... <overrides>` from the repo root (no `output_dir` when None), to its end
    whatever its status."""
    command = [sys.executable, "train.py", *([f"output_dir={output_dir}"] if output_dir else []), *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


RUN_TO_EXIT_TIMEOUT_S = 180


def run_to_exit(command: list[str], output_dir: Path) -> tuple[int, str]:
    """Run `command` from the repo root, one thread, to its end whatever its status: (status, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        process = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TO_EXIT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        log = describe_run(str(e.output), [output_dir / "logs"])
        pytest.fail(f"{command} did not finish in {RUN_TO_EXIT_TIMEOUT_S} s\n{log}")
    return process.returncode, process.stdout + process.stderr


def run_ok(output_dir: Path | None, *overrides: str) -> subprocess.CompletedProcess:
    """`run_train` that must succeed."""
    result = run_train(output_dir, *overrides)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def runs_of(log: str, job_id: str) -> list[str]:
    """A launch/slurm.sbatch job log split where each run of the job starts: "job <id> (restart <n>) on ..."."""
    parts = re.split(rf"^(?=job {job_id} \(restart \d+\) on )", log, flags=re.MULTILINE)
    return [part for part in parts if part.startswith(f"job {job_id} ")]


def run_module(module: str, overrides: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <overrides>` from the repo root (data_pipeline.prepare, data_pipeline.inspect), output
    captured as text; its result, whatever its exit status."""
    return subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def describe_run(output: str, log_dirs: list[Path], launcher: str = "launcher") -> str:
    """The tail of the launcher's output and of every `*.log` and `*.out` file in `log_dirs`."""
    parts = [f"--- {launcher} output (last {TAIL_LINES} lines) ---", tail(output)]
    for log_dir in log_dirs:
        for log in sorted([*log_dir.glob("*.log"), *log_dir.glob("*.out")]):
            parts += [
                f"--- {log} (last {TAIL_LINES} lines) ---",
                tail(log.read_text(encoding="utf-8", errors="replace")),
            ]
    return "\n".join(parts)


def run_script(
    command: list[str], env: dict[str, str], timeout: float, log_dirs: list[Path], cwd: Path = REPO_ROOT
) -> str:
    """Run `command` to completion and return its output; fail the test on a non-zero exit or the deadline.

    It gets a session of its own, so a timeout kills every rank it started, not only the launcher.
    The failure message ends with the tail of the logs in `log_dirs` (each rank's, the job's).
    """
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout:.0f} s\n{describe_run(output, log_dirs)}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {process.returncode}\n{describe_run(output, log_dirs)}")
    assert_no_shm_buffer_left(command, env)
    return output


def assert_no_shm_buffer_left(command: list[str], env: dict[str, str]) -> None:
    """No DeepSpeed CPU all-reduce buffer (cluster.distributed.init_deepspeed_distributed: 67 MB of RAM each) of the
    launch on `env`'s MASTER_PORT is left in /dev/shm."""
    if "MASTER_PORT" in env:
        left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*"))
        assert not left, f"{' '.join(command)} left shared memory behind: {[str(path) for path in left]}"


def run_on_two_deepspeed_ranks(script: Path, *arguments: str, timeout: float = DISTRIBUTED_TIMEOUT_S) -> str:
    """`script` (a test's check, importing the project) on 2 CPU ranks under the DeepSpeed launcher, one thread
    each; fails the test as `run_script` does."""
    env = {**launch_environment(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=2", f"--master_port={env['MASTER_PORT']}"]
    return run_script([*command, str(script), *arguments], env=env, timeout=timeout, log_dirs=[])


def launch_environment() -> dict[str, str]:
    """The caller's environment, with this interpreter and a rendezvous port no other test is using."""
    return {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}


@dataclass
class LaunchedRun:
    output_dir: Path
    console: str
    """The launcher's stdout and stderr together, as a user's terminal (or nohup log) shows them."""


def check_saved_run(output_dir: Path, base_model_dir: Path, ranks: int) -> None:
    """What a user checks after a run: every rank logged, metrics were written, the model reloads and trained."""
    for rank in range(ranks):
        assert (output_dir / "logs" / f"rank{rank}.log").is_file(), f"rank {rank} wrote no log under {output_dir}/logs"
    metrics = output_dir / METRICS_FILE
    assert metrics.is_file() and metrics.stat().st_size > 0, f"no {METRICS_FILE} in {output_dir}"

    base = AutoModelForCausalLM.from_pretrained(base_model_dir).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    assert saved.keys() == base.keys()
    for name, tensor in saved.items():
        # ZeRO-3 without gathering on save writes empty placeholders: numel 0 and the wrong shape.
        assert tensor.shape == base[name].shape and tensor.numel() > 0, f"{name}: saved {tuple(tensor.shape)}"
    assert any(not torch.equal(saved[name], base[name]) for name in base), "the saved weights are the base model's"
    # train.py compared every saved tensor with the gathered trained parameter (cluster/export.py).
    assert "Verified export" in (output_dir / "logs" / "rank0.log").read_text()


def make_interrupted_copy(finished: Path, interrupted: Path) -> None:
    """What a `COMPARABLE_RUN` killed while saving its last checkpoint leaves in `interrupted`.

    That run is the finished one up to the kill: the same seed and config give the same
    checkpoint-4, and every step was logged to metrics.jsonl. The checkpoint being written
    lacks trainer_state.json (the Trainer writes it last); there is no final model.
    `resume_from_checkpoint=auto` must skip that checkpoint, resume from checkpoint-4, and
    replace the metrics logged after step 4 rather than append a second copy.
    """
    interrupted.mkdir(parents=True)
    shutil.copytree(finished / f"checkpoint-{RESUME_STEP}", interrupted / f"checkpoint-{RESUME_STEP}")
    shutil.copytree(
        finished / f"checkpoint-{LAST_STEP}",
        interrupted / f"checkpoint-{LAST_STEP}",
        ignore=shutil.ignore_patterns(TRAINER_STATE_FILE),
    )
    logged_steps = [r for r in read_metrics(finished) if "loss" in r]
    (interrupted / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in logged_steps))


def logged_steps(output_dir: Path) -> list[int]:
    """The steps whose loss rank 0 has logged to `output_dir`'s metrics so far (a resumed run's again), read while
    the run may be writing."""
    path = output_dir / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # rank 0 may be writing the last one
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


def step_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir) if "loss" in r]


def assert_same_weights(output_dir: Path, reference_dir: Path, atol: float) -> None:
    """Both saved models reload with `from_pretrained` and every tensor agrees within `atol`."""
    model = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).state_dict()
    assert model.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(model[name], tensor, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_training(output_dir: Path, reference_dir: Path, atol: float) -> None:
    """The loss at every step, and the final weights, agree within `atol`; each step was logged once."""
    losses, reference = step_losses(output_dir), step_losses(reference_dir)
    assert [step for step, _ in losses] == list(range(1, LAST_STEP + 1)), f"steps logged in {output_dir}: {losses}"
    assert [step for step, _ in reference] == list(range(1, LAST_STEP + 1)), reference
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in losses], dtype=torch.float64),
        torch.tensor([loss for _, loss in reference], dtype=torch.float64),
        rtol=0,
        atol=atol,
        msg=lambda m: f"per-step losses differ:\n{losses}\n{reference}\n{m}",
    )
    assert_same_weights(output_dir, reference_dir, atol)


def gathered_zero3_state(checkpoint: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[float], list[float]]:
    """A ZeRO-3 checkpoint's optimizer state joined from its per-rank shards, read straight from DeepSpeed's files:
    every parameter's `fp32` master weight, `exp_avg` and `exp_avg_sq`, and each rank's and group's Adam step and lr.

    Rank r's `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` holds, for each parameter group, the r-th slice of
    ceil(numel / world size) elements of each parameter in turn (`param_shapes` of the model-state file gives the
    order); the last slice is padded.
    """
    tag_dir = checkpoint / (checkpoint / "latest").read_text(encoding="utf-8").strip()
    shards = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    states = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"] for path in shards]
    model_states = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    gathered: dict[str, dict[str, torch.Tensor]] = {}
    for group, shapes in enumerate(model_states["param_shapes"]):
        flats = {"fp32": [state["fp32_flat_groups"][group] for state in states]}
        for key in ("exp_avg", "exp_avg_sq"):
            flats[key] = [state["optimizer_state_dict"]["state"][group][key] for state in states]
        offset = 0
        for name, shape in shapes.items():
            per_rank = -(-shape.numel() // len(states))
            gathered[name] = {
                key: torch.cat([flat[offset : offset + per_rank] for flat in rank_flats])[: shape.numel()].view(shape)
                for key, rank_flats in flats.items()
            }
            offset += per_rank
    steps = [float(entry["step"]) for state in states for entry in state["optimizer_state_dict"]["state"].values()]
    lrs = [group["lr"] for state in states for group in state["optimizer_state_dict"]["param_groups"]]
    return gathered, steps, lrs


def assert_same_zero3_state(checkpoint: Path, reference: Path, step: int, rtol: float) -> None:
    """Two ZeRO-3 checkpoints, of any world sizes, hold the same optimizer state (`gathered_zero3_state`): Adam's
    step is `step` in every group of every rank, the lr is the reference's, and each state (fp32, exp_avg,
    exp_avg_sq) agrees within `rtol` times its largest magnitude over the model."""
    state, steps, lrs = gathered_zero3_state(checkpoint)
    reference_state, _, reference_lrs = gathered_zero3_state(reference)
    assert set(steps) == {float(step)}, f"Adam steps {steps} in {checkpoint}, expected {step} everywhere"
    assert len(set(lrs)) == 1 and set(lrs) == set(reference_lrs), f"lr {lrs} in {checkpoint}, {reference_lrs} there"
    assert state.keys() == reference_state.keys()
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        scale = max(entry[key].abs().max().item() for entry in reference_state.values())
        for name, entry in reference_state.items():
            torch.testing.assert_close(
                state[name][key], entry[key], rtol=0, atol=rtol * scale, msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
            )


# data_pipeline/prepare.py's line, after our log format's time stamp (observability/rank_logging.py).
PREPARED_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d [\d:]+,\d+) INFO data_pipeline\.prepare: "
    r"(?P<action>Wrote|Reusing) the prepared dataset (?P<directory>\S+)$",
    re.MULTILINE,
)


def prepared_lines(output_dir: Path) -> dict[int, tuple[str, Path, datetime]]:
    """Per rank, from `logs/rank<N>.log`: whether it wrote or reused the prepared dataset, which directory, and
    when it said so."""
    lines = {}
    for rank in (0, 1):
        log = (output_dir / "logs" / f"rank{rank}.log").read_text(encoding="utf-8")
        found = PREPARED_LINE.findall(log)
        assert len(found) == 1, f"rank {rank} logged {len(found)} prepared-dataset lines:\n{log[-3000:]}"
        (time_stamp, action, directory) = found[0]
        lines[rank] = (action, Path(directory), datetime.strptime(time_stamp, "%Y-%m-%d %H:%M:%S,%f"))
    return lines


def assert_prepared_once(output_dir: Path, cache_dir: Path) -> Path:
    """The 2 ranks of the run in `output_dir` prepared the data once: one tokenised into `cache_dir`, the other
    waited on the lock, then reused it; nothing else was built there. Returns the prepared directory."""
    lines = prepared_lines(output_dir)
    actions = sorted(action for action, _, _ in lines.values())
    assert actions == ["Reusing", "Wrote"], f"expected one rank to tokenise and the other to reuse: {lines}"
    (prepared,) = {directory for _, directory, _ in lines.values()}
    assert prepared.parent == cache_dir and (prepared / "train").is_dir()
    # The rank that reused did so once the other had written (it waited on the lock), not in parallel.
    (written_at,) = (time_stamp for action, _, time_stamp in lines.values() if action == "Wrote")
    (reused_at,) = (time_stamp for action, _, time_stamp in lines.values() if action == "Reusing")
    assert reused_at >= written_at
    # Nothing else was built: one prepared directory, and no temporary build directory or second fingerprint.
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == [prepared.name]
    return prepared


# --- Nodes on this machine: network namespaces (scripts/netns_nodes.sh) -------------------------------------------

NETNS_SCRIPT = REPO_ROOT / "scripts" / "netns_nodes.sh"
_NETNS_SETS = itertools.count()


@dataclass(frozen=True)
class NetnsNode:
    """A node of `netns_nodes`: a network stack, an address and a hostname of its own; this machine's disk and cores."""

    index: int
    hostname: str
    address: str
    prefix: str
    """The NETNS_PREFIX of its set: its namespace is `<prefix>-node<index>`."""

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this node, from the caller's directory and with the caller's environment."""
        return ["env", f"NETNS_PREFIX={self.prefix}", str(NETNS_SCRIPT), "exec", str(self.index), *argv]

    def processes(self) -> list[int]:
        """The ids of every process running on this node now (in its network namespace)."""
        namespace = f"{self.prefix}-node{self.index}"
        listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True)
        return [int(pid) for pid in listed.stdout.split()]

    def disconnect(self) -> None:
        """Takes the node's interface down: nothing reaches it or leaves it any more, as when a machine dies (its
        peers get no reset, only silence). `ip netns exec` still runs commands on it."""
        namespace = f"{self.prefix}-node{self.index}"
        subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], capture_output=True, check=True)

    def kill(self) -> None:
        """SIGKILL every process on this node, its launcher and ranks: the node is lost (its network stays up)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def netns_names() -> list[str]:
    """The network namespaces `ip netns` names now."""
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()


def destroy_netns_nodes(prefix: str) -> subprocess.CompletedProcess:
    """`scripts/netns_nodes.sh destroy` for the set of `prefix`."""
    env = {**os.environ, "NETNS_PREFIX": prefix}
    return subprocess.run([str(NETNS_SCRIPT), "destroy"], env=env, capture_output=True, text=True)


def netns_leftovers(prefix: str, subnet: str) -> list[str]:
    """What a set of nodes left behind: namespaces (a process still in one keeps it), their /etc/netns files, and
    DeepSpeed all-reduce buffers named after the nodes' addresses. Their veths live and die with the namespaces."""
    return [
        *(f"namespace {name}" for name in netns_names() if name.startswith(f"{prefix}-")),
        *(str(path) for path in Path("/etc/netns").glob(f"{prefix}-*")),
        *(str(path) for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{subnet}.*")),
    ]


def netns_missing() -> str:
    """Why `netns_nodes` cannot make nodes on this machine (not root, no `ip` or `unshare`), or "" if it can try."""
    if os.geteuid() != 0:
        return "nodes in network namespaces need root (ip netns add)"
    missing = [name for name in ("ip", "unshare") if shutil.which(name) is None]
    if missing:
        return f"no {', '.join(missing)} on PATH: scripts/ci_netns.sh installs iproute2 and util-linux"
    return ""


@contextlib.contextmanager
def netns_nodes(count: int) -> Iterator[list[NetnsNode]]:
    """`count` nodes (`scripts/netns_nodes.sh create`), destroyed however the body ends, with every process still in
    them; then fails if anything of theirs is left (`netns_leftovers`). Skips where namespaces cannot be made: not
    root, no `ip` or `unshare`, or no right to add one (an unprivileged container)."""
    if netns_missing():
        pytest.skip(netns_missing())
    # Sets of test processes that were killed before their teardown ran (the prefix holds the process id).
    sets = {match[1]: match[2] for name in netns_names() if (match := re.fullmatch(r"(dft(\d+)-\d+)-.*", name))}
    for stale, pid in sets.items():
        if not Path(f"/proc/{pid}").exists():
            destroy_netns_nodes(stale)
    serial = next(_NETNS_SETS)
    # One prefix and subnet per set, so that two test sessions on this machine never share a name.
    prefix, subnet = f"dft{os.getpid()}-{serial}", f"10.231.{(os.getpid() + serial) % 254 + 1}"
    env = {**os.environ, "NETNS_PREFIX": prefix, "NETNS_SUBNET": subnet}
    try:
        created = subprocess.run([str(NETNS_SCRIPT), "create", str(count)], env=env, capture_output=True, text=True)
        if created.returncode != 0 and not netns_leftovers(prefix, subnet):
            pytest.skip(f"cannot add a network namespace here: {created.stderr.strip()}")
        assert created.returncode == 0, f"scripts/netns_nodes.sh create {count} failed:\n{created.stderr}"
        yield [NetnsNode(index, f"node{index}", f"{subnet}.{index + 1}", prefix) for index in range(count)]
    finally:
        destroyed = destroy_netns_nodes(prefix)
        left = netns_leftovers(prefix, subnet)
        assert destroyed.returncode == 0 and not left, f"the nodes left {left}:\n{destroyed.stderr}"


def start_sshd(nodes: list[NetnsNode]) -> None:
    """An sshd on every node of the set (`scripts/netns_nodes.sh sshd`): root on one node logs in to another with
    `ssh node<i>`, which passes OMP_NUM_THREADS on; `netns_nodes` stops them with the nodes. Skips without sshd, ssh,
    ssh-keygen or pdsh (the DeepSpeed launcher's way to start the nodes)."""
    missing = [name for name in ("ssh", "ssh-keygen", "pdsh") if shutil.which(name) is None]
    missing += [] if Path("/usr/sbin/sshd").exists() else ["/usr/sbin/sshd"]
    if missing:
        pytest.skip(f"no {', '.join(missing)}: scripts/ci_netns.sh installs openssh-server, openssh-client and pdsh")
    env = {**os.environ, "NETNS_PREFIX": nodes[0].prefix}
    started = subprocess.run([str(NETNS_SCRIPT), "sshd"], env=env, capture_output=True, text=True)
    assert started.returncode == 0, f"scripts/netns_nodes.sh sshd failed:\n{started.stdout}{started.stderr}"


def cores_per_node(nodes: int) -> int:
    """This machine's cores shared between `nodes` nodes: each node's ranks get their share, none oversubscribes."""
    return max(1, len(os.sched_getaffinity(0)) // nodes)


def run_on_nodes(
    launches: list[tuple[NetnsNode, list[str], dict[str, str]]], timeout: float, log_dirs: list[Path]
) -> list[str]:
    """Each `(node, command, env)` at once, as one launcher per node of a cluster job, from the repo root; their
    outputs. Each gets a session of its own; the first that fails, or the deadline, stops them all (a node whose
    peer died waits in a collective until its timeout) and fails the test with every node's output and the tails
    of the logs in `log_dirs`."""
    with contextlib.ExitStack() as stack:
        outputs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in launches]
        processes = [
            subprocess.Popen(
                node.command(command),
                cwd=REPO_ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )  # fmt: skip
            for (node, command, env), output in zip(launches, outputs, strict=True)
        ]
        deadline, failure = time.monotonic() + timeout, ""
        while not failure:
            codes = [process.poll() for process in processes]
            failed = [(node, code) for (node, *_), code in zip(launches, codes, strict=True) if code not in (None, 0)]
            if failed:
                failure = f"{failed[0][0].hostname}'s launcher exited with {failed[0][1]}; the others were stopped"
            elif None not in codes:
                break
            elif time.monotonic() > deadline:
                failure = f"the launchers did not finish in {timeout:.0f} s"
            time.sleep(0.2)
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        texts = []
        for output in outputs:
            output.seek(0)
            texts.append(output.read())
    if failure:
        # Each node's output, then the logs once.
        described = [
            describe_run(text, [] if node is not launches[-1][0] else log_dirs, f"{node.hostname}'s launcher")
            for (node, *_), text in zip(launches, texts, strict=True)
        ]
        pytest.fail(f"{failure}\n" + "\n".join(described))
    for _, command, env in launches:
        assert_no_shm_buffer_left(command, env)
    return texts


# --- A save that stalls, to be killed in the middle --------------------------------------------------------------

STALL_MESSAGE = "Test stall: holding the save of"


def stalled_save_command(step: int, *overrides: str) -> list[str]:
    """`python train.py <overrides>`, except that the save of optimizer step `step` stalls (`train_stalling_save`)
    after every rank has written its files, before the manifest and the rename. Run it from the repo root."""
    code = f"from tests.helpers import train_stalling_save; train_stalling_save({step})"
    return [sys.executable, "-c", code, *overrides]


def train_stalling_save(step: int) -> None:
    """Run train.py with `sys.argv[1:]` as its overrides; rank 0 logs `STALL_MESSAGE` and sleeps in the save of `step`.

    `cluster.atomic_save` calls `build_manifest` on rank 0 once every rank has written its files into
    `.partial/checkpoint-<step>` and before the manifest is written and the directory renamed: the moment a kill
    hurts most. The test kills the run there.
    """
    build = cluster.atomic_save.build_manifest

    def stalling_build_manifest(checkpoint: Path, save_step: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if save_step == step:
            logging.getLogger(__name__).warning("%s %s", STALL_MESSAGE, checkpoint)
            time.sleep(3600)
        return build(checkpoint, save_step, *args, **kwargs)

    cluster.atomic_save.build_manifest = stalling_build_manifest
    train_py = REPO_ROOT / "train.py"
    sys.argv = [str(train_py), *sys.argv[1:]]
    runpy.run_path(str(train_py), run_name="__main__")


# --- Float64 references -----------------------------------------------------------------------------------------

# Numerical tests compare each float32 path with a float64 computation of the same thing, never two float32 paths
# with each other: float32 summation order moves with the CPU's vector width and thread count, float64 rounding is
# 2**29 times finer and negligible next to it. One float32 rounding is at most eps / 2 relative; over a reduction of
# n terms the rounding errors add up like a random walk, about eps * sqrt(n) relative to the sum's scale (n * eps in
# the worst case, never reached with random data). A test states its n and a small factor c next to its bound.
FLOAT32_EPS = torch.finfo(torch.float32).eps


def float32_bound(terms: int, factor: float = 4.0) -> float:
    """`factor * eps * sqrt(terms)`: the relative error that float32 rounding leaves on a reduction of `terms`."""
    return factor * FLOAT32_EPS * terms**0.5


def relative_error(value: torch.Tensor | float, reference: torch.Tensor | float) -> float:
    """`|value - reference| / |reference|`, in the Frobenius norm for tensors, computed in float64."""
    value, reference = torch.as_tensor(value).double(), torch.as_tensor(reference).double()
    return float((value - reference).norm() / reference.norm())


def float64_label_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the definition, in float64 on full logits (soft-capped when `softcap`): `log p(target)` of every position
    of `labels` (aligned with the inputs, shifted here), `[rows, seq - 1]`, and the mask of the trainable ones."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    return log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), targets != IGNORE_INDEX


def update_tolerance_ratio(
    update: torch.Tensor, gradient: torch.Tensor, before: torch.Tensor, gradient_bound: float
) -> float:
    """|update + gradient| / tolerance, in norm over the tensor, for an SGD step of learning rate 1: at most 1 when the
    float32 update is minus the float64 gradient up to float32 rounding (the ZeRO-3 checks).

    Two roundings: the gradient's, `gradient_bound` relative to it in norm, and the parameter's, stored in float32
    after the step, at most eps / 2 of it per element (the update is read back as `after - before`, so a layer-norm
    weight of 1 moved by 1e-4 keeps only a few digits of its update; the subtraction itself is exact there). The
    second part is a strict worst case, so the ratio stays below 1 whatever the rounding did. A lost micro-batch, a
    gradient that bypassed ZeRO-3's reduction or one scaled by clipping is off by 25 % or more, a ratio in the
    thousands.
    """
    after = before.double() + update.double()
    tolerance = gradient_bound * gradient.norm() + FLOAT32_EPS / 2 * after.norm()
    return float((update.double() + gradient).norm() / tolerance)


def float64_dft_sum(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the definition, in float64: `sum_t w_t CE_t` over the trainable targets of `labels` (aligned with the
    inputs, shifted here), with `w_t` detached, and the per-token `CE_t` and the trainable mask of the targets."""
    logits, targets = logits.double()[:, :-1], labels[:, 1:]
    valid = targets != IGNORE_INDEX
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    weight = (alpha * torch.exp(-nll) + 1 - alpha).detach()
    return (weight * nll)[valid].sum(), nll.detach(), valid


def float64_model_loss_and_grads(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], alpha: float, num_items: torch.Tensor | int | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DFT loss of `inputs` (every key but `labels` goes to the model) and every parameter's gradient, on a
    float64 copy of `model` in training mode: the float64 reference of `loss_and_grads`."""
    model64 = copy.deepcopy(model).double().train()
    model64.zero_grad(set_to_none=True)
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    weighted_sum, _, valid = float64_dft_sum(model64(**model_inputs).logits, inputs["labels"], alpha)
    loss = weighted_sum / (num_items if num_items is not None else valid.sum().clamp(min=1))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model64.named_parameters()}


def float64_sgd_steps(
    model: torch.nn.Module,
    steps: list[list[tuple[dict[str, torch.Tensor], torch.Tensor | int]]],
    alpha: float,
    learning_rate: float,
    max_grad_norm: float,
) -> dict[str, torch.Tensor]:
    """The parameters after plain SGD steps (no momentum or weight decay) on a float64 copy of `model`.

    Each step is a list of micro-batches `(inputs, num_items)` as the Trainer handed them to `compute_loss`: their
    DFT gradients (`sum_t w_t CE_t / num_items`) add up, and the sum is clipped to `max_grad_norm` in total norm, as
    `torch.nn.utils.clip_grad_norm_` does (0 for no clipping).
    """
    model64 = copy.deepcopy(model).double().train()
    params = [p for p in model64.parameters() if p.requires_grad]
    for step in steps:
        model64.zero_grad(set_to_none=True)
        for inputs, num_items in step:
            model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            weighted_sum, _, _ = float64_dft_sum(model64(**model_inputs).logits, inputs["labels"], alpha)
            (weighted_sum / num_items).backward()
        with torch.no_grad():
            if max_grad_norm > 0:
                total = torch.stack([p.grad.norm() for p in params]).norm()
                scale = (max_grad_norm / (total + 1e-6)).clamp(max=1.0)
                for p in params:
                    p.grad.mul_(scale)
            for p in params:
                p.sub_(learning_rate * p.grad)
    return {name: p.detach() for name, p in model64.named_parameters()}


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


# A launch/slurm.sbatch job as the Slurm tests watch it: shared by the one-node cluster (tests/launch/test_slurm.py,
# clients run on this machine) and the clusters of namespace nodes (tests/launch/test_slurm_two_nodes.py, clients run
# on node0): `SlurmJob.client` runs a Slurm client command wherever the cluster's clients run.
SLURM_FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}

SlurmClient = Callable[[list[str], dict[str, str]], subprocess.CompletedProcess]
"""Runs a Slurm client command (argv) with an environment, output captured as text."""


@dataclass
class SlurmJob:
    id: str
    log: Path
    """The job log, appended to by every run of a requeued job (#SBATCH --open-mode=append)."""
    output_dir: Path
    env: dict[str, str]
    deadline: float
    client: SlurmClient
    log_dirs: list[Path] = field(default_factory=list)
    """Besides the job log's and the run's: where the cluster's daemons log."""

    def info(self) -> dict[str, str]:
        """`scontrol show job`'s fields: JobState, Reason, Restarts (the requeue count), ExitCode, NodeList, ..."""
        command = ["scontrol", "--oneliner", "show", "job", self.id]
        result = self.client(command, self.env)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed: {result.stderr}\n{self.describe()}")
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def describe(self) -> str:
        return describe_run("", [self.log.parent, self.output_dir / "logs", *self.log_dirs])

    def logged_steps(self) -> list[int]:
        return logged_steps(self.output_dir)

    def wait_for_step(self, step: int) -> None:
        while not any(logged >= step for logged in self.logged_steps()):
            info = self.info()
            if info["JobState"] in SLURM_FINAL_STATES or time.monotonic() > self.deadline:
                pytest.fail(f"job {self.id} logged no step {step} (JobState={info['JobState']})\n{self.describe()}")
            time.sleep(0.2)

    def wait_until_done(self) -> tuple[dict[str, str], list[str]]:
        """The job's final fields, and each (JobState, Reason, Restarts) it went through on the way."""
        states: list[str] = []
        while (info := self.info())["JobState"] not in SLURM_FINAL_STATES:
            state = f"{info['JobState']} ({info['Reason']}, restarts {info['Restarts']})"
            if not states or states[-1] != state:
                states.append(state)
            if time.monotonic() > self.deadline:
                pytest.fail(f"job {self.id} still {state} at its deadline, after {states}\n{self.describe()}")
            time.sleep(0.5)
        return info, states

    def cancel(self) -> None:
        """`scancel` it: a job still queued or running after a failure would hold the nodes for the next test."""
        self.client(["scancel", self.id], self.env)
