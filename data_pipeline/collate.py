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
flattened), so the wrapper depends on neither collator's internals. Around `PairCollator` (preference pairs) the
`source_ids` are per pair, a LongTensor of length B.

`PairCollator` batches B preference pairs (`data_pipeline.pairs`) into 2B right-padded rows: rows 0..B-1 are the
chosen sequences, B..2B-1 the rejected ones, in the same order, so pair i is rows i and B + i.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from core.keys import (
    ATTENTION_MASK_KEY,
    CHOSEN_INPUT_IDS_KEY,
    CHOSEN_LABELS_KEY,
    IGNORE_INDEX,
    INPUT_IDS_KEY,
    LABELS_KEY,
    ORIGIN_KEY,
    ORIGINS_KEY,
    PAIR_SEQUENCE_KEYS,
    REFERENCE_LOGPS_KEY,
    REJECTED_INPUT_IDS_KEY,
    REJECTED_LABELS_KEY,
    SOURCE_ID_KEY,
    SOURCE_IDS_KEY,
)

# The sample columns `SampleIdCollator` takes out of each feature before the wrapped collator runs.
SAMPLE_COLUMNS = (SOURCE_ID_KEY, ORIGIN_KEY)


class SampleIdCollator:
    """Runs `collator` on the model inputs and adds per-token `source_ids` and per-sample `origins`.

    `dataset_columns` names the dataset columns it reads besides the model inputs, the wrapped collator's own
    `dataset_columns` included: `DFTTrainer` keeps them through `remove_unused_columns`.
    """

    dataset_columns: tuple[str, ...] = SAMPLE_COLUMNS

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.collator = collator
        self.dataset_columns = (*SAMPLE_COLUMNS, *getattr(collator, "dataset_columns", ()))

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        model_features = [{k: v for k, v in f.items() if k not in SAMPLE_COLUMNS} for f in features]
        batch = self.collator(model_features)
        if features and SOURCE_ID_KEY in features[0] and CHOSEN_INPUT_IDS_KEY in features[0]:
            batch[SOURCE_IDS_KEY] = torch.tensor([int(f[SOURCE_ID_KEY]) for f in features], dtype=torch.long)
        elif features and SOURCE_ID_KEY in features[0]:
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


class PairCollator:
    """B preference pairs into `input_ids`, `attention_mask` and `labels` of shape [2B, L]: the chosen sequences in
    rows 0..B-1, the rejected ones in rows B..2B-1 (same order), right-padded to the longest of the 2B with the
    tokenizer's pad token (labels `IGNORE_INDEX`, attention 0 on padding).

    `dataset_columns` names the pair columns it reads, which are not model inputs: `DFTTrainer` keeps them through
    `remove_unused_columns`. Pairs with precomputed reference log-probabilities (DPO's
    `preference.precompute_reference`) give them as `reference_logps`, `[2B]` in the rows' order.
    """

    dataset_columns = (*PAIR_SEQUENCE_KEYS, REFERENCE_LOGPS_KEY)

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no pad token: preference pairs are padded side by side; set one "
                "(the run's tokenizer loader does, data_pipeline.templates.load_chat_tokenizer)"
            )
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [(f[CHOSEN_INPUT_IDS_KEY], f[CHOSEN_LABELS_KEY]) for f in features] + [
            (f[REJECTED_INPUT_IDS_KEY], f[REJECTED_LABELS_KEY]) for f in features
        ]
        width = max(len(ids) for ids, _ in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.as_tensor(row_labels, dtype=torch.long)
        batch = {INPUT_IDS_KEY: input_ids, ATTENTION_MASK_KEY: attention_mask, LABELS_KEY: labels}
        if features and REFERENCE_LOGPS_KEY in features[0]:
            logps = torch.tensor([f[REFERENCE_LOGPS_KEY] for f in features], dtype=torch.float32)  # [B, 2]
            batch[REFERENCE_LOGPS_KEY] = torch.cat([logps[:, 0], logps[:, 1]])
        return batch
