"""Padding-free packing: the samples of a micro-batch concatenated into one row, each attending only to itself.

`data.packing=true` swaps the padding collator for `PaddingFreeCollator`, a `DataCollatorWithFlattening`
(transformers) that writes the micro-batch as one `[1, total_tokens]` row with no padding token:

- `position_ids` restart at 0 for every sample. With no `attention_mask`, transformers' mask builder
  (`masking_utils._preprocess_mask_arguments`, 5.x) reads the restarts as sample boundaries and builds a
  block-diagonal causal mask for sdpa, eager and flex attention; FlashAttention-2 takes the same boundaries
  through its variable-length path. No token attends to another sample.
- The first label of every sample becomes `IGNORE_INDEX`: after the loss's shift, the last token of one
  sample is never trained to predict the first token of the next. The number of trainable tokens (over
  `labels[..., 1:]`) is unchanged, so the DFT normalisation by `num_items_in_batch` stays exact.
- `use_cache=False` is passed to the model: the mask builder looks for packed samples only when no KV cache
  is given, and a model whose config has `use_cache=True` (the Trainer sets it from `training.use_cache`)
  makes itself an empty cache in its forward, which silently lets each sample attend to those before it.
"""

from __future__ import annotations

from typing import Any

from transformers import DataCollatorWithFlattening

from dft.loss import IGNORE_INDEX

USE_CACHE_KEY = "use_cache"


class PaddingFreeCollator(DataCollatorWithFlattening):
    """`DataCollatorWithFlattening` with `IGNORE_INDEX` between samples and the model's KV cache turned off."""

    def __init__(self, return_flash_attn_kwargs: bool = False) -> None:
        """Args:
        return_flash_attn_kwargs: also give FlashAttention-2's `cu_seq_lens_*`/`max_length_*` (it derives
            them from `position_ids` otherwise).
        """
        super().__init__(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=return_flash_attn_kwargs
        )

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        # Keep only what the flattened row needs: a per-sample attention_mask would switch packing detection off.
        features = [{key: f[key] for key in ("input_ids", "labels") if key in f} for f in features]
        batch = super().__call__(features, return_tensors=return_tensors)
        batch[USE_CACHE_KEY] = False
        return batch
