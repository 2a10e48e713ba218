"""Warm start: the pure merge of two state dicts, and a new Trainer started from a real
checkpoint of another (fresh optimizer, step 0, the report in its run folder)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from services.trainer.checkpoints import load_checkpoint
from services.trainer.config import TrainConfig
from services.trainer.training import Trainer
from services.trainer.warm_start import (
    IGNORED,
    NOT_IN_CHECKPOINT,
    NOT_IN_MODEL,
    WARM_START_FILE,
    WarmStartError,
    WarmStartReport,
    matches_prefix,
    merge_state_dicts,
    parse_ignore_layers,
)
from tests.conftest import make_small_config

# ------------------------------------------------------------------ the pure merge


def _skipped(report: WarmStartReport) -> dict[str, str]:
    return {item.name: item.reason for item in report.skipped}


def test_matching_weights_are_loaded_whole() -> None:
    model = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    checkpoint = {"a.weight": torch.ones(2, 3), "a.bias": torch.full((2,), 2.0)}
    merged, report = merge_state_dicts(model, checkpoint)
    assert torch.equal(merged["a.weight"], checkpoint["a.weight"])
    assert torch.equal(merged["a.bias"], checkpoint["a.bias"])
    assert report.loaded == 2 and report.skipped == [] and report.extended == []
    merged["a.bias"] += 1  # a copy: the checkpoint's tensors are left alone
    assert torch.equal(checkpoint["a.bias"], torch.full((2,), 2.0))


def test_shape_mismatch_and_missing_names_are_skipped_with_the_reason() -> None:
    model = {"decoder.projection.weight": torch.zeros(6, 4), "postnet.w": torch.zeros(1)}
    checkpoint = {"decoder.projection.weight": torch.ones(9, 4), "old.layer": torch.ones(1)}
    merged, report = merge_state_dicts(model, checkpoint)
    assert _skipped(report) == {"decoder.projection.weight": "shape (9, 4) vs (6, 4)",
                                "postnet.w": NOT_IN_CHECKPOINT, "old.layer": NOT_IN_MODEL}
    assert report.loaded == 0
    # the model keeps its own values where nothing fits, and no foreign name gets in
    assert torch.equal(merged["decoder.projection.weight"], torch.zeros(6, 4))
    assert set(merged) == set(model)


def test_ignored_prefixes_keep_the_fresh_init_and_match_whole_components() -> None:
    model = {"embedding.weight": torch.zeros(3, 2), "decoder.attention.v.weight": torch.zeros(1),
             "decoder.attention_rnn.weight_ih": torch.zeros(1)}
    checkpoint = {name: torch.ones_like(value) for name, value in model.items()}
    merged, report = merge_state_dicts(
        model, checkpoint, ["embedding", "decoder.attention", "decoder.linear_projection"])
    assert _skipped(report) == {"embedding.weight": IGNORED,
                                "decoder.attention.v.weight": IGNORED}
    assert torch.equal(merged["embedding.weight"], torch.zeros(3, 2))
    assert torch.equal(merged["decoder.attention_rnn.weight_ih"], torch.ones(1))
    assert report.unused_ignore_layers == ["decoder.linear_projection"]  # a typo, reported
    assert matches_prefix("embedding.weight", "embedding.")
    assert not matches_prefix("embedding_extra.weight", "embedding")


def test_a_smaller_symbol_embedding_fills_the_first_rows() -> None:
    fresh = torch.randn(74, 8)
    old = torch.randn(70, 8)
    merged, report = merge_state_dicts({"embedding.weight": fresh}, {"embedding.weight": old})
    assert torch.equal(merged["embedding.weight"][:70], old)
    assert torch.equal(merged["embedding.weight"][70:], fresh[70:])  # new symbols: fresh
    assert [(e.name, e.copied_rows, e.rows) for e in report.extended] == [
        ("embedding.weight", 70, 74)]
    # more rows than the table, or another width, is not the same table: skipped
    _, larger = merge_state_dicts({"embedding.weight": fresh},
                                  {"embedding.weight": torch.randn(80, 8)})
    _, wider = merge_state_dicts({"embedding.weight": fresh},
                                 {"embedding.weight": torch.randn(70, 16)})
    assert _skipped(larger) == {"embedding.weight": "shape (80, 8) vs (74, 8)"}
    assert _skipped(wider) == {"embedding.weight": "shape (70, 16) vs (74, 8)"}
    # only the symbol embedding grows; any other weight with fewer rows is a mismatch
    _, other = merge_state_dicts({"gate.weight": fresh}, {"gate.weight": old})
    assert _skipped(other) == {"gate.weight": "shape (70, 8) vs (74, 8)"}


def test_ignore_layers_are_read_from_a_comma_list() -> None:
    assert parse_ignore_layers(" embedding, decoder.projection,,") == [
        "embedding", "decoder.projection"]
    assert parse_ignore_layers(None) == []


# ------------------------------------------------------------------ a real Trainer


def _trainer(cfg: TrainConfig, corpus: Path, run_dir: Path, **kwargs) -> Trainer:
    return Trainer(cfg.model_copy(deep=True), corpus, run_dir,
                   cache_dir=corpus / ".features", progress=False, **kwargs)


def _step_and_save(trainer: Trainer) -> None:
    """One training step, then a checkpoint: weights that differ from any fresh init."""
    trainer.train_step(next(trainer._batches()))
    trainer.save_checkpoint()


@pytest.fixture(scope="module")
def source_run(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with one checkpoint, at step 1."""
    run = tmp_path_factory.mktemp("source") / "run"
    _step_and_save(_trainer(make_small_config(), small_corpus, run))
    return run


@pytest.mark.slow
def test_a_new_run_starts_from_the_checkpoints_weights_with_fresh_optimisation(
        small_corpus: Path, small_config: TrainConfig, source_run: Path, tmp_path: Path
        ) -> None:
    # A stray temp file of a live writer: reading the source must not remove it.
    stray = source_run / "checkpoints" / ".ckpt-00000010.pt.123.abc.tmp"
    stray.write_bytes(b"in flight")
    source = load_checkpoint(source_run).state["model"]
    trainer = _trainer(small_config, small_corpus, tmp_path / "new", warm_start=source_run,
                       ignore_layers=["decoder.projection"])
    assert stray.exists()
    state = trainer.model.state_dict()
    for name, value in state.items():
        if name.startswith("decoder.projection."):
            assert not torch.equal(value, source[name]), name  # fresh init, not trained
        else:
            torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)
    assert trainer.step == 0 and trainer.optimizer.state_dict()["state"] == {}
    record = json.loads((tmp_path / "new" / WARM_START_FILE).read_text())
    assert record["source_step"] == 1 and record["loaded"] == len(state) - 2
    assert {item["name"]: item["reason"] for item in record["skipped"]} == {
        "decoder.projection.weight": IGNORED, "decoder.projection.bias": IGNORED}
    trainer.evaluate()
    assert trainer.summary("max_steps", 0.0)["warm_start"] == record


@pytest.mark.slow
def test_a_checkpoint_from_before_new_symbols_is_extended(
        small_corpus: Path, small_config: TrainConfig, source_run: Path, tmp_path: Path
        ) -> None:
    loaded = load_checkpoint(source_run)
    state = dict(loaded.state)
    rows = state["model"]["embedding.weight"].shape[0]
    state["model"] = {**state["model"],
                      "embedding.weight": state["model"]["embedding.weight"][: rows - 3]}
    old = tmp_path / "before-new-symbols.pt"  # a file of someone else's, no manifest entry
    torch.save(state, old)
    trainer = _trainer(small_config, small_corpus, tmp_path / "new", warm_start=old)
    embedding = trainer.model.embedding.weight.detach()
    torch.testing.assert_close(embedding[: rows - 3], state["model"]["embedding.weight"])
    report = trainer.warm_start_report
    assert report is not None and report.skipped == []
    assert [(e.copied_rows, e.rows) for e in report.extended] == [(rows - 3, rows)]


@pytest.mark.slow
def test_a_resumed_run_ignores_the_warm_start(
        small_corpus: Path, small_config: TrainConfig, source_run: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    first = _trainer(small_config, small_corpus, run, resume=True, warm_start=source_run)
    assert first.warm_start_report is not None  # no checkpoint of its own yet: applies
    _step_and_save(first)
    own = {k: v.clone() for k, v in first.model.state_dict().items()}
    del first
    with caplog.at_level(logging.INFO, logger="services.trainer.training"):
        again = _trainer(small_config, small_corpus, run, resume=True, warm_start=source_run)
    assert again.step == 1
    for name, value in again.model.state_dict().items():
        torch.testing.assert_close(value, own[name], rtol=0, atol=0, msg=name)
    assert "--warm-start" in caplog.text and "ignored" in caplog.text
    # the run's own warm start is still on record for its summary
    assert again.warm_start_report is not None
    assert again.warm_start_report.source == str(source_run)


@pytest.mark.slow
def test_an_unusable_warm_start_checkpoint_is_named(
        small_corpus: Path, small_config: TrainConfig, tmp_path: Path) -> None:
    with pytest.raises(WarmStartError, match=r"--warm-start .*no valid checkpoint"):
        _trainer(small_config, small_corpus, tmp_path / "new", warm_start=tmp_path)
