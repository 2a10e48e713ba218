"""Demo corpus: sentence generation, and a small real build with espeak-ng."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services.trainer import corpus as corpus_module
from services.trainer.corpus import (
    MAX_WORDS,
    MIN_WORDS,
    CorpusSummary,
    build_demo_corpus,
    generate_sentences,
)
from services.trainer.text import Language, detect_language, normalize_text

LANGUAGES: tuple[Language, ...] = ("en", "ru")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng (Debian package espeak-ng) not installed")


@pytest.mark.parametrize("language", LANGUAGES)
def test_generate_sentences_deterministic_and_unique(language: Language) -> None:
    first = generate_sentences(language, 300, seed=7)
    assert first == generate_sentences(language, 300, seed=7)
    assert len(set(first)) == len(first) == 300
    assert first != generate_sentences(language, 300, seed=8)
    # A longer list extends a shorter one with the same seed.
    assert generate_sentences(language, 50, seed=7) == first[:50]


@pytest.mark.parametrize("language", LANGUAGES)
def test_generate_sentences_shape(language: Language) -> None:
    sentences = generate_sentences(language, 400, seed=0)
    for sentence in sentences:
        assert MIN_WORDS <= len(sentence.split()) <= MAX_WORDS, sentence
        assert sentence[0].isupper() and sentence[-1] in ".!?\"", sentence
        assert detect_language(sentence) == language, sentence
        assert "|" not in sentence and "\n" not in sentence
        assert normalize_text(sentence, language).unknown == {}, sentence
    with_digits = [s for s in sentences if any(ch.isdigit() for ch in s)]
    assert 0.1 * len(sentences) < len(with_digits) < 0.5 * len(sentences)
    # Varied vocabulary, not a handful of words recombined.
    vocabulary = {word.strip(".,!?\"«»:").lower() for s in sentences for word in s.split()}
    assert len(vocabulary) > 120


def test_generate_sentences_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate_sentences("de", 3, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        generate_sentences("en", -1, seed=0)
    assert generate_sentences("en", 0, seed=0) == []


def test_missing_espeak_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus_module.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="espeak-ng"):
        build_demo_corpus(tmp_path, n_english=1, n_russian=1, progress=False)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorpusSummary]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (Debian package espeak-ng) not installed")
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_corpus(out, n_english=4, n_russian=3, seed=0, progress=False)


def _metadata(out: Path) -> list[list[str]]:
    return [line.split("|") for line in
            (out / "metadata.csv").read_text(encoding="utf-8").splitlines()]


@needs_espeak
def test_small_corpus_layout(small_corpus: tuple[Path, CorpusSummary]) -> None:
    out, summary = small_corpus
    rows = _metadata(out)
    assert all(len(row) == 3 for row in rows)
    ids = [row[0] for row in rows]
    assert ids == ["en_0001", "en_0002", "en_0003", "en_0004", "ru_0001", "ru_0002", "ru_0003"]
    assert [row[1] for row in rows[:4]] == generate_sentences("en", 4, seed=0)
    assert [row[1] for row in rows[4:]] == generate_sentences("ru", 3, seed=0)
    for utt_id, text, normalized in rows:
        language: Language = "ru" if utt_id.startswith("ru_") else "en"
        assert normalized == normalize_text(text, language).text
    assert (summary.n_english, summary.n_russian, summary.n_synthesized) == (4, 3, 7)
    assert summary.out_dir == out


@needs_espeak
def test_small_corpus_audio(small_corpus: tuple[Path, CorpusSummary]) -> None:
    out, summary = small_corpus
    total = 0.0
    for utt_id, _text, normalized in _metadata(out):
        path = out / "wavs" / f"{utt_id}.wav"
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
        audio, _ = sf.read(path, dtype="float32")
        duration = len(audio) / info.samplerate
        total += duration
        assert np.sqrt(np.mean(audio**2)) > 0.01, f"{utt_id} is (nearly) silent"
        # espeak at 165 wpm: roughly 0.03-0.25 s per character of a short sentence.
        assert 0.5 < duration < 15.0
        assert 0.03 < duration / len(normalized) < 0.25, (utt_id, duration, normalized)
    assert summary.total_seconds == pytest.approx(total, abs=0.01)


@needs_espeak
def test_rebuild_is_idempotent(small_corpus: tuple[Path, CorpusSummary]) -> None:
    out, _ = small_corpus
    metadata = (out / "metadata.csv").read_bytes()
    wav_times = {p.name: p.stat().st_mtime_ns for p in (out / "wavs").glob("*.wav")}
    again = build_demo_corpus(out, n_english=4, n_russian=3, seed=0, progress=False)
    assert again.n_synthesized == 0
    assert (out / "metadata.csv").read_bytes() == metadata
    assert {p.name: p.stat().st_mtime_ns for p in (out / "wavs").glob("*.wav")} == wav_times


@needs_espeak
def test_rebuild_remakes_only_what_changed(tmp_path: Path) -> None:
    build_demo_corpus(tmp_path, n_english=2, n_russian=1, seed=0, progress=False)
    (tmp_path / "wavs" / "en_0002.wav").unlink()
    again = build_demo_corpus(tmp_path, n_english=2, n_russian=1, seed=0, progress=False)
    assert again.n_synthesized == 1
    # Another seed changes the sentences, so every clip is spoken again.
    other = build_demo_corpus(tmp_path, n_english=2, n_russian=1, seed=1, progress=False)
    assert other.n_synthesized == 3


@needs_espeak
def test_resampled_corpus(tmp_path: Path) -> None:
    summary = build_demo_corpus(tmp_path, n_english=1, n_russian=1, sample_rate=16000,
                                progress=False)
    for path in (tmp_path / "wavs").glob("*.wav"):
        assert sf.info(path).samplerate == 16000
    assert summary.total_seconds > 0.5
