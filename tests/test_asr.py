"""The offline recogniser behind the English probes' relative word error rate (real
pocketsphinx, real espeak-ng; no stand-ins)."""

from __future__ import annotations

import numpy as np
import pytest

from services.diagnostics.asr import (
    Recognizer,
    espeak_reference,
    relative_wer,
    word_error_rate,
)

SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize(("hypothesis", "expected"), [
    (SENTENCE, 0.0),
    ("The quick, brown fox jumps over the lazy dog!", 0.0),  # case and punctuation
    ("the quick brown cat jumps over the lazy dog", 1 / 9),  # substitution
    ("the quick brown fox jumps over the very lazy dog", 1 / 9),  # insertion
    ("the quick fox jumps over the lazy dog", 1 / 9),  # deletion
    ("", 1.0),
])
def test_word_error_rate(hypothesis: str, expected: float) -> None:
    assert word_error_rate(SENTENCE, hypothesis) == pytest.approx(expected)


def test_an_empty_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="has no words"):
        word_error_rate("", "anything")


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    installed, reason = Recognizer.available()
    assert installed, f"the recogniser must be installed (pyproject): {reason}"
    return Recognizer()


@pytest.mark.slow  # recognises real speech with the bundled model
def test_speech_is_recognised_and_noise_is_not(recognizer: Recognizer) -> None:
    wav, rate = espeak_reference(SENTENCE)
    heard = recognizer.transcribe(wav, rate)
    # pocketsphinx on espeak-ng's voice: most words, not all (0.33 measured: "but we brown
    # fox jumped over the lazy dog").
    assert word_error_rate(SENTENCE, heard) <= 0.5, heard
    noise = np.random.default_rng(1).standard_normal(wav.size).astype(np.float32) * 0.3
    assert word_error_rate(SENTENCE, recognizer.transcribe(noise, rate)) >= 0.8
    # Speech-like garbage: the same voice played backwards yields words, none of them right
    # (1.0 measured), so the bound above is not one that any speech passes.
    backwards = recognizer.transcribe(wav[::-1].copy(), rate)
    assert word_error_rate(SENTENCE, backwards) >= 0.8, backwards
    # Each call starts afresh: the noise and reversed clips before do not change the result.
    assert recognizer.transcribe(wav, rate) == heard
    assert recognizer.transcribe(np.zeros(0, dtype=np.float32), rate) == ""


@pytest.mark.slow
def test_espeaks_own_rendering_is_the_zero_of_the_relative_rate(
        recognizer: Recognizer) -> None:
    cache: dict = {}
    wav, rate = espeak_reference(SENTENCE)
    same = relative_wer(SENTENCE, wav, rate, recognizer, cache)
    assert same.relative == pytest.approx(0.0)
    assert ("en", SENTENCE) in cache  # the reference is rendered once per text
    silence = np.zeros(rate * 2, dtype=np.float32)
    worse = relative_wer(SENTENCE, silence, rate, recognizer, cache)
    assert worse.wer == pytest.approx(1.0) and worse.relative > 0.4
