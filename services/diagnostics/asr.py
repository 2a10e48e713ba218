"""Word error rate of English inference probes, measured by an offline recogniser.

The recogniser is PocketSphinx (the PyPI ``pocketsphinx`` wheel, which bundles its US
English acoustic model, dictionary and language model, so nothing is downloaded at run
time). It is weak on synthetic speech: on espeak-ng's own rendering of the demo corpus
sentences it gets roughly every second word wrong. An absolute WER of a probe would
therefore mostly measure the recogniser, so :func:`relative_wer` reports the probe's WER
*minus* the WER of the same recogniser on espeak-ng's rendering of the same text: "how much
worse than the voice the model was trained on", about 0 for a perfect copy of it.

Everything here is synchronous. A :class:`Recognizer` serialises its own decoder with a
lock, so one instance may be shared by the threads of a background worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from pydantic import BaseModel
from scipy.signal import resample_poly

from services.trainer.corpus import (
    ESPEAK_BINARY,
    ESPEAK_TIMEOUT_S,
    ESPEAK_VOICES,
    ESPEAK_WORDS_PER_MINUTE,
    _espeak_binary,
)

RECOGNIZER_PACKAGE = "pocketsphinx"  # the PyPI distribution that provides the recogniser
RECOGNIZER_INSTALL = f"pip install {RECOGNIZER_PACKAGE}==5.1.1"
RECOGNIZER_LANGUAGE = "en"  # the only model the wheel ships (US English)
RECOGNIZER_SAMPLE_RATE = 16_000  # the acoustic model's rate; it reads 16-bit mono PCM
# The decoder's own log level: warnings and errors only, kept in a per-recogniser file so
# that a failure can quote its tail (the C library would otherwise write to our stderr).
_DECODER_LOG_LEVEL = "WARN"
_LOG_TAIL_CHARS = 2_000

# Input is scaled to this peak, then a faint fixed white-noise floor is added. Why: espeak-ng
# writes exact digital zeros between words, and PocketSphinx's noise tracking and cepstral
# mean normalisation break on them (WER 0.86 -> 0.49 on espeak-ng sentences once a floor of
# ~ -50 dBFS is added; 1e-3 and 1e-2 were both worse than 3e-3). Scaling first keeps that
# signal-to-floor ratio the same for a quiet model output and for espeak-ng's loud one.
_PEAK = 0.7
_NOISE_FLOOR = 3e-3
_NOISE_SEED = 0  # fixed, so one waveform always gets the same transcript

# Apostrophes stay inside words ("don't"); every other non-alphanumeric character, hyphens
# included ("thirty-nine" -> "thirty nine", as the recogniser writes it), splits words.
_NON_WORD = re.compile(r"[^\w']+|_")


class AsrError(RuntimeError):
    """The recogniser or the espeak-ng reference could not produce a transcript."""


class RecognizerNotInstalledError(AsrError):
    """The recogniser's package or its model files are missing."""


class WerResult(BaseModel):
    """One probe scored against espeak-ng's rendering of the same text."""

    text: str
    hypothesis: str
    wer: float
    reference_hypothesis: str  # what the recogniser heard in espeak-ng's rendering
    reference_wer: float
    relative: float  # wer - reference_wer: 0 means "as intelligible as espeak-ng"


def normalize_words(text: str) -> list[str]:
    """Split ``text`` into lowercase words with punctuation removed (numbers stay words)."""
    return [w.strip("'") for w in _NON_WORD.split(text.lower()) if w.strip("'")]


def _edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over words: substitutions + deletions + insertions."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1,  # deletion
                               current[j - 1] + 1,  # insertion
                               previous[j - 1] + (ref_word != hyp_word)))  # substitution
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word errors (substitutions + deletions + insertions) divided by the reference's words.

    Both texts are normalised by :func:`normalize_words`. The rate can exceed 1 when the
    hypothesis inserts words. Raises ValueError when the reference has no words, since the
    rate is undefined there (and a probe with no words is a caller's bug).
    """
    ref_words = normalize_words(reference)
    if not ref_words:
        raise ValueError(f"the reference {reference!r} has no words; WER is undefined")
    return _edit_distance(ref_words, normalize_words(hypothesis)) / len(ref_words)


def _to_pcm16(wav: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio at any rate -> the recogniser's 16 kHz 16-bit PCM, floor added."""
    audio = np.asarray(wav, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio has NaN or infinite samples")
    if sample_rate != RECOGNIZER_SAMPLE_RATE and audio.size:
        divisor = gcd(RECOGNIZER_SAMPLE_RATE, sample_rate)
        audio = resample_poly(audio, RECOGNIZER_SAMPLE_RATE // divisor, sample_rate // divisor)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0.0:
        audio = audio * (_PEAK / peak)
    audio = audio + _NOISE_FLOOR * np.random.default_rng(_NOISE_SEED).standard_normal(audio.size)
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class Recognizer:
    """Offline US English speech recogniser (PocketSphinx), started on first use.

    The decoder (about 0.4 s to load its models) is built by the first :meth:`transcribe`
    and reused; a lock serialises calls, so one instance may be shared between threads.
    Call :meth:`close` (or use it as a context manager) to delete its log file.
    """

    language = RECOGNIZER_LANGUAGE

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decoder: Any = None  # pocketsphinx.Decoder once started
        self._initial_cmn = ""  # the model's own cepstral mean, restored per utterance
        self._log_path: Path | None = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the recogniser can run here: ``(True, "")`` or ``(False, reason)``."""
        try:
            from pocketsphinx import get_model_path
        except ImportError as exc:
            return False, (f"the speech recogniser is not installed ({exc}); "
                           f"install it with `{RECOGNIZER_INSTALL}`")
        model = Path(get_model_path()) / "en-us"
        missing = [p.name for p in (model / "en-us", model / "en-us.lm.bin",
                                    model / "cmudict-en-us.dict") if not p.exists()]
        if missing:
            return False, (f"the {RECOGNIZER_PACKAGE} package has no US English model "
                           f"({', '.join(missing)} missing under {model}); "
                           f"reinstall it with `{RECOGNIZER_INSTALL}`")
        return True, ""

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(errors="replace").strip()
        return text[-_LOG_TAIL_CHARS:]

    def _start(self) -> Any:
        """Build the decoder on first use (caller holds the lock)."""
        if self._decoder is not None:
            return self._decoder
        ok, reason = self.available()
        if not ok:
            raise RecognizerNotInstalledError(reason)
        from pocketsphinx import Decoder

        if self._log_path is None:
            descriptor, name = tempfile.mkstemp(prefix="pocketsphinx-", suffix=".log")
            os.close(descriptor)
            self._log_path = Path(name)
        try:
            # Defaults are the bundled US English model at 16 kHz.
            self._decoder = Decoder(loglevel=_DECODER_LOG_LEVEL, logfn=str(self._log_path),
                                    samprate=RECOGNIZER_SAMPLE_RATE)
            self._initial_cmn = self._decoder.get_cmn(False)
        except Exception as exc:
            raise AsrError(f"{RECOGNIZER_PACKAGE} failed to start ({exc}); "
                           f"its log ends:\n{self._log_tail()}") from exc
        return self._decoder

    def transcribe(self, wav: np.ndarray, sample_rate: int) -> str:
        """Return the words heard in mono float audio ``wav`` (any rate; "" for none).

        Raises RecognizerNotInstalledError when the recogniser is missing, AsrError when it
        fails (with the tail of its log), ValueError for audio that is not mono or finite.
        """
        pcm = _to_pcm16(wav, sample_rate)
        with self._lock:
            decoder = self._start()
            if not pcm:  # no audio, no words (the decoder indexes past an empty buffer)
                return ""
            try:
                # The front end (noise estimate, cepstral mean) adapts across utterances:
                # each starts afresh, or a transcript would depend on what came before
                # (espeak-ng's own sentence lost two words after a noise clip).
                decoder.reinit_feat()
                decoder.set_cmn(self._initial_cmn)
                decoder.start_utt()
                decoder.process_raw(pcm, no_search=False, full_utt=True)
                decoder.end_utt()
                hypothesis = decoder.hyp()
            except Exception as exc:
                # A failed utterance can leave the decoder mid-utterance; rebuild it next time.
                self._decoder = None
                raise AsrError(f"{RECOGNIZER_PACKAGE} failed on {len(pcm) // 2} samples "
                               f"({exc}); its log ends:\n{self._log_tail()}") from exc
        return "" if hypothesis is None else " ".join(hypothesis.hypstr.split())

    def close(self) -> None:
        """Drop the decoder and delete its log file; a later call starts a new one."""
        with self._lock:
            self._decoder = None
            if self._log_path is not None:
                self._log_path.unlink(missing_ok=True)
                self._log_path = None

    def __enter__(self) -> Recognizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def espeak_reference(text: str, language: str = "en") -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng as the demo corpus does: (float32 mono audio, rate).

    Same voice and speed as the training corpus (services.trainer.corpus), so the reference
    is the voice the model learned. Raises AsrError when espeak-ng is missing or fails.
    """
    if language not in ESPEAK_VOICES:
        raise ValueError(f"no espeak-ng voice for language {language!r}; "
                         f"known: {sorted(ESPEAK_VOICES)}")
    try:
        binary = _espeak_binary()
    except RuntimeError as exc:
        raise AsrError(str(exc)) from exc
    # A leading "-" would be parsed as an option.
    spoken = f" {text}" if text.startswith("-") else text
    with tempfile.TemporaryDirectory(prefix="espeak-ref-") as tmp:
        wav_path = Path(tmp) / "reference.wav"
        command = [binary, "-v", ESPEAK_VOICES[language], "-s", str(ESPEAK_WORDS_PER_MINUTE),
                   "-w", str(wav_path), spoken]
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=ESPEAK_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise AsrError(f"{ESPEAK_BINARY} timed out after {ESPEAK_TIMEOUT_S} s") from exc
        if result.returncode != 0 or not wav_path.exists():
            raise AsrError(f"{ESPEAK_BINARY} failed (exit {result.returncode}): "
                           f"{result.stderr.strip()[-_LOG_TAIL_CHARS:]}")
        audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(rate)


# The process-wide reference cache used when the caller passes none, keyed by
# (language, text): a probe set then costs one espeak-ng + recogniser pass per process.
_REFERENCE_CACHE: dict[tuple[str, str], str] = {}
_REFERENCE_LOCK = threading.Lock()


def _reference_hypothesis(text: str, recognizer: Recognizer,
                          cache: dict[tuple[str, str], str]) -> str:
    key = (recognizer.language, text)
    with _REFERENCE_LOCK:
        if key in cache:
            return cache[key]
    # Rendered outside the lock: two threads racing on one new text only duplicate work.
    audio, rate = espeak_reference(text, recognizer.language)
    hypothesis = recognizer.transcribe(audio, rate)
    with _REFERENCE_LOCK:
        cache[key] = hypothesis
    return hypothesis


def relative_wer(text: str, wav: np.ndarray, sample_rate: int, recognizer: Recognizer,
                 reference_cache: dict[tuple[str, str], str] | None = None) -> WerResult:
    """Score a synthesised ``wav`` of ``text`` against espeak-ng's rendering of ``text``.

    ``relative`` is the probe's WER minus the recogniser's WER on espeak-ng's rendering:
    about 0 when the probe is as intelligible (to this recogniser) as the training voice,
    rising towards 1 for unintelligible audio. The reference transcript is cached per
    (language, text) in ``reference_cache``, or in a process-wide cache when None.
    """
    cache = _REFERENCE_CACHE if reference_cache is None else reference_cache
    reference_hypothesis = _reference_hypothesis(text, recognizer, cache)
    hypothesis = recognizer.transcribe(wav, sample_rate)
    wer = word_error_rate(text, hypothesis)
    reference_wer = word_error_rate(text, reference_hypothesis)
    return WerResult(text=text, hypothesis=hypothesis, wer=wer,
                     reference_hypothesis=reference_hypothesis, reference_wer=reference_wer,
                     relative=wer - reference_wer)
