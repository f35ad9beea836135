"""train.py end to end: continued pre-training on the bundled raw text, then SFT from the model it saved."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from observability.artifacts import read_metrics
from tests.helpers import NO_HELDOUT, run_ok

PRETRAIN_STEPS = 12


@pytest.mark.slow
def test_pretrain_on_raw_text_then_sft_from_the_saved_model(tmp_path: Path) -> None:
    pretrained = tmp_path / "pretrain"
    run_ok(
        pretrained,
        "experiment=pretrain_demo",
        f"training.max_steps={PRETRAIN_STEPS}",
        "training.warmup_steps=2",
        "training.logging_steps=1",
        "training.eval_strategy=no",
    )
    losses = [r["loss"] for r in read_metrics(pretrained) if "loss" in r]
    assert len(losses) == PRETRAIN_STEPS
    # From the embedded base, which has seen dialogues but no prose, the loss on the notes falls by several nats in a
    # dozen steps (measured: 11.0 -> 5.9); a mean over the last 3 steps against the first 3 leaves out batch noise.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert "objective: pretrain" in (pretrained / "config.yaml").read_text()
    assert not (pretrained / "samples.md").exists()  # raw text has no prompts to answer
    AutoModelForCausalLM.from_pretrained(pretrained)
    assert AutoTokenizer.from_pretrained(pretrained).chat_template  # SFT renders dialogues with it

    tuned = tmp_path / "sft"
    run_ok(tuned, "debug=quick", f"model.name_or_path={pretrained}", NO_HELDOUT, "training.eval_strategy=no")
    log = (tuned / "logs" / "rank0.log").read_text()
    assert str(pretrained) in log and "Saved the final model" in log
    assert "objective: sft" in (tuned / "config.yaml").read_text()
    sft_losses = [r["loss"] for r in read_metrics(tuned) if "loss" in r]
    assert len(sft_losses) == 3 and all(loss > 0 for loss in sft_losses)
    AutoModelForCausalLM.from_pretrained(tuned)


def write_corpus(path: Path, lines: int = 400) -> Path:
    """A plain-text corpus as users bring one: `lines` sentences, one per line, a blank line after every 20th."""
    text = "".join(
        f"Line {i} of the corpus says that the word r s t reversed is t s r.\n" + ("\n" if i % 20 == 19 else "")
        for i in range(lines)
    )
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
def test_one_text_file_trains_with_the_default_settings(tmp_path: Path) -> None:
    # The default data settings hold out 5%: before, a .txt file was one document and the split of one document left
    # training empty ("the resulting train set will be empty").
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    run_ok(
        run,
        "training.objective=pretrain",
        f"data.sources=[{corpus}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "training.max_steps=2",
    )
    log = (run / "logs" / "rank0.log").read_text()
    # 400 lines of text, each a document (the blank line after every 20th counted and left out); 5% held out.
    assert "blank_row 20" in log
    assert "train samples: 380  validation samples: 20 (drawn from documents)" in log
    assert any("eval_loss" in record for record in read_metrics(run))


@pytest.mark.slow
def test_no_validation_share_trains_without_evaluation(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", lines=40)
    run = tmp_path / "run"
    result = run_ok(
        run,
        "training.objective=pretrain",
        f"data.sources=[{corpus}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_split_percentage=0",
        "training.max_steps=2",
        "training.logging_steps=1",
        NO_HELDOUT,
    )
    log = (run / "logs" / "rank0.log").read_text()
    assert log.count("evaluation is off") == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert not any("eval_loss" in record for record in read_metrics(run))
    assert sum("loss" in record for record in read_metrics(run)) == 2
