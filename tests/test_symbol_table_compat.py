"""Checkpoints trained before the stress symbol was appended to the table (73 symbols)."""

from __future__ import annotations

import pytest

from services.trainer.checkpoints import CheckpointManager
from services.trainer.synthesis import Synthesizer
from services.trainer.text import N_SYMBOLS, N_SYMBOLS_WITHOUT_STRESS
from services.trainer.training import CHECKPOINT_DIR, Trainer

pytestmark = pytest.mark.slow  # each test trains (and the first extracts the features)

# An untrained model never predicts its stop, so it would run the preset's 400 decoder
# steps (and Griffin-Lim over 1,200 frames): half a minute on a busy CI core for the same
# text, symbols and mel channels. These tests are about the symbol table.
FREE_RUN_STEPS = 40


def _old_checkpoint(small_corpus, small_config, tmp_path):
    """A run folder whose checkpoint looks like one written before the stress symbol."""
    run = tmp_path / "old-run"
    trainer = Trainer(small_config, small_corpus, run, cache_dir=small_corpus / ".features",
                      progress=False)
    trainer.train(max_steps=2)
    state = trainer._state()
    state["model"]["embedding.weight"] = state["model"]["embedding.weight"][
        :N_SYMBOLS_WITHOUT_STRESS].clone()
    state["config"]["model"]["n_symbols"] = N_SYMBOLS_WITHOUT_STRESS
    del state["config"]["text"]  # old configs had no text section
    CheckpointManager(run / CHECKPOINT_DIR).save(state, trainer.step + 1, healthy=True)
    return run


def test_an_old_checkpoint_still_speaks_stressed_text_without_stress(
        small_corpus, small_config, tmp_path):
    run = _old_checkpoint(small_corpus, small_config, tmp_path)
    synthesizer = Synthesizer(run)
    assert synthesizer.model.embedding.num_embeddings == N_SYMBOLS_WITHOUT_STRESS
    assert not synthesizer.stress
    result = synthesizer.synthesize("вол+ос и д+ом", seed=0, max_decoder_steps=FREE_RUN_STEPS)
    assert result.normalized_text == "волос и дом"
    assert result.mel.shape[0] == small_config.audio.n_mels


def test_resuming_an_old_checkpoint_fails_naming_the_mismatch(
        small_corpus, small_config, tmp_path):
    run = _old_checkpoint(small_corpus, small_config, tmp_path)
    with pytest.raises(ValueError) as error:
        Trainer(small_config, small_corpus, run, cache_dir=small_corpus / ".features",
                progress=False, resume=True)
    message = str(error.value)
    assert f"{N_SYMBOLS_WITHOUT_STRESS} symbols" in message
    assert f"has {N_SYMBOLS}" in message
    assert "--warm-start" in message


def test_a_new_checkpoint_keeps_stress(small_corpus, small_config, tmp_path):
    run = tmp_path / "new-run"
    Trainer(small_config, small_corpus, run, cache_dir=small_corpus / ".features",
            progress=False).train(max_steps=2)
    synthesizer = Synthesizer(run)
    assert synthesizer.stress
    result = synthesizer.synthesize("вол+ос", seed=0, max_decoder_steps=FREE_RUN_STEPS)
    assert result.normalized_text == "вол+ос"
