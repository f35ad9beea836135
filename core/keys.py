"""Column and batch key names shared by the data side, the loss and evaluation, so that none imports another for them.

The data pipeline writes these columns and batch keys; the Trainer pops the sample keys before the model call.
"""

from __future__ import annotations

# Label of a position that is not trained (padding, prompts, truncated turns): the value the Hugging Face
# losses and collators already ignore.
IGNORE_INDEX = -100

# Model inputs of a prepared sample.
INPUT_IDS_KEY, ATTENTION_MASK_KEY, LABELS_KEY = "input_ids", "attention_mask", "labels"
# Carried beside the model inputs in the prepared data: which source (its index in `stats.sources`, the order of
# `data.sources`) and which record (`file:line`) each sample is.
SOURCE_ID_KEY, ORIGIN_KEY = "source_id", "origin"
# Batch keys beside the model inputs (written by the collator, popped before the model call): per-token source
# ids shaped like `labels`, and each sample's `file:line` as a list of str.
SOURCE_IDS_KEY, ORIGINS_KEY = "source_ids", "origins"
SAMPLE_BATCH_KEYS = (SOURCE_IDS_KEY, ORIGINS_KEY)
# Preference pairs (`data_pipeline.pairs`): each prepared row holds its chosen and its rejected sequence, and
# `length`, the longer of the two (the Trainer's `length_column_name` default, for length grouping).
CHOSEN_INPUT_IDS_KEY, CHOSEN_LABELS_KEY = "chosen_input_ids", "chosen_labels"
REJECTED_INPUT_IDS_KEY, REJECTED_LABELS_KEY = "rejected_input_ids", "rejected_labels"
LENGTH_KEY = "length"
PAIR_SEQUENCE_KEYS = (CHOSEN_INPUT_IDS_KEY, CHOSEN_LABELS_KEY, REJECTED_INPUT_IDS_KEY, REJECTED_LABELS_KEY)
# DPO's reference log-probabilities of a pair when computed once before training (`preference.precompute_reference`):
# a column of [chosen, rejected] per pair, and a batch key of [2B] (the chosen first, as the rows).
REFERENCE_LOGPS_KEY = "reference_logps"
