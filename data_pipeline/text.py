"""Raw text for continued pre-training (`training.objective=pretrain`): documents into samples of at most
`data.max_length` tokens, every token labelled.

A document (a `.txt` file, or a record's `text` field: `data_pipeline.schema.to_text`) is encoded as the tokenizer
encodes any text (with its BOS where it writes one, as Llama's does) and closed with the end-of-text token
(`eos_token`), so the model learns where a document ends. `data.pretrain_blocks` then says how documents become
samples:

- `packed` (default): each document is a sample; one longer than `max_length` is cut into `max_length` pieces, each
  its own sample (the last one shorter), so nothing is dropped. `data.packing` null resolves to on: a micro-batch is
  one padding-free row whose position ids restart at every sample, so no token attends to another document, and
  the loss of a packed micro-batch is the sum of each document's loss alone.
- `concat`: the documents of a split, in order, joined into one stream and cut into blocks of exactly
  `max_length` tokens, as transformers' `run_clm.py` (`group_texts`) does; attention crosses the documents of a
  block, their end-of-text tokens between them. The stream's last block keeps the remainder, shorter, rather than
  dropping it (counted as `short_blocks` in stats.json). A block is attributed to the source and record (`origin`)
  of its first token, for per-source metrics and for naming a bad step's samples.

Labels are the input ids: the loss covers every token a sample can predict (all but its first).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from config.schema import PRETRAIN_BLOCKS
from core.keys import ATTENTION_MASK_KEY, INPUT_IDS_KEY, LABELS_KEY
from data_pipeline.schema import TEXT_KEY

PRETRAIN_BLOCKS_PACKED, PRETRAIN_BLOCKS_CONCAT = PRETRAIN_BLOCKS


def end_of_text_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes every document.

    Raises:
        ValueError: the tokenizer has no `eos_token`.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no eos_token: raw-text documents are closed with it so the model learns "
            "where one ends; load a tokenizer that has one (model.tokenizer_name_or_path)"
        )
    return tokenizer.eos_token_id


def encode_documents(batch: pa.Table, tokenizer: PreTrainedTokenizerBase) -> pa.Table:
    """One Arrow batch of documents: each row's `text` replaced by its `input_ids`, closed by the
    end-of-text token (not twice where the tokenizer writes it itself). The other columns pass through."""
    eos = end_of_text_id(tokenizer)
    # verbose=False: a long document is cut into blocks later, not an over-long model input to warn about.
    texts = batch.column(TEXT_KEY).to_pylist()
    encoded = tokenizer(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)
    documents = [ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded[INPUT_IDS_KEY]]
    return batch.drop_columns([TEXT_KEY]).append_column(INPUT_IDS_KEY, pa.array(documents, pa.list_(pa.int32())))


def cut_into_blocks(documents: pa.Table, max_length: int, mode: str) -> tuple[pa.Table, int]:
    """Samples of at most `max_length` tokens from encoded documents, as `mode` (`data.pretrain_blocks`) says.

    Args:
        documents: `input_ids` (each document, end-of-text included) and any other per-document columns (`source_id`,
            `origin`, ...), in the order they are joined.
        max_length: tokens per sample at most (`data.max_length`).
        mode: `packed` (one sample per document, a longer one cut into pieces) or `concat` (one stream cut into
            `max_length` blocks).

    Returns:
        The samples (`input_ids`, `attention_mask`, `labels`, and each other column of `documents` taken from the
        document of the sample's first token) and the number of samples shorter than `max_length` in a `concat`
        stream (its last block; 0 when it divides evenly, and for `packed`).
    """
    ids = documents.column(INPUT_IDS_KEY).combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy().astype(np.int64)
    tokens = pc.list_flatten(ids).to_numpy()
    doc_starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(doc_starts[-1])
    if mode == PRETRAIN_BLOCKS_PACKED:
        pieces = -(-lengths // max_length)
        first_piece = np.concatenate([[0], np.cumsum(pieces)])[:-1]
        document_of = np.repeat(np.arange(len(lengths)), pieces)
        starts = doc_starts[document_of] + (np.arange(len(document_of)) - first_piece[document_of]) * max_length
        short_blocks = 0
    elif mode == PRETRAIN_BLOCKS_CONCAT:
        starts = np.arange(0, total, max_length, dtype=np.int64)
        document_of = np.searchsorted(doc_starts, starts, side="right") - 1
        short_blocks = int(total % max_length != 0)
    else:
        raise ValueError(f"data.pretrain_blocks={mode!r} is not one of {list(PRETRAIN_BLOCKS)}")
    # Either way the samples tile the token stream in order: each starts where the previous one ends.
    offsets = pa.array(np.append(starts, total), type=pa.int32())
    values = pa.array(tokens, type=pa.int32())
    per_document = documents.drop_columns([INPUT_IDS_KEY]).take(pa.array(document_of))
    table = pa.table(
        {
            INPUT_IDS_KEY: pa.ListArray.from_arrays(offsets, values),
            ATTENTION_MASK_KEY: pa.ListArray.from_arrays(offsets, pa.array(np.ones(total, np.int8))),
            LABELS_KEY: pa.ListArray.from_arrays(offsets, values),
            **{name: per_document.column(name) for name in per_document.column_names},
        }
    )
    return table, short_blocks


def iter_blocks(documents: Iterable[pa.Table], max_length: int, mode: str) -> Iterator[tuple[pa.Table, int]]:
    """`cut_into_blocks` over batches of documents, as if over their concatenation, a batch in memory at a time.

    Under `concat` the stream runs across batches: the tokens of a batch's last, incomplete block open the next
    batch's stream (attributed, as every block, to the document of their first token), and only the stream's very
    last block may be shorter than `max_length` (counted in the second item it is yielded with). Under `packed`
    each batch is cut on its own.
    """
    carry = None
    for batch in documents:
        if carry is not None:
            batch = pa.concat_tables([carry.select(batch.column_names).cast(batch.schema), batch])
        blocks, short_blocks = cut_into_blocks(batch, max_length, mode)
        carry = None
        if short_blocks:
            carry, blocks = blocks.slice(len(blocks) - 1), blocks.slice(0, len(blocks) - 1)
        yield blocks, 0
    if carry is not None:
        yield cut_into_blocks(carry.drop_columns([ATTENTION_MASK_KEY, LABELS_KEY]), max_length, mode)
