"""LoRA and QLoRA adapters (`model.adapter`, `model.lora.*`) with peft: checks, wrapping, counting, merging.

An adapter run freezes the base and trains low-rank updates of its linear layers (peft's `LoraConfig`);
`qlora` loads the base in 4-bit NF4 first (bitsandbytes, CUDA only). The Trainer saves the adapter
(`adapter_model.safetensors`, `adapter_config.json`) in `output_dir`; `merge_adapter` then writes the base with
the adapter folded in to `<output_dir>/merged` and checks it: the same parameter names and shapes as the base,
and the same logits as the base with the adapter on a probe batch.

The failures users of other tools meet are refused here, at start-up: QLoRA without a GPU, fp16 where bf16
exists (fp16 LoRA is the usual `loss: nan`), an adapter config that leaves nothing to train. Under fp16 where
bf16 does not exist (V100, T4), peft keeps the adapter weights in float32 (`autocast_adapter_dtype`), so the
optimizer updates them in full precision.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    set_seed,
)

from config.schema import ModelConfig
from modeling.heads import CAUSAL_LM, SCORE, auto_model_class, head_config, head_of

logger = logging.getLogger(__name__)

MERGED_DIR = "merged"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROBE_TEXT = "The adapter and the merged model must agree on every logit of this probe sentence."


def check_adapter_supported(
    model_cfg: ModelConfig, fp16: bool, cuda: bool | None = None, bf16_supported: bool | None = None
) -> None:
    """Refuse an adapter run this machine or precision cannot do right, before anything is loaded.

    Args:
        model_cfg: `model.*`.
        fp16: `training.fp16`.
        cuda, bf16_supported: what this machine has; None asks torch.

    Raises:
        ValueError: naming the key and the fix.
    """
    if model_cfg.adapter == "none":
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    bf16_supported = (cuda and torch.cuda.is_bf16_supported()) if bf16_supported is None else bf16_supported
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"model.adapter={model_cfg.adapter} needs peft: pip install 'peft>=0.21,<0.23'")
    if model_cfg.adapter == "qlora":
        if not cuda:
            raise ValueError(
                "model.adapter=qlora needs a CUDA GPU: bitsandbytes' 4-bit base weights have no CPU kernels here; "
                "use model.adapter=lora on this machine"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("model.adapter=qlora needs bitsandbytes: pip install 'dft-sft[qlora]'")
    if fp16 and bf16_supported:
        raise ValueError(
            f"model.adapter={model_cfg.adapter} with training.fp16=true on a GPU that has bf16: fp16's range overflows "
            "in LoRA runs (loss: nan); use training.bf16=true training.fp16=false"
        )


def quantization_config(model_cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """4-bit NF4 with double quantization for QLoRA (the QLoRA paper's recipe), bf16 compute; stored as bf16 so
    ZeRO-3 can partition the packed weights like any other."""
    if model_cfg.adapter != "qlora":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def add_adapter(model: PreTrainedModel, model_cfg: ModelConfig, seed: int) -> PreTrainedModel:
    """The model to train: `model` itself for full-parameter runs, else it frozen under a peft LoRA adapter.

    Args:
        model: the loaded base.
        model_cfg: `model.*`.
        seed: the run's seed; the adapter's A matrices are random, and every rank must draw the same ones.

    Raises:
        ValueError: the target modules match nothing, or nothing is left to train.
    """
    if model_cfg.adapter == "none":
        return model
    import peft

    lora = model_cfg.lora
    modules_to_save = list(lora.modules_to_save)
    if lora.train_embeddings:
        modules_to_save += [_module_name(model, model.get_input_embeddings())]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            modules_to_save.append(_module_name(model, head))
    if model_cfg.adapter == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    target = lora.target_modules[0] if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    config = peft.LoraConfig(
        # SEQ_CLS (a reward model's score head) makes peft train the new `score` head in full (modules_to_save).
        task_type="SEQ_CLS" if head_of(model) == SCORE else "CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=lora.train_embeddings and bool(getattr(model.config, "tie_word_embeddings", False)),
    )
    set_seed(seed)
    try:
        adapted = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as error:
        raise ValueError(f"model.lora.target_modules={list(lora.target_modules)}: {error}") from error
    trainable, _ = count_parameters(adapted)
    if trainable == 0:
        raise ValueError(f"model.lora: nothing to train (target_modules={list(lora.target_modules)})")
    return adapted


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters; under ZeRO-3 each rank holds a shard and `ds_numel` is the full size."""
    trainable = total = 0
    for parameter in model.parameters():
        size = getattr(parameter, "ds_numel", parameter.numel())
        total += size
        trainable += size if parameter.requires_grad else 0
    return trainable, total


def adapter_saved_name(parameter_name: str, adapter_name: str = "default") -> str:
    """The key peft saves a trainable parameter under: without the adapter's name and the `modules_to_save`
    level (peft's `get_peft_model_state_dict`)."""
    return parameter_name.replace("modules_to_save.", "").replace(f".{adapter_name}.", ".")


def load_adapter_model(base: PreTrainedModel, adapter_dir: str | Path) -> PreTrainedModel:
    """The base with a saved adapter on it, for inference."""
    import peft

    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def merge_adapter(
    base_path: str,
    adapter_dir: str | Path,
    trust_remote_code: bool = False,
    head: str = CAUSAL_LM,
    pad_token_id: int | None = None,
) -> Path:
    """Write the base with the adapter merged into `<adapter_dir>/merged`, in the base's saved dtype, then check
    it against the unmerged adapter model; rank 0 only. Returns the merged directory. A reward model (`head`
    `SCORE`) merges onto the base with its score head, which the adapter saved whole (`pad_token_id` as trained).

    The merge runs in float32 on CPU, in place (one copy of the base in host memory, as any merge needs), is
    written to a temporary directory and renamed into place only once it passed `check_merged`.

    Raises:
        RuntimeError: the merged model's names, shapes or logits differ from what they must be.
    """
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    config = AutoConfig.from_pretrained(
        base_path, trust_remote_code=trust_remote_code, **head_config(head, pad_token_id)
    )
    saved_dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    base = auto_model_class(head).from_pretrained(
        base_path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    adapted = load_adapter_model(base, adapter_dir)
    probe = AutoTokenizer.from_pretrained(adapter_dir)(PROBE_TEXT, return_tensors="pt")
    with torch.no_grad():
        expected_logits = adapted(**probe).logits
    merged = adapted.merge_and_unload().to(saved_dtype)
    destination = adapter_dir / MERGED_DIR
    staging = Path(tempfile.mkdtemp(prefix=f".{MERGED_DIR}-", dir=adapter_dir))
    try:
        merged.save_pretrained(staging)
        del merged, adapted, base
        _copy_tokenizer_files(adapter_dir, staging)
        check_merged(staging, config, probe, expected_logits, saved_dtype, trust_remote_code, head)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("Merged the adapter into %s (%s)", destination.resolve(), str(saved_dtype).replace("torch.", ""))
    return destination


def _copy_tokenizer_files(source: Path, destination: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(path, destination / path.name)


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False, head: str = CAUSAL_LM) -> PreTrainedModel:
    """The architecture of `config` (with `head`) on the meta device: its parameters' names and shapes, no memory."""
    with torch.device("meta"):
        return auto_model_class(head).from_config(config, trust_remote_code=trust_remote_code)


def merge_tolerance(dtype: torch.dtype) -> float:
    """Bound on the relative norm of the logit difference between the merged model and the adapter model.

    The merge computes `W + s * B @ A` once, in float32, then rounds each weight to the saved dtype: every weight
    then carries one rounding of relative size eps(dtype) / 2 against the unmerged model, whose error reaches the
    logits through a few layers without growing much more (each layer's output is a sum of many independently
    rounded terms, so the relative errors average). 8 eps leaves room for that depth; float32 keeps a floor of
    1e-5 for the order in which the merged and unmerged models add their float32 products.
    """
    return max(8 * torch.finfo(dtype).eps, 1e-5)


@torch.no_grad()
def check_merged(
    merged_dir: Path,
    base_config: PretrainedConfig,
    probe: dict[str, torch.Tensor],
    expected_logits: torch.Tensor,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    head: str = CAUSAL_LM,
) -> None:
    """The merged model reloads with the base architecture's parameter names and shapes (from its config, on the
    meta device: no weights) and the adapter model's logits on `probe` within `merge_tolerance(dtype)`."""
    skeleton = meta_model(base_config, trust_remote_code, head)
    base_shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    merged = auto_model_class(head).from_pretrained(
        merged_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    merged_shapes = {name: tuple(p.shape) for name, p in merged.named_parameters()}
    if merged_shapes != base_shapes:
        differ = sorted(set(merged_shapes.items()) ^ set(base_shapes.items()))[:5]
        raise RuntimeError(f"the merged model in {merged_dir} does not have the base's parameters: {differ}")
    got = merged.eval()(**probe).logits.double()
    expected = expected_logits.double()
    error = float((got - expected).norm() / expected.norm())
    if not error <= merge_tolerance(dtype):
        raise RuntimeError(
            f"the merged model's logits differ from the adapter model's by {error:.2e} (relative norm), over the "
            f"{merge_tolerance(dtype):.1e} a {str(dtype).replace('torch.', '')} merge allows"
        )
    logger.info("Checked the merged model: the base's names and shapes, logits %.1e from the adapter model's", error)
