"""Sample ids through the collator: the source of every token and the record of every row.

`SampleIdCollator` wraps the padding collator (`DataCollatorForSeq2Seq`) or the padding-free one
(`PaddingFreeCollator`). It takes each feature's `source_id` and `origin` (written by `data_pipeline.prepare`)
out before the wrapped collator runs, since neither pads a string nor knows these columns, and adds to the
batch the keys that `DFTTrainer.compute_loss` pops before the model call:

- `source_ids`: a LongTensor shaped like `labels`, the source (index into the prepared data's
  `stats.sources`) of each token. A padded row carries its sample's id over its whole width, padding
  included (padding labels are ignored, so its id is never counted); a flattened row carries each
  sample's id over that sample's tokens.
- `origins`: the `file:line` of each sample, a plain list of str (not a tensor).

The layout is read from the batch the wrapped collator returns (`[samples, seq]` padded or `[1, tokens]`
flattened), so the wrapper depends on neither collator's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from core.keys import INPUT_IDS_KEY, LABELS_KEY, ORIGIN_KEY, ORIGINS_KEY, SOURCE_ID_KEY, SOURCE_IDS_KEY


class SampleIdCollator:
    """Runs `collator` on the model inputs and adds per-token `source_ids` and per-sample `origins`.

    `dataset_columns` names the dataset columns it reads besides the model inputs: `DFTTrainer` keeps them
    through `remove_unused_columns`.
    """

    dataset_columns = (SOURCE_ID_KEY, ORIGIN_KEY)

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        model_features = [{k: v for k, v in f.items() if k not in self.dataset_columns} for f in features]
        batch = self.collator(model_features)
        if features and SOURCE_ID_KEY in features[0]:
            lengths = [len(f[INPUT_IDS_KEY]) for f in features]
            source_ids = [int(f[SOURCE_ID_KEY]) for f in features]
            batch[SOURCE_IDS_KEY] = token_source_ids(source_ids, lengths, tuple(batch[LABELS_KEY].shape))
        if features and ORIGIN_KEY in features[0]:
            batch[ORIGINS_KEY] = [str(f[ORIGIN_KEY]) for f in features]
        return batch


def token_source_ids(source_ids: list[int], lengths: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The source of every position of a `shape` (`labels`') batch built from samples of these lengths.

    Raises:
        ValueError: `shape` is neither one padded row per sample nor one flattened row of all their tokens.
    """
    ids = torch.tensor(source_ids, dtype=torch.long)
    if len(shape) == 2 and shape[0] == len(source_ids):
        return ids[:, None].expand(shape).contiguous()
    if len(shape) == 2 and shape == (1, sum(lengths)):
        # Empty samples (dropped by DataCollatorWithFlattening) repeat 0 times, so the two stay aligned.
        return torch.repeat_interleave(ids, torch.tensor(lengths)).unsqueeze(0)
    raise ValueError(
        f"labels of shape {shape} from {len(source_ids)} samples of {sum(lengths)} tokens: expected one padded "
        f"row per sample or one flattened row; SampleIdCollator supports DataCollatorForSeq2Seq-style padding "
        "and DataCollatorWithFlattening"
    )
