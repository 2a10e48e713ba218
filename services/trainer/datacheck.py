"""Checks a TTS corpus before training, and finds utterances a trained model cannot align.

Before training (``check_dataset``): every utterance of an LJSpeech-layout folder is read
once and measured (duration, sample rate, channels, clipping, silence at the edges, symbols
the text front-end drops, characters per second of speech), then judged against fixed
bounds and against the corpus's own robust statistics. After training (``score_utterances``
and ``poor_alignments``): a checkpoint is run teacher-forced over the corpus, and the
utterances whose attention stays poor while the rest align are listed; that is nearly
always a transcript that does not match its audio.

The measuring and judging functions are pure (arrays and models in, models out); only
``measure_utterance``, ``check_dataset``, ``plot_report`` and ``score_utterances`` touch
files. ``print_report`` renders the report as rich tables on a given console.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, computed_field
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from tqdm import tqdm

from services.core import indicators
from services.diagnostics.metrics import alignment_scores_per_sample
from services.trainer import text as text_frontend
from services.trainer.dataset import (
    TextMelCollate,
    TTSDataset,
    Utterance,
    prepare_features,
    read_metadata,
)

# --- Bounds on one clip.
# Shorter clips carry too little speech to learn an alignment from; longer ones exceed what
# Tacotron2's decoder is usually trained on and dominate a batch's padding and memory.
MIN_DURATION_S = 0.5
MAX_DURATION_S = 20.0
# A sample at or above this magnitude (of full scale) counts as clipped.
CLIP_LEVEL = 0.999
# A clean full-scale peak touches the ceiling for a sample or two; a longer run is a
# flattened waveform top.
MAX_CLIPPED_RUN = 3
# Share of all samples that may be clipped before the clip counts as distorted (0.1 %).
MAX_CLIPPED_SHARE = 1e-3
# Silence: frames whose RMS is this far below the clip's loudest frame.
SILENCE_TOP_DB = 40.0
SILENCE_FRAME_S = 0.02
SILENCE_HOP_S = 0.01
# More silence than this at either edge teaches the model long pauses and makes the
# attention wait at the first token; features are trimmed, but only by the same criterion.
MAX_EDGE_SILENCE_S = 1.0

# --- Characters per second of speech (normalised text length / speech duration).
# Nobody reads slower or faster than these, whatever the corpus.
MIN_CHARS_PER_S = 3.0
MAX_CHARS_PER_S = 30.0
# Relative outliers: beyond median ± OUTLIER_K robust standard deviations of the corpus.
OUTLIER_K = 4.0
# MAD times this estimates the standard deviation of normally distributed values.
MAD_TO_STD = 1.4826
# A corpus read at an even pace has a tiny MAD; the spread used is at least this share of
# the median so ordinary variation (a short exclamation, a list of names) is not flagged.
MIN_RATE_SPREAD_FRACTION = 0.1
# Fewer rated utterances than this give no robust statistics: absolute bounds only.
MIN_UTTERANCES_FOR_STATS = 5

# --- Report.
RANKED_N = 5  # longest and shortest utterances listed
EXAMPLE_IDS = 3  # example ids per unknown character
DURATION_BIN_S = 0.5
# Histograms stop here; longer or faster ones are counted in the last bin (``overflow``).
DURATION_HISTOGRAM_MAX_S = 1.5 * MAX_DURATION_S
CHARS_PER_S_BIN = 1.0
CHARS_PER_S_HISTOGRAM_MAX = 1.5 * MAX_CHARS_PER_S
DEFAULT_MAX_ROWS = 10
PLOT_FILE = "data-check.png"
FIGURE_SIZE_INCHES = (11.0, 4.0)
DPI = 100

# --- Teacher-forced alignment.
# Alignment is poor when far below the corpus (robust, as for the reading rate) AND below
# an absolute floor, so a corpus that aligns well everywhere has no "worst" utterances.
ALIGNMENT_OUTLIER_K = 3.0
MIN_SCORE_SPREAD = 0.02
ALIGNMENT_FLOORS: dict[str, float] = {
    "diagonality": indicators.DIAGONALITY_OK,
    # Half the mass off the peak's neighbourhood: the attention is smeared over the text.
    "focus": 0.5,
}
SCORING_BATCH_SIZE = 16
# Prenet dropout stays on in eval mode (Tacotron2's design): a fixed seed makes scores
# reproducible.
SCORING_SEED = 0

Severity = Literal["error", "warning"]


class ProblemKind(StrEnum):
    """What can be wrong with one utterance."""

    MISSING_WAV = "missing_wav"
    UNREADABLE_WAV = "unreadable_wav"
    EMPTY_AUDIO = "empty_audio"
    SILENT_AUDIO = "silent_audio"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    SAMPLE_RATE_MISMATCH = "sample_rate_mismatch"
    CLIPPING = "clipping"
    LEADING_SILENCE = "leading_silence"
    TRAILING_SILENCE = "trailing_silence"
    UNKNOWN_CHARACTERS = "unknown_characters"
    TRANSCRIPT_TOO_LONG = "transcript_too_long"
    TRANSCRIPT_TOO_SHORT = "transcript_too_short"


# Errors make the utterance unusable (training would fail on it); warnings degrade training.
SEVERITY: dict[ProblemKind, Severity] = {
    kind: "error" if kind in (ProblemKind.MISSING_WAV, ProblemKind.UNREADABLE_WAV,
                              ProblemKind.EMPTY_AUDIO) else "warning"
    for kind in ProblemKind
}


# ---------------------------------------------------------------------------------------------
# Report models
# ---------------------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class AudioStats(_Frozen):
    """Measurements of one readable audio file."""

    sample_rate: int
    channels: int
    samples: int
    duration_s: float
    peak: float
    clipped_share: float
    longest_clipped_run: int
    leading_silence_s: float
    trailing_silence_s: float
    silent: bool  # no frame has any energy: edges are meaningless

    @computed_field  # type: ignore[prop-decorator]
    @property
    def speech_s(self) -> float:
        """Duration without the silence at both edges."""
        if self.silent:
            return 0.0
        return max(0.0, self.duration_s - self.leading_silence_s - self.trailing_silence_s)


class UtteranceStats(_Frozen):
    """Everything measured for one utterance; ``audio`` is None when the wav is missing
    or unreadable (``audio_error`` says which and why)."""

    id: str
    text_chars: int  # normalised text length, stress marks excluded
    unknown: dict[str, int]
    audio: AudioStats | None = None
    audio_error: Literal["missing", "unreadable"] | None = None
    audio_error_detail: str = ""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def chars_per_second(self) -> float | None:
        """Normalised characters per second of speech; None without speech to divide by."""
        if self.audio is None or self.audio.speech_s <= 0.0:
            return None
        return self.text_chars / self.audio.speech_s


class Problem(_Frozen):
    """One thing wrong with one utterance, with a message for a person."""

    id: str
    kind: ProblemKind
    severity: Severity
    message: str


class Histogram(_Frozen):
    """Counts per bin between ``edges``; values beyond the last edge are counted in the last
    bin, and ``overflow`` says how many of them there were."""

    edges: list[float]
    counts: list[int]
    overflow: int = 0


class RateBand(_Frozen):
    """The corpus's reading rate (chars/s): median, robust spread, and the accepted band
    (the robust band intersected with the absolute bounds)."""

    median: float | None
    spread: float | None
    low: float
    high: float


class RankedUtterance(_Frozen):
    """An utterance id with its duration, for the longest/shortest lists."""

    id: str
    duration_s: float


class UnknownCharacter(_Frozen):
    """A character the symbol table lacks, how often it occurs, and where."""

    char: str
    codepoint: str
    count: int
    example_ids: list[str]


class AlignmentScore(_Frozen):
    """Teacher-forced alignment scores of one utterance."""

    id: str
    focus: float
    diagonality: float
    quality: float


class AlignmentSection(_Frozen):
    """Utterances with poor teacher-forced alignment (usually bad transcripts)."""

    checkpoint: str
    scored: int
    median_focus: float
    median_diagonality: float
    poor: list[AlignmentScore]


class DataReport(_Frozen):
    """The data check's result: corpus summary, per-utterance stats and the problems."""

    data_dir: str
    utterances: int
    readable: int
    total_hours: float
    corpus_sample_rate: int | None  # what the clips were judged against
    sample_rates: dict[int, int]
    channels: dict[int, int]
    duration_histogram: Histogram
    chars_per_second_histogram: Histogram
    rate: RateBand
    longest: list[RankedUtterance]
    shortest: list[RankedUtterance]
    unknown_characters: list[UnknownCharacter]
    problems: list[Problem]
    stats: list[UtteranceStats]
    alignment: AlignmentSection | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def errors(self) -> int:
        """Number of error-severity problems."""
        return sum(p.severity == "error" for p in self.problems)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def warnings(self) -> int:
        """Number of warning-severity problems."""
        return sum(p.severity == "warning" for p in self.problems)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def problem_counts(self) -> dict[str, int]:
        """Problems per kind, in ``ProblemKind`` order."""
        counts = Counter(p.kind for p in self.problems)
        return {kind.value: counts[kind] for kind in ProblemKind if counts[kind]}

    @property
    def has_errors(self) -> bool:
        """Whether some utterance cannot be used at all (missing, unreadable, empty)."""
        return self.errors > 0

    def problems_of(self, utt_id: str) -> list[Problem]:
        """The problems found for one utterance."""
        return [p for p in self.problems if p.id == utt_id]


# ---------------------------------------------------------------------------------------------
# Measuring (pure)
# ---------------------------------------------------------------------------------------------


def robust_center(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(median, MAD_TO_STD * MAD)``: a centre and spread that a few outliers cannot move."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("robust_center needs at least one value")
    median = float(np.median(array))
    return median, MAD_TO_STD * float(np.median(np.abs(array - median)))


def _longest_run(mask: np.ndarray) -> int:
    """Longest run of consecutive true values along axis 0 of ``mask`` [samples, channels]."""
    if not mask.any():
        return 0
    edges = np.diff(np.pad(mask.astype(np.int8), ((1, 1), (0, 0))), axis=0)
    longest = 0
    for channel in range(mask.shape[1]):
        starts = np.flatnonzero(edges[:, channel] == 1)
        ends = np.flatnonzero(edges[:, channel] == -1)
        if starts.size:
            longest = max(longest, int((ends - starts).max()))
    return longest


def edge_silence(mono: np.ndarray, sample_rate: int) -> tuple[float, float] | None:
    """Seconds of silence ``(leading, trailing)`` of a mono clip; None when it is all silent.

    Silence is a ``SILENCE_FRAME_S`` frame (hop ``SILENCE_HOP_S``) whose RMS is more than
    ``SILENCE_TOP_DB`` below the clip's loudest frame.
    """
    n = mono.size
    frame = max(1, round(SILENCE_FRAME_S * sample_rate))
    hop = max(1, round(SILENCE_HOP_S * sample_rate))
    # Frame energies from a running sum of squares: O(n) memory whatever the clip's length.
    energy = np.concatenate(([0.0], np.cumsum(mono.astype(np.float64) ** 2)))
    frame = min(frame, n)
    starts = np.arange(0, n - frame + 1, hop)
    rms = np.sqrt((energy[starts + frame] - energy[starts]) / frame)
    peak = float(rms.max()) if rms.size else 0.0
    if peak <= 0.0:
        return None
    loud = np.flatnonzero(rms > peak * 10.0 ** (-SILENCE_TOP_DB / 20.0))
    leading = int(starts[loud[0]])
    trailing = max(0, n - int(starts[loud[-1]] + frame))
    return leading / sample_rate, trailing / sample_rate


def measure_audio(samples: np.ndarray, sample_rate: int) -> AudioStats:
    """Measure a clip given as float samples ``[n]`` or ``[n, channels]`` in [-1, 1].

    Clipping is judged on every channel; silence on the mono mix, which is what the
    features are computed from.
    """
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise ValueError(f"expected samples [n] or [n, channels], got shape {data.shape}")
    n, channels = data.shape
    duration = n / sample_rate
    if n == 0:
        return AudioStats(sample_rate=sample_rate, channels=channels, samples=0, duration_s=0.0,
                          peak=0.0, clipped_share=0.0, longest_clipped_run=0,
                          leading_silence_s=0.0, trailing_silence_s=0.0, silent=True)
    magnitude = np.abs(data)
    clipped = magnitude >= CLIP_LEVEL
    edges = edge_silence(data.mean(axis=1), sample_rate)
    leading, trailing = edges if edges is not None else (duration, duration)
    return AudioStats(
        sample_rate=sample_rate, channels=channels, samples=n, duration_s=duration,
        peak=float(magnitude.max()), clipped_share=float(clipped.mean()),
        longest_clipped_run=_longest_run(clipped), leading_silence_s=leading,
        trailing_silence_s=trailing, silent=edges is None)


def measure_text(text: str, language: Literal["auto", "en", "ru"] = "auto"
                 ) -> tuple[int, dict[str, int]]:
    """``(normalised length, unknown characters)`` of a transcript.

    Stress marks are dropped for the count: they are not spoken characters.
    """
    normalized = text_frontend.normalize_text(text, language, stress=False)
    return len(normalized.text), dict(normalized.unknown)


# ---------------------------------------------------------------------------------------------
# Judging (pure)
# ---------------------------------------------------------------------------------------------


def rate_band(rates: Sequence[float]) -> RateBand:
    """The accepted reading rates: median ± ``OUTLIER_K`` robust spreads, within the
    absolute bounds; the absolute bounds alone for fewer than ``MIN_UTTERANCES_FOR_STATS``."""
    if len(rates) < MIN_UTTERANCES_FOR_STATS:
        return RateBand(median=float(np.median(rates)) if rates else None, spread=None,
                        low=MIN_CHARS_PER_S, high=MAX_CHARS_PER_S)
    median, spread = robust_center(rates)
    spread = max(spread, MIN_RATE_SPREAD_FRACTION * median)
    return RateBand(median=median, spread=spread,
                    low=max(MIN_CHARS_PER_S, median - OUTLIER_K * spread),
                    high=min(MAX_CHARS_PER_S, median + OUTLIER_K * spread))


def corpus_sample_rate(stats: Iterable[UtteranceStats]) -> int | None:
    """The most common sample rate among readable clips (the higher one on a tie)."""
    counts = Counter(s.audio.sample_rate for s in stats if s.audio is not None)
    if not counts:
        return None
    return max(counts, key=lambda rate: (counts[rate], rate))


def _problem(utt_id: str, kind: ProblemKind, message: str) -> Problem:
    return Problem(id=utt_id, kind=kind, severity=SEVERITY[kind], message=message)


def _format_chars(unknown: Mapping[str, int]) -> str:
    return ", ".join(f"{char!r} (U+{ord(char):04X}) ×{count}"
                     for char, count in sorted(unknown.items(), key=lambda kv: -kv[1]))


def utterance_problems(stats: UtteranceStats, expected_rate: int | None, band: RateBand
                       ) -> list[Problem]:
    """Every problem of one utterance, judged against the corpus's rate and reading band."""
    uid = stats.id
    problems: list[Problem] = []
    if stats.unknown:
        problems.append(_problem(uid, ProblemKind.UNKNOWN_CHARACTERS,
                                 "characters outside the symbol table are dropped: "
                                 + _format_chars(stats.unknown)))
    if stats.audio_error == "missing":
        return [_problem(uid, ProblemKind.MISSING_WAV,
                         f"no audio file {stats.audio_error_detail}"), *problems]
    if stats.audio_error == "unreadable" or stats.audio is None:
        return [_problem(uid, ProblemKind.UNREADABLE_WAV,
                         f"cannot read audio: {stats.audio_error_detail}"), *problems]
    audio = stats.audio
    if audio.samples == 0:
        return [_problem(uid, ProblemKind.EMPTY_AUDIO, "audio file has no samples"),
                *problems]
    if audio.duration_s < MIN_DURATION_S:
        problems.append(_problem(uid, ProblemKind.TOO_SHORT,
                                 f"{audio.duration_s:.2f} s is shorter than "
                                 f"{MIN_DURATION_S:g} s"))
    elif audio.duration_s > MAX_DURATION_S:
        problems.append(_problem(uid, ProblemKind.TOO_LONG,
                                 f"{audio.duration_s:.1f} s is longer than "
                                 f"{MAX_DURATION_S:g} s"))
    if expected_rate is not None and audio.sample_rate != expected_rate:
        problems.append(_problem(uid, ProblemKind.SAMPLE_RATE_MISMATCH,
                                 f"{audio.sample_rate} Hz where the corpus is at "
                                 f"{expected_rate} Hz (it will be resampled)"))
    if audio.longest_clipped_run > MAX_CLIPPED_RUN or audio.clipped_share > MAX_CLIPPED_SHARE:
        problems.append(_problem(uid, ProblemKind.CLIPPING,
                                 f"clipped: {audio.clipped_share:.2%} of samples at full "
                                 f"scale, longest run {audio.longest_clipped_run} samples"))
    if audio.silent:
        problems.append(_problem(uid, ProblemKind.SILENT_AUDIO, "audio is all silence"))
        return problems  # edges and reading rate mean nothing without sound
    for kind, seconds, edge in (
        (ProblemKind.LEADING_SILENCE, audio.leading_silence_s, "starts"),
        (ProblemKind.TRAILING_SILENCE, audio.trailing_silence_s, "ends"),
    ):
        if seconds > MAX_EDGE_SILENCE_S:
            problems.append(_problem(uid, kind, f"{edge} with {seconds:.1f} s of silence "
                                                f"(more than {MAX_EDGE_SILENCE_S:g} s)"))
    rate = stats.chars_per_second
    if rate is not None:
        expected = (f"corpus median {band.median:.1f}, " if band.median is not None else "")
        expected += f"accepted {band.low:.1f}-{band.high:.1f}"
        if rate > band.high:
            problems.append(_problem(uid, ProblemKind.TRANSCRIPT_TOO_LONG,
                                     f"transcript too long for its audio: {rate:.1f} chars/s "
                                     f"of speech ({expected})"))
        elif rate < band.low:
            problems.append(_problem(uid, ProblemKind.TRANSCRIPT_TOO_SHORT,
                                     f"transcript too short for its audio: {rate:.1f} "
                                     f"chars/s of speech ({expected})"))
    return problems


def histogram(values: Sequence[float], bin_width: float, top: float) -> Histogram:
    """Fixed-width bins from 0 to ``top``, values above ``top`` counted in the last bin."""
    edges = np.arange(0.0, top + bin_width / 2, bin_width)
    array = np.asarray(values, dtype=np.float64)
    overflow = int((array > top).sum())
    counts, _ = np.histogram(np.minimum(array, top), bins=edges)
    return Histogram(edges=[round(float(e), 6) for e in edges],
                     counts=[int(c) for c in counts], overflow=overflow)


def _unknown_characters(stats: Sequence[UtteranceStats]) -> list[UnknownCharacter]:
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for s in stats:
        for char, count in s.unknown.items():
            counts[char] += count
            ids = examples.setdefault(char, [])
            if len(ids) < EXAMPLE_IDS:
                ids.append(s.id)
    return [UnknownCharacter(char=char, codepoint=f"U+{ord(char):04X}", count=count,
                             example_ids=examples[char])
            for char, count in counts.most_common()]


def summarize(stats: Sequence[UtteranceStats], data_dir: str | Path = "",
              expected_sample_rate: int | None = None) -> DataReport:
    """Judge the measured utterances and build the report.

    ``expected_sample_rate`` is the rate training will use; by default the corpus's most
    common rate, so a mixed corpus flags its minority.
    """
    audio = [(s.id, s.audio) for s in stats if s.audio is not None and s.audio.samples > 0]
    durations = [a.duration_s for _, a in audio]
    rates = [r for s in stats if (r := s.chars_per_second) is not None]
    band = rate_band(rates)
    majority = corpus_sample_rate(stats)
    expected = expected_sample_rate if expected_sample_rate is not None else majority
    problems = [p for s in stats for p in utterance_problems(s, expected, band)]
    by_duration = sorted(audio, key=lambda item: (item[1].duration_s, item[0]))
    ranked = [RankedUtterance(id=uid, duration_s=a.duration_s) for uid, a in by_duration]
    return DataReport(
        data_dir=str(data_dir),
        utterances=len(stats),
        readable=sum(s.audio is not None for s in stats),
        total_hours=sum(durations) / 3600.0,
        corpus_sample_rate=expected,
        sample_rates=dict(sorted(Counter(a.sample_rate for s in stats
                                         if (a := s.audio) is not None).items())),
        channels=dict(sorted(Counter(a.channels for s in stats
                                     if (a := s.audio) is not None).items())),
        duration_histogram=histogram(durations, DURATION_BIN_S, DURATION_HISTOGRAM_MAX_S),
        chars_per_second_histogram=histogram(rates, CHARS_PER_S_BIN,
                                             CHARS_PER_S_HISTOGRAM_MAX),
        rate=band,
        longest=ranked[::-1][:RANKED_N],
        shortest=ranked[:RANKED_N],
        unknown_characters=_unknown_characters(stats),
        problems=problems,
        stats=list(stats),
    )


# ---------------------------------------------------------------------------------------------
# Reading the corpus
# ---------------------------------------------------------------------------------------------


def read_utterances(data_dir: str | Path) -> list[Utterance]:
    """The utterances of ``data_dir/metadata.csv``, including those whose wav is missing
    (one of the things this check exists to report); malformed metadata raises."""
    return read_metadata(data_dir, require_audio=False)


def measure_utterance(utterance: Utterance,
                      language: Literal["auto", "en", "ru"] = "auto") -> UtteranceStats:
    """Read one utterance's wav (as stored: no resampling, no mixing) and measure it."""
    chars, unknown = measure_text(utterance.normalized_text, language)
    base = {"id": utterance.id, "text_chars": chars, "unknown": unknown}
    path = utterance.wav_path
    if not path.is_file():
        return UtteranceStats(**base, audio_error="missing", audio_error_detail=str(path))
    try:
        samples, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as error:
        return UtteranceStats(**base, audio_error="unreadable",
                              audio_error_detail=f"{path}: {error}")
    return UtteranceStats(**base, audio=measure_audio(samples, int(sample_rate)))


def check_dataset(data_dir: Path, *, expected_sample_rate: int | None = None,
                  language: Literal["auto", "en", "ru"] = "auto",
                  progress: bool = True) -> DataReport:
    """Check an LJSpeech-layout corpus (``metadata.csv`` and ``wavs/``) before training.

    Reads every wav once. Raises ``FileNotFoundError`` without ``metadata.csv`` and
    ``MetadataError`` on malformed lines; missing or unreadable wavs are reported as
    error-severity problems instead (``report.has_errors``).
    """
    utterances = read_utterances(data_dir)
    stats = [measure_utterance(u, language)
             for u in tqdm(utterances, desc="check audio", unit="utt", disable=not progress)]
    return summarize(stats, data_dir, expected_sample_rate)


# ---------------------------------------------------------------------------------------------
# Teacher-forced alignment
# ---------------------------------------------------------------------------------------------


def poor_alignments(scores: Mapping[str, Mapping[str, float]],
                    k: float = ALIGNMENT_OUTLIER_K,
                    floors: Mapping[str, float] | None = None) -> list[str]:
    """Ids whose focus or diagonality is far below the rest, worst first.

    An utterance is poor on a score when it lies below ``median - k * spread`` (spread:
    the scaled MAD, at least ``MIN_SCORE_SPREAD``) and below that score's absolute floor
    (``ALIGNMENT_FLOORS`` by default). Worst first: the most robust spreads below the median
    on either score.
    """
    floors = ALIGNMENT_FLOORS if floors is None else floors
    if not scores:
        return []
    deficit: dict[str, float] = {}
    for key, floor in floors.items():
        values = {uid: float(s[key]) for uid, s in scores.items()}
        median, spread = robust_center(list(values.values()))
        spread = max(spread, MIN_SCORE_SPREAD)
        for uid, value in values.items():
            if value < median - k * spread and value < floor:
                deficit[uid] = max(deficit.get(uid, 0.0), (median - value) / spread)
    return sorted(deficit, key=lambda uid: (-deficit[uid], uid))


def alignment_section(scores: Mapping[str, Mapping[str, float]], checkpoint: str,
                      k: float = ALIGNMENT_OUTLIER_K) -> AlignmentSection:
    """The report's section on teacher-forced alignment: the poor ones and the medians."""
    if not scores:
        raise ValueError("alignment_section needs at least one scored utterance")
    poor = [AlignmentScore(id=uid, focus=scores[uid]["focus"],
                           diagonality=scores[uid]["diagonality"],
                           quality=scores[uid].get("quality", float("nan")))
            for uid in poor_alignments(scores, k)]
    return AlignmentSection(
        checkpoint=checkpoint, scored=len(scores),
        median_focus=float(np.median([s["focus"] for s in scores.values()])),
        median_diagonality=float(np.median([s["diagonality"] for s in scores.values()])),
        poor=poor)


def usable_ids(report: DataReport) -> list[str]:
    """Ids of utterances whose audio can be turned into features (no error-severity problem)."""
    bad = {p.id for p in report.problems if p.severity == "error"}
    return [s.id for s in report.stats if s.id not in bad]


def score_utterances(checkpoint_path: Path, data_dir: Path, ids: Sequence[str] | None = None,
                     batch_size: int = SCORING_BATCH_SIZE, *, device: str = "cpu",
                     cache_dir: Path | None = None, progress: bool = True
                     ) -> dict[str, dict[str, float]]:
    """Teacher-forced alignment scores of each utterance under a trained checkpoint.

    ``checkpoint_path`` is a checkpoint file or a run/checkpoint folder (its newest valid
    checkpoint). Features are prepared (cached under ``cache_dir``, by default
    ``data_dir/.features`` as training does) with the checkpoint's audio settings and
    normalised with its training statistics; the model runs in eval mode over batches of
    similar length. Returns id -> the keys of ``alignment_scores`` (focus, diagonality, ...),
    each item scored on its own valid block. ``ids`` restricts the pass (default: every
    utterance with a wav); an unknown id raises ``KeyError``.
    """
    from services.trainer.config import TrainConfig
    from services.trainer.model import Tacotron2
    from services.trainer.synthesis import load_checkpoint

    state = load_checkpoint(checkpoint_path).state
    cfg = TrainConfig.model_validate(state["config"])
    utterances = [u for u in read_utterances(data_dir) if u.wav_path.is_file()]
    if ids is not None:
        by_id = {u.id: u for u in utterances}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise KeyError(f"no utterance with a wav for ids {unknown[:EXAMPLE_IDS]} "
                           f"({len(unknown)} in all) in {data_dir}")
        utterances = [by_id[i] for i in ids]
    if not utterances:
        return {}

    target = torch.device(device)
    model = Tacotron2(cfg.model, cfg.audio.n_mels).to(target).eval()
    model.load_state_dict(state["model"])
    store = prepare_features(utterances, cfg.audio, cache_dir or Path(data_dir) / ".features",
                             progress=progress)
    # The model expects mels normalised as in its training, not by this subset's statistics.
    store.mean = np.asarray(state["mel_mean"], dtype=np.float32)
    store.std = np.asarray(state["mel_std"], dtype=np.float32)
    # As Synthesizer: a model trained before the stress symbol existed knows no stress.
    stress = (cfg.text.stress == "keep"
              and cfg.model.n_symbols > text_frontend.STRESS_ID)

    def encode(text: str) -> list[int]:
        return text_frontend.text_to_sequence(text, cfg.text.language, stress=stress).ids

    dataset = TTSDataset(utterances, store, encode)
    collate = TextMelCollate(cfg.model.n_frames_per_step)
    r = cfg.model.n_frames_per_step
    # Similar lengths per batch: little padding to run the decoder over.
    order = np.argsort(dataset.mel_lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    scores: dict[str, dict[str, float]] = {}
    # The seed must not disturb the caller's random streams (a training run's, say).
    forked = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.no_grad():
        torch.manual_seed(SCORING_SEED)
        for indices in tqdm(batches, desc="score alignment", unit="batch",
                            disable=not progress):
            batch = collate([dataset[int(i)] for i in indices]).to(target)
            output = model(batch.text, batch.input_lengths, batch.mel, batch.output_lengths)
            decoder_lengths = (batch.output_lengths + r - 1) // r
            # Per sample: each item is scored on its own valid block, as
            # alignment_scores would score it alone, in one vectorised call.
            per_sample = alignment_scores_per_sample(
                output.alignments.float().cpu(), batch.input_lengths.cpu(),
                decoder_lengths.cpu())
            for row, uid in enumerate(batch.ids):
                scores[uid] = {key: float(values[row]) for key, values in per_sample.items()}
    return scores


# ---------------------------------------------------------------------------------------------
# Output: PNG and rich tables
# ---------------------------------------------------------------------------------------------


def _bars(axes, hist: Histogram, color: str) -> None:
    edges = np.asarray(hist.edges)
    axes.bar(edges[:-1], hist.counts, width=np.diff(edges), align="edge", color=color,
             edgecolor="white", linewidth=0.5)


def plot_report(report: DataReport, path: Path) -> Path:
    """Save the duration and chars-per-second histograms side by side as a PNG at ``path``
    (parents created); return it."""
    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DPI, layout="constrained")
    durations, rates = figure.subplots(1, 2)

    _bars(durations, report.duration_histogram, "tab:blue")
    for bound in (MIN_DURATION_S, MAX_DURATION_S):
        durations.axvline(bound, color="tab:red", linestyle="--", linewidth=1)
    over = report.duration_histogram.overflow
    durations.set_xlabel("duration, s" + (f" ({over} beyond the last bin)" if over else ""))
    durations.set_ylabel("utterances")
    clips = sum(report.duration_histogram.counts)
    durations.set_title(f"{clips} clips, {report.total_hours:.2f} h", fontsize=10)

    _bars(rates, report.chars_per_second_histogram, "tab:green")
    band = report.rate
    rates.axvspan(band.low, band.high, color="tab:green", alpha=0.1, label="accepted")
    if band.median is not None:
        rates.axvline(band.median, color="black", linewidth=1, label="median")
    rates.legend(fontsize=8)
    over = report.chars_per_second_histogram.overflow
    rates.set_xlabel("characters per second of speech"
                     + (f" ({over} beyond the last bin)" if over else ""))
    rates.set_title("reading rate", fontsize=10)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _summary_table(report: DataReport) -> Table:
    table = Table(title=f"data check: {escape(report.data_dir)}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("utterances", f"{report.utterances} ({report.readable} readable)")
    table.add_row("total audio", f"{report.total_hours:.2f} h")
    if report.shortest:
        table.add_row("shortest", ", ".join(f"{escape(u.id)} {u.duration_s:.2f} s"
                                            for u in report.shortest))
        table.add_row("longest", ", ".join(f"{escape(u.id)} {u.duration_s:.2f} s"
                                           for u in report.longest))
    table.add_row("sample rates", ", ".join(f"{rate} Hz × {n}"
                                            for rate, n in report.sample_rates.items()) or "-")
    table.add_row("channels", ", ".join(f"{ch} × {n}" for ch, n in report.channels.items())
                  or "-")
    band = report.rate
    median = f"median {band.median:.1f}, " if band.median is not None else ""
    table.add_row("chars/s of speech", f"{median}accepted {band.low:.1f}-{band.high:.1f}")
    if report.unknown_characters:
        table.add_row("unknown characters", "; ".join(
            f"{escape(repr(u.char))} {u.codepoint} ×{u.count} "
            f"(e.g. {escape(', '.join(u.example_ids))})" for u in report.unknown_characters))
    verdict = ("[red]" if report.errors else "[yellow]" if report.warnings else "[green]")
    table.add_row("problems", f"{verdict}{report.errors} errors, {report.warnings} warnings"
                              f"[/]")
    return table


def _problems_table(report: DataReport, max_rows: int) -> Table:
    table = Table(title="problems")
    for column in ("kind", "severity", "utterance", "message"):
        table.add_column(column)
    by_kind: dict[ProblemKind, list[Problem]] = {}
    for problem in report.problems:
        by_kind.setdefault(problem.kind, []).append(problem)
    for kind in ProblemKind:  # errors first: the enum lists them first
        problems = by_kind.get(kind, [])
        for i, problem in enumerate(problems[:max_rows]):
            style = "red" if problem.severity == "error" else "yellow"
            table.add_row(kind.value if i == 0 else "", f"[{style}]{problem.severity}[/]",
                          escape(problem.id), escape(problem.message))
        if len(problems) > max_rows:
            table.add_row("", "", f"... and {len(problems) - max_rows} more", "")
        if problems:
            table.add_section()
    return table


def _alignment_table(section: AlignmentSection, max_rows: int) -> Table:
    table = Table(title="utterances with poor teacher-forced alignment: usually bad "
                        f"transcripts ({len(section.poor)} of {section.scored}; median focus "
                        f"{section.median_focus:.2f}, diagonality "
                        f"{section.median_diagonality:.2f})")
    for column in ("utterance", "focus", "diagonality", "quality %"):
        table.add_column(column)
    for score in section.poor[:max_rows]:
        table.add_row(escape(score.id), f"{score.focus:.2f}", f"{score.diagonality:.2f}",
                      f"{score.quality:.0f}")
    if len(section.poor) > max_rows:
        table.add_row(f"... and {len(section.poor) - max_rows} more", "", "", "")
    return table


def print_report(report: DataReport, console: Console, max_rows: int = DEFAULT_MAX_ROWS
                 ) -> None:
    """Print the summary, the problems grouped by kind (at most ``max_rows`` per kind) and,
    when present, the poorly aligned utterances."""
    console.print(_summary_table(report))
    if report.problems:
        console.print(_problems_table(report, max_rows))
    if report.alignment is not None:
        if report.alignment.poor:
            console.print(_alignment_table(report.alignment, max_rows))
        else:
            console.print(f"teacher-forced alignment: no poorly aligned utterance among "
                          f"{report.alignment.scored} (median focus "
                          f"{report.alignment.median_focus:.2f}, diagonality "
                          f"{report.alignment.median_diagonality:.2f})")
