"""Raw text for continued pre-training: documents read with their `file:line`, closed with the end-of-text token and
cut into samples (`data.pretrain_blocks`), every token labelled; packed documents never attend to each other."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from config.schema import SAMPLE_BY, DataConfig, load_run_config
from config.sources import SourceSpec
from core.keys import IGNORE_INDEX, INPUT_IDS_KEY, LABELS_KEY, ORIGIN_KEY, SOURCE_ID_KEY
from data_pipeline.packing import PaddingFreeCollator
from data_pipeline.prepare import build_datasets, load_canonical, main, prepare_dataset
from data_pipeline.sources import DataFormatError, iter_raw_records
from data_pipeline.stats import STATS_FILE, DatasetStats
from data_pipeline.text import cut_into_blocks, iter_blocks
from tests.helpers import REPO_ROOT, VOCAB, data_config, float64_dft_sum, tiny_qwen2

DOCUMENTS = [
    "The first document is short.",
    "A second one, a little longer than the first, with a comma and a full stop.",
    "Third.",
    "The fourth document goes on for a while: it has several sentences. Each of them adds tokens. "
    "By the end it is longer than the blocks these tests cut, so it cannot fit in one of them.",
]
# LLaMA-Factory's pre-training samples (its PyPI sdist's data/ directory; see the README there).
LLAMAFACTORY_DATA = Path(__file__).parent / "llamafactory"


def write_documents(path: Path, documents: list[str], field: str = "text", **extra: object) -> Path:
    path.write_text("".join(json.dumps({field: text, **extra}) + "\n" for text in documents), encoding="utf-8")
    return path


def encoded(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A document as the pipeline encodes it: the tokenizer's own encoding, closed with the end-of-text token."""
    return [*tokenizer(text)[INPUT_IDS_KEY], tokenizer.eos_token_id]


def text_data(sources: list, **overrides: object) -> DataConfig:
    """`data.*` of raw-text sources (`format: text`, as training.objective=pretrain makes them), in memory."""
    return data_config([{"format": "text", **({"path": s} if isinstance(s, str) else s)} for s in sources], **overrides)


# --- Reading documents ------------------------------------------------------------------------------------------


def test_a_txt_file_read_as_one_document_and_records_give_their_text_field(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("Line one of the notes.\n\nA second paragraph, same document.\n", encoding="utf-8")
    (tmp_path / "more.txt.gz").write_bytes(gzip.compress(b"A gzipped document."))
    records = write_documents(tmp_path / "docs.jsonl", DOCUMENTS[:2], field="body", id=7)
    data = text_data(
        [str(notes), {"path": str(records), "fields": {"text": "body"}}, str(tmp_path / "more.txt.gz")],
        max_length=512,
        sample_by="document",
    )
    train, validation, stats = build_datasets(data, chatml_tokenizer, seed=0)
    assert validation is None
    texts = [notes.read_text(encoding="utf-8"), *DOCUMENTS[:2], "A gzipped document."]
    assert sorted(map(tuple, train[INPUT_IDS_KEY])) == sorted(tuple(encoded(chatml_tokenizer, t)) for t in texts)
    assert train[LABELS_KEY] == train[INPUT_IDS_KEY]  # every token trained
    assert sorted(train[ORIGIN_KEY]) == sorted(
        [f"{notes}:1", f"{records}:1", f"{records}:2", f"{tmp_path / 'more.txt.gz'}:1"]
    )
    per_source = stats.sources[str(records)]
    assert (per_source.records, per_source.kept, per_source.samples) == (2, 2, 2)
    assert per_source.dropped_columns == {"id": 2}
    assert (
        per_source.tokens
        == per_source.trainable_tokens
        == sum(len(encoded(chatml_tokenizer, t)) for t in DOCUMENTS[:2])
    )
    assert stats.pretrain_blocks == "packed"


def test_a_directory_of_text_reads_its_txt_files(tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    for index, text in enumerate(DOCUMENTS):
        (tmp_path / f"{index}.txt").write_text(text, encoding="utf-8")
    data = text_data([{"path": str(tmp_path)}], max_length=512, sample_by="document")
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    assert len(train) == len(DOCUMENTS) == len(stats.sources)


BAD_TEXT_RECORDS = [
    ("missing_field", b'{"body": "no text field"}', "missing field 'text'"),
    ("bad_text", b'{"text": ["a", "list"]}', "'text' must be a string"),
    ("empty_text", b'{"text": "  \\n "}', "empty document"),
    ("not_an_object", b'"a bare string"', "must be a JSON object"),
    ("invalid_json", b'{"text": "unclosed', "invalid JSON"),
]


@pytest.mark.parametrize(("reason", "line", "problem"), BAD_TEXT_RECORDS)
def test_a_bad_text_record_stops_the_run_with_its_file_and_line(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase, reason: str, line: bytes, problem: str
) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataFormatError, match=f"{path}:2: .*{problem}") as raised:
        build_datasets(text_data([str(path)]), chatml_tokenizer, seed=0)
    assert raised.value.reason == reason


def test_bad_text_is_counted_under_skip_and_a_txt_file_names_the_line_of_a_bad_byte(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"line one\n\nline three\ncaf\xe9 on line four\n")
    for sample_by in SAMPLE_BY:  # the bad byte's line of the file, whichever line its document starts at
        with pytest.raises(DataFormatError, match=f"{broken}:4: invalid UTF-8"):
            build_datasets(text_data([str(broken)], sample_by=sample_by), chatml_tokenizer, seed=0)

    path = tmp_path / "docs.jsonl"
    path.write_bytes(
        json.dumps({"text": "fine"}).encode() + b"\n" + b"\n".join(line for _, line, _ in BAD_TEXT_RECORDS)
    )
    train, _, stats = build_datasets(text_data([str(path)], on_error="skip"), chatml_tokenizer, seed=0)
    source = stats.sources[str(path)]
    assert len(train) == source.kept == 1
    assert source.dropped == {reason: 1 for reason, _, _ in BAD_TEXT_RECORDS}
    assert source.kept + sum(source.dropped.values()) == source.records == 1 + len(BAD_TEXT_RECORDS)


# --- .txt files as datasets' text loader reads them --------------------------------------------------------------

# Blank lines, whitespace-only lines, a run of three line breaks, CRLF and a lone CR, no final line break: every case
# where line, paragraph and document reading differ.
ODD_TEXT = (
    b"Title line\r\n\r\nFirst paragraph, line one.\nLine two.\n\n\nSecond paragraph after three breaks.\n"
    b"   \n\nThird\rparagraph with a lone CR.\n\n\t\n\nLast line, no final break"
)


def datasets_rows(path: Path, sample_by: str, cache_dir: Path) -> list[str]:
    from datasets import load_dataset

    return load_dataset("text", data_files=str(path), sample_by=sample_by, split="train", cache_dir=str(cache_dir))[
        "text"
    ]


@pytest.mark.parametrize("sample_by", SAMPLE_BY)
def test_txt_documents_are_the_rows_of_datasets_text_loader_less_the_blank_ones(tmp_path: Path, sample_by: str) -> None:
    path = tmp_path / "odd.txt"
    path.write_bytes(ODD_TEXT)
    rows = datasets_rows(path, sample_by, tmp_path / "hf")
    read = list(iter_raw_records(path, sample_by))
    assert len(read) == len(rows)  # one record per row of datasets, in its order
    assert [raw.decode() for _, raw in read if raw is not None] == [row for row in rows if row.strip()]
    blank = sum(raw is None for _, raw in read)
    assert blank == sum(not row.strip() for row in rows) and (blank > 0) == (sample_by != "document")
    lines = ODD_TEXT.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    for line, raw in read:  # each document starts on the line it is named by
        if raw is not None:
            assert lines[line - 1].startswith(raw.split(b"\n")[0])

    canonical, stats = load_canonical([SourceSpec(str(path), format="text")], sample_by=sample_by)
    source = stats.sources[str(path)]
    # Blank rows are records of the report, counted and left out: nothing disappears uncounted.
    assert (source.records, len(canonical), source.dropped.get("blank_row", 0)) == (len(rows), len(rows) - blank, blank)


def test_llamafactory_wiki_demo_is_thirty_articles_per_line_and_c4_demo_its_records(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    wiki = tmp_path / "wiki_demo.txt"
    wiki.write_bytes(gzip.decompress((LLAMAFACTORY_DATA / "wiki_demo.txt.gz").read_bytes()))
    c4 = tmp_path / "c4_demo.jsonl"
    c4.write_bytes(gzip.decompress((LLAMAFACTORY_DATA / "c4_demo.jsonl.gz").read_bytes()))
    for path, documents in ((wiki, 30), (c4, 300)):
        train, _, stats = build_datasets(text_data([str(path)], max_length=512), chatml_tokenizer, seed=0)
        source = stats.sources[str(path)]
        assert source.records == source.kept == documents and not source.dropped
        # Every document ends with its own end-of-text token: as many as documents (none inside a document here).
        eos = sum(ids.count(chatml_tokenizer.eos_token_id) for ids in train[INPUT_IDS_KEY])
        assert eos == documents
        assert {origin.rsplit(":", 1)[1] for origin in train[ORIGIN_KEY]} == {str(i) for i in range(1, documents + 1)}
    assert len(datasets_rows(wiki, "line", tmp_path / "hf")) == 30
    # Read whole, as the project read every .txt before `data.sample_by`, the articles become one document.
    _, _, whole = build_datasets(text_data([str(wiki)], sample_by="document"), chatml_tokenizer, seed=0)
    assert whole.sources[str(wiki)].records == 1


# --- Blocks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [16, 23])
def test_concat_blocks_are_exactly_max_length_with_the_end_of_text_token_between_documents(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase, max_length: int
) -> None:
    path = write_documents(tmp_path / "docs.jsonl", DOCUMENTS)
    data = text_data([str(path)], max_length=max_length, pretrain_blocks="concat")
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    stream = [token for text in DOCUMENTS for token in encoded(chatml_tokenizer, text)]
    blocks = train[INPUT_IDS_KEY]
    # The prepared set is in document order here (no split, no weight): the blocks are the stream, cut.
    assert [token for block in blocks for token in block] == stream
    assert all(len(block) == max_length for block in blocks[:-1])
    assert 0 < len(blocks[-1]) <= max_length
    assert stats.short_blocks == int(len(stream) % max_length != 0)
    assert train[LABELS_KEY] == blocks and IGNORE_INDEX not in sum(train[LABELS_KEY], [])
    # Each block is named by the document its first token belongs to.
    starts = np.cumsum([0] + [len(encoded(chatml_tokenizer, text)) for text in DOCUMENTS])
    first_documents = np.searchsorted(starts, np.arange(len(blocks)) * max_length, side="right")
    assert train[ORIGIN_KEY] == [f"{path}:{document}" for document in first_documents]
    assert stats.sources[str(path)].samples == len(blocks) == stats.train_samples


def test_packed_documents_are_one_sample_each_and_a_longer_one_is_cut_into_pieces(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write_documents(tmp_path / "docs.jsonl", DOCUMENTS)
    max_length = 24
    train, _, stats = build_datasets(text_data([str(path)], max_length=max_length), chatml_tokenizer, seed=0)
    expected = []
    for text in DOCUMENTS:
        ids = encoded(chatml_tokenizer, text)
        expected += [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    assert train[INPUT_IDS_KEY] == expected  # nothing dropped, every piece its own sample, in order
    assert train[LABELS_KEY] == expected
    long_documents = sum(len(encoded(chatml_tokenizer, text)) > max_length for text in DOCUMENTS)
    assert long_documents >= 1 and stats.sources[str(path)].split_documents == long_documents
    assert stats.short_blocks == 0 and "pretrain_blocks=packed" in stats.summary()


def test_the_split_is_by_document_and_weights_repeat_training_documents_only(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write_documents(tmp_path / "docs.jsonl", [f"Document number {i} of forty." for i in range(40)])
    data = text_data([{"path": str(path), "weight": 2}], max_length=512, validation_split_percentage=10)
    train, validation, stats = build_datasets(data, chatml_tokenizer, seed=0)
    train_origins, validation_origins = set(train[ORIGIN_KEY]), set(validation[ORIGIN_KEY])
    assert len(validation) == len(validation_origins) == 4 and not train_origins & validation_origins
    assert len(train) == 2 * len(train_origins) == 72
    assert stats.sources[str(path)].samples == len(train) + len(validation)
    assert stats.validation_split == "documents" and "drawn from documents" in stats.summary()


@pytest.mark.parametrize("pretrain_blocks", ["packed", "concat"])
def test_a_single_long_document_gets_its_validation_share_from_its_blocks(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase, pretrain_blocks: str
) -> None:
    # One document too few for a 5% share (0.05 of a document): before, the split of documents left training empty.
    book = tmp_path / "book.txt"
    book.write_text("\n".join(f"Line {i} of the book, a few words long." for i in range(400)), encoding="utf-8")
    data = text_data(
        [{"path": str(book), "weight": 2}],
        max_length=32,
        sample_by="document",
        validation_split_percentage=5,
        pretrain_blocks=pretrain_blocks,
    )
    train, validation, stats = build_datasets(data, chatml_tokenizer, seed=0)
    blocks = len(train) // 2 + len(validation)
    assert blocks > 100 and len(validation) == math.ceil(0.05 * blocks)  # train_test_split's rounding
    assert len(train) == 2 * (blocks - len(validation))  # the weight repeats training blocks only
    assert not {tuple(ids) for ids in validation[INPUT_IDS_KEY]} & {tuple(ids) for ids in train[INPUT_IDS_KEY]}
    assert stats.validation_split == "blocks" and f"validation samples: {len(validation)} (drawn from blocks)" in (
        stats.summary()
    )


def test_data_too_small_to_hold_out_trains_without_a_validation_set(
    tmp_path: Path, chatml_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    note = tmp_path / "note.txt"
    note.write_text("One short note.", encoding="utf-8")
    train, validation, stats = build_datasets(
        text_data([str(note)], validation_split_percentage=5), chatml_tokenizer, seed=0
    )
    assert len(train) == 1 and validation is None and stats.validation_split is None
    assert "leaves nothing to train on, so there is no validation set" in caplog.text


@pytest.mark.parametrize("mode", ["packed", "concat"])
def test_blocks_cut_a_batch_of_documents_at_a_time_are_those_of_the_whole_stream(mode: str) -> None:
    # Preparation cuts a part's documents batch by batch (memory holds a batch, not the part): under concat a
    # batch's last, incomplete block must open the next batch's stream, as if the part were cut at once.
    generator = np.random.default_rng(0)
    lengths = generator.integers(1, 40, size=25)
    table = pa.table(
        {
            INPUT_IDS_KEY: pa.array(
                [generator.integers(3, VOCAB, size=n).tolist() for n in lengths], pa.list_(pa.int32())
            ),
            SOURCE_ID_KEY: pa.array(generator.integers(0, 3, size=len(lengths)), pa.int32()),
            ORIGIN_KEY: pa.array([f"docs.jsonl:{i + 1}" for i in range(len(lengths))]),
        }
    )
    whole, short_blocks = cut_into_blocks(table, 16, mode)
    pieces = list(iter_blocks((table.slice(start, 4) for start in range(0, len(lengths), 4)), 16, mode))
    assert len(pieces) > 6  # several batches, each cut on its own
    assert pa.concat_tables([blocks for blocks, _ in pieces]).to_pylist() == whole.to_pylist()
    assert sum(short for _, short in pieces) == short_blocks == (mode == "concat" and int(sum(lengths) % 16 != 0))


# --- Packed documents do not attend to each other ---------------------------------------------------------------


def packed_samples(lengths: list[int], max_length: int) -> list[dict[str, list[int]]]:
    """Documents of random token ids (below the tiny model's vocabulary), as packed samples."""
    generator = np.random.default_rng(0)
    documents = [generator.integers(3, VOCAB, size=length).tolist() for length in lengths]
    table = pa.table(
        {
            INPUT_IDS_KEY: pa.array(documents, pa.list_(pa.int32())),
            SOURCE_ID_KEY: pa.array([0] * len(documents), pa.int32()),
            ORIGIN_KEY: pa.array([f"docs.jsonl:{i + 1}" for i in range(len(documents))]),
        }
    )
    blocks, _ = cut_into_blocks(table, max_length, "packed")
    return [{key: row[key] for key in (INPUT_IDS_KEY, LABELS_KEY)} for row in blocks.to_pylist()]


def test_a_packed_micro_batch_has_the_loss_of_each_document_alone() -> None:
    # 4 documents and a 5th longer than max_length, cut in 2: 6 samples in one padding-free row.
    samples = packed_samples([9, 17, 5, 30, 12], max_length=20)
    assert [len(s[INPUT_IDS_KEY]) for s in samples] == [9, 17, 5, 20, 10, 12]
    model = tiny_qwen2(seed=0).double().eval()
    batch = PaddingFreeCollator()(samples)
    labels = batch["labels"]
    # Every token is predicted but each sample's first: the collator's IGNORE_INDEX keeps a sample's last token from
    # predicting the next sample's first.
    assert int((labels[0, 1:] != IGNORE_INDEX).sum()) == sum(len(s[LABELS_KEY]) - 1 for s in samples)

    def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return float64_dft_sum(logits, labels, alpha=0.0)[0]  # alpha 0: every weight 1, plain cross-entropy

    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        alone = [model(input_ids=torch.tensor([s[INPUT_IDS_KEY]]), use_cache=False) for s in samples]
        concatenated = model(input_ids=batch["input_ids"], use_cache=False)  # one sequence: attention crosses
    num_items = int((labels[0, 1:] != IGNORE_INDEX).sum())
    packed_loss = cross_entropy_sum(packed.logits, labels) / num_items
    alone_loss = (
        sum(cross_entropy_sum(out.logits, torch.tensor([s[LABELS_KEY]])) for out, s in zip(alone, samples, strict=True))
        / num_items
    )
    # float64 on both sides: the same products summed in another blocking, rounding ~1e-16 relative per operation
    # over a few hundred terms; 1e-12 is far above that and far below any leak of attention between samples.
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(packed.logits[0], torch.cat([out.logits[0] for out in alone]), rtol=1e-12, atol=1e-12)
    # The check can fail: without restarting positions the samples attend to each other and every logit after the
    # first sample moves (measured: the loss by 1.5e-5 relative, as a random tiny model attends almost uniformly; far
    # above the float64 bound above).
    leaked = cross_entropy_sum(concatenated.logits, labels) / num_items
    assert abs(float(leaked - packed_loss)) > 1e-8 * float(packed_loss)
    assert not torch.allclose(concatenated.logits[0, 9:], packed.logits[0, 9:], rtol=1e-8, atol=0)


# --- Preparation command and cache ------------------------------------------------------------------------------


def test_prepare_command_and_cache_serve_pretrain_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], chatml_tokenizer: PreTrainedTokenizerBase
) -> None:
    overrides = ["experiment=pretrain_demo", f"data.cache_dir={tmp_path / 'cache'}"]
    main(overrides)
    lines = capsys.readouterr().out.strip().splitlines()
    directory = Path(lines[-1])
    assert lines[-2] == "built" and "letters_notes.txt" in "\n".join(lines)
    stats = DatasetStats.load(directory)
    assert stats.pretrain_blocks == "packed" and (directory / STATS_FILE).is_file()
    for source in stats.sources.values():
        assert source.kept + sum(source.dropped.values()) == source.records
        assert source.tokens == source.trainable_tokens > 0
    main(overrides)
    assert capsys.readouterr().out.strip().splitlines()[-2] == "reused (already prepared)"

    # The block mode is part of the cache key: concat is prepared into another directory.
    concat = load_run_config([*overrides, "data.pretrain_blocks=concat"])
    concat_directory, built = prepare_dataset(concat.data, chatml_tokenizer, concat.training.seed)
    assert built and concat_directory != directory
    assert DatasetStats.load(concat_directory).pretrain_blocks == "concat"


def test_the_bundled_sample_is_read_with_nothing_dropped(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    run = load_run_config(["experiment=pretrain_demo", "data.cache_dir=null"])
    assert [spec.format for spec in run.data.specs] == ["text", "text"]
    assert all((REPO_ROOT / spec.path).is_file() for spec in run.data.specs)
    train, validation, stats = build_datasets(run.data, chatml_tokenizer, run.training.seed)
    assert all(not s.dropped and s.kept == s.records for s in stats.sources.values())
    assert max(len(ids) for ids in [*train[INPUT_IDS_KEY], *validation[INPUT_IDS_KEY]]) <= run.data.max_length
