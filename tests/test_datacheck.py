"""The data check on real files: a small LJSpeech folder with one fault per utterance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from rich.console import Console
from typer.testing import CliRunner

from services.trainer.datacheck import (
    MAX_CHARS_PER_S,
    MIN_CHARS_PER_S,
    AudioStats,
    DataReport,
    ProblemKind,
    UtteranceStats,
    alignment_section,
    check_dataset,
    measure_audio,
    plot_report,
    poor_alignments,
    print_report,
    rate_band,
    score_utterances,
    summarize,
)
from services.trainer.dataset import read_metadata

RATE = 22050
OTHER_RATE = 16000
EDGE_S = 0.2  # quiet lead-in and tail of every well-formed clip
PNG_MAGIC = b"\x89PNG"

# Texts of ~22 characters over 1.6 s of speech: ~14 chars/s, an ordinary reading rate.
CLEAN = {
    "clean_1": "The cat sat on a mat.",
    "clean_2": "A bird sang all night.",
    "clean_3": "We walked to the shop.",
    "clean_4": "She read a short poem.",
    "clean_5": "Rain fell on the roof.",
}


def _speech(seconds: float, rng: np.random.Generator, rate: int = RATE,
            amplitude: float = 0.3) -> np.ndarray:
    """A voiced-sounding stand-in for speech: a modulated tone with a little noise."""
    t = np.arange(round(seconds * rate)) / rate
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t)
    tone = np.sin(2 * np.pi * 220.0 * t) * envelope
    return amplitude * (0.9 * tone + 0.1 * rng.standard_normal(t.size))


def _quiet(seconds: float, rng: np.random.Generator, rate: int = RATE) -> np.ndarray:
    """Room noise some 65 dB below the speech: silence to any listener."""
    return 1e-4 * rng.standard_normal(round(seconds * rate))


def _clip(speech_s: float, rng: np.random.Generator, rate: int = RATE,
          lead_s: float = EDGE_S, tail_s: float = EDGE_S, amplitude: float = 0.3
          ) -> np.ndarray:
    return np.concatenate([_quiet(lead_s, rng, rate),
                           _speech(speech_s, rng, rate, amplitude),
                           _quiet(tail_s, rng, rate)])


def _write(folder: Path, utt_id: str, wav: np.ndarray, rate: int = RATE) -> None:
    sf.write(str(folder / "wavs" / f"{utt_id}.wav"), np.clip(wav, -1.0, 1.0), rate,
             subtype="PCM_16")


def _write_metadata(folder: Path, texts: dict[str, str]) -> None:
    lines = [f"{utt_id}|{text}|{text}" for utt_id, text in texts.items()]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _clean_corpus(folder: Path, rng: np.random.Generator) -> None:
    (folder / "wavs").mkdir(parents=True)
    for utt_id in CLEAN:
        _write(folder, utt_id, _clip(1.6, rng))
    _write_metadata(folder, CLEAN)


# What each faulty utterance must be flagged for, and nothing else.
EXPECTED = {
    "clipped": {ProblemKind.CLIPPING},
    "late_start": {ProblemKind.LEADING_SILENCE},
    "wordy": {ProblemKind.TRANSCRIPT_TOO_LONG},
    "gone": {ProblemKind.MISSING_WAV},
    "narrowband": {ProblemKind.SAMPLE_RATE_MISMATCH},
    "snowman": {ProblemKind.UNKNOWN_CHARACTERS},
    "blip": {ProblemKind.TOO_SHORT},
    "garbage": {ProblemKind.UNREADABLE_WAV},
    "hollow": {ProblemKind.EMPTY_AUDIO},
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five clean utterances and one of each fault."""
    folder = tmp_path_factory.mktemp("faulty")
    rng = np.random.default_rng(0)
    _clean_corpus(folder, rng)
    texts = dict(CLEAN)
    texts["clipped"] = "He shouted at the sky."
    _write(folder, "clipped", _clip(1.6, rng, amplitude=1.6))  # flattened tops
    texts["late_start"] = "It began after a wait."
    _write(folder, "late_start", _clip(1.6, rng, lead_s=2.0))
    # Two hundred characters in half a second of speech.
    texts["wordy"] = ("This transcript belongs to a much longer recording and was pasted "
                      "next to the wrong clip, so it goes on and on about things the "
                      "speaker never said in the short moment of audio that we have here.")
    _write(folder, "wordy", _clip(0.5, rng, lead_s=0.05, tail_s=0.05))
    texts["gone"] = "Nobody recorded this one."  # no wav at all
    texts["narrowband"] = "A call from far away."
    _write(folder, "narrowband", _clip(1.6, rng, rate=OTHER_RATE), rate=OTHER_RATE)
    texts["snowman"] = "I built a ☃ snowman."
    _write(folder, "snowman", _clip(1.4, rng))
    texts["blip"] = "Hi."
    _write(folder, "blip", _speech(0.3, rng))
    texts["garbage"] = "This file is not audio."
    (folder / "wavs" / "garbage.wav").write_bytes(b"RIFF but not really a wave file")
    texts["hollow"] = "Nothing was captured."
    sf.write(str(folder / "wavs" / "hollow.wav"), np.zeros(0, dtype=np.float32), RATE)
    _write_metadata(folder, texts)
    return folder


@pytest.fixture(scope="module")
def report(corpus_dir: Path) -> DataReport:
    return check_dataset(corpus_dir, progress=False)


def test_each_fault_is_found_for_its_utterance_and_nothing_else(report):
    for utt_id, kinds in EXPECTED.items():
        assert {p.kind for p in report.problems_of(utt_id)} == kinds, \
            (utt_id, report.problems_of(utt_id))
    for utt_id in CLEAN:
        assert report.problems_of(utt_id) == [], report.problems_of(utt_id)
    severity = {p.id: p.severity for p in report.problems}
    assert {uid for uid, s in severity.items() if s == "error"} == {"gone", "garbage", "hollow"}
    assert report.has_errors and report.errors == 3


def test_messages_say_what_is_wrong(report):
    message = {p.id: p.message for p in report.problems}
    assert "transcript too long for its audio" in message["wordy"]
    assert "16000 Hz" in message["narrowband"] and "22050 Hz" in message["narrowband"]
    assert "U+2603" in message["snowman"]
    assert "2.0 s of silence" in message["late_start"]


def test_summary_counts_rates_and_characters(report):
    assert report.utterances == 14 and report.readable == 12  # gone, garbage unreadable
    assert report.sample_rates == {OTHER_RATE: 1, RATE: 11}
    assert report.corpus_sample_rate == RATE
    assert report.channels == {1: 12}
    assert sum(report.duration_histogram.counts) == 11  # every clip with samples
    assert report.longest[0].id == "late_start"
    assert report.shortest[0].id == "blip"
    seconds = sum(s.audio.duration_s for s in report.stats if s.audio is not None)
    assert math.isclose(report.total_hours * 3600, seconds)
    (snowman,) = report.unknown_characters
    assert snowman.char == "☃" and snowman.count == 1 and snowman.example_ids == ["snowman"]
    # the clean clips' measured reading rate: speech without the edges
    clean_rate = {s.id: s.chars_per_second for s in report.stats if s.id in CLEAN}
    assert all(11 < rate < 17 for rate in clean_rate.values()), clean_rate
    assert report.rate.low <= min(clean_rate.values()) <= max(clean_rate.values()) \
        <= report.rate.high
    assert report.problem_counts["missing_wav"] == 1


def test_json_round_trip(report):
    again = DataReport.model_validate_json(report.model_dump_json())
    assert again.problems == report.problems and again.sample_rates == report.sample_rates


def test_measure_audio_edges_and_clipping_per_channel():
    rng = np.random.default_rng(1)
    left = _clip(1.0, rng, lead_s=1.5, tail_s=0.5)
    right = left.copy()
    right[40000:40010] = 1.0  # ten samples stuck at full scale in one channel only
    stats = measure_audio(np.stack([left, right], axis=1).astype(np.float32), RATE)
    assert stats.channels == 2 and stats.longest_clipped_run == 10
    assert abs(stats.leading_silence_s - 1.5) < 0.03
    assert abs(stats.trailing_silence_s - 0.5) < 0.03
    assert abs(stats.speech_s - 1.0) < 0.05
    silent = measure_audio(np.zeros(RATE, dtype=np.float32), RATE)
    assert silent.silent and silent.speech_s == 0.0


def test_few_utterances_use_the_absolute_reading_bounds_only():
    band = rate_band([14.0, 15.0])
    assert (band.low, band.high, band.spread) == (MIN_CHARS_PER_S, MAX_CHARS_PER_S, None)


def _missing(utt_id: str) -> UtteranceStats:
    return UtteranceStats(id=utt_id, text_chars=10, unknown={}, audio_error="missing",
                          audio_error_detail=f"wavs/{utt_id}.wav")


def test_print_report_limits_rows_per_kind():
    ok = UtteranceStats(id="fine", text_chars=20, unknown={}, audio=AudioStats(
        sample_rate=RATE, channels=1, samples=2 * RATE, duration_s=2.0, peak=0.5,
        clipped_share=0.0, longest_clipped_run=0, leading_silence_s=0.2,
        trailing_silence_s=0.2, silent=False))
    report = summarize([ok, _missing("a[1]"), _missing("b"), _missing("c")], "corpus")
    console = Console(record=True, width=200)
    print_report(report, console, max_rows=1)
    out = console.export_text()
    assert "missing_wav" in out and "... and 2 more" in out
    assert "a[1]" in out  # ids are printed literally, not read as markup
    assert "3 errors, 0 warnings" in out


def test_plot_has_both_histograms(report, tmp_path):
    path = plot_report(report, tmp_path / "sub" / "check.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def _cli():
    from services.cli import app

    return app


def test_cli_writes_png_and_json_and_fails_on_missing_audio(corpus_dir, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(_cli(), ["check-data", "--data", str(corpus_dir),
                                         "--json", str(out), "--max-rows", "2"])
    assert result.exit_code == 1, result.output
    assert (corpus_dir / "data-check.png").read_bytes().startswith(PNG_MAGIC)
    written = json.loads(out.read_text())
    assert {(p["id"], p["kind"]) for p in written["problems"]} >= {("gone", "missing_wav")}
    assert written["errors"] == 3
    assert "missing_wav" in result.output


def test_cli_passes_a_clean_corpus(tmp_path):
    _clean_corpus(tmp_path / "clean", np.random.default_rng(2))
    plot = tmp_path / "plots" / "check.png"
    result = CliRunner().invoke(_cli(), ["check-data", "--data", str(tmp_path / "clean"),
                                         "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert "0 errors, 0 warnings" in result.output


# ---------------------------------------------------------------------------------------------
# Teacher-forced alignment
# ---------------------------------------------------------------------------------------------


def test_poor_alignments_are_the_far_and_absolutely_low_ones_worst_first():
    rng = np.random.default_rng(3)
    scores = {f"u{i:02d}": {"focus": 0.8 + 0.02 * rng.standard_normal(),
                            "diagonality": 0.85 + 0.02 * rng.standard_normal()}
              for i in range(30)}
    scores["smeared"] = {"focus": 0.3, "diagonality": 0.8}
    scores["skips"] = {"focus": 0.8, "diagonality": 0.45}
    scores["lost"] = {"focus": 0.1, "diagonality": 0.05}
    assert poor_alignments(scores) == ["lost", "smeared", "skips"]
    # Far below the median but above the floors: an aligned corpus has no "worst" ones.
    tight = {f"u{i}": {"focus": 0.9, "diagonality": 0.95} for i in range(10)}
    tight["slightly_worse"] = {"focus": 0.75, "diagonality": 0.8}
    assert poor_alignments(tight) == []
    assert poor_alignments({}) == []


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_score_utterances_end_to_end(small_corpus, small_config, tmp_path, one_thread):
    from services.trainer.training import Trainer

    features = tmp_path / "features"
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", device="cpu",
                      cache_dir=features, progress=False)
    trainer.save_checkpoint()  # untrained: the scores are poor, but they are scores
    scores = score_utterances(tmp_path / "run", small_corpus, batch_size=4,
                              cache_dir=features, progress=False)
    ids = {u.id for u in read_metadata(small_corpus)}
    assert set(scores) == ids
    for per_item in scores.values():
        assert all(0.0 <= per_item[k] <= 1.0 for k in per_item if k != "quality")
        assert 0.0 <= per_item["quality"] <= 100.0
    some = sorted(ids)[:3]
    assert set(score_utterances(tmp_path / "run", small_corpus, ids=some,
                                cache_dir=features, progress=False)) == set(some)
    with pytest.raises(KeyError):
        score_utterances(tmp_path / "run", small_corpus, ids=["nope"], cache_dir=features,
                         progress=False)
    section = alignment_section(scores, "run")
    assert section.scored == len(ids) and 0.0 <= section.median_focus <= 1.0
    assert {s.id for s in section.poor} <= ids


def test_cli_adds_the_alignment_section(small_corpus, small_config, tmp_path, one_thread):
    from services.trainer.training import Trainer

    trainer = Trainer(small_config, small_corpus, tmp_path / "run", device="cpu",
                      cache_dir=small_corpus / ".features", progress=False)
    trainer.save_checkpoint()
    out = tmp_path / "report.json"
    result = CliRunner().invoke(_cli(), [
        "check-data", "--data", str(small_corpus), "--plot", str(tmp_path / "check.png"),
        "--json", str(out), "--checkpoint", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    section = json.loads(out.read_text())["alignment"]
    assert section["scored"] == 14 and section["checkpoint"] == str(tmp_path / "run")
    assert "teacher-forced alignment" in result.output


def test_train_checks_the_data_first_and_stops_on_errors(corpus_dir: Path,
                                                         tmp_path: Path) -> None:
    """``train`` runs the same check on a fresh run: missing audio stops it before any
    model is built, and the report is in the run folder."""
    from services.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(corpus_dir), "--out", str(out),
                                      "--max-steps", "1", "--no-telemetry"])
    assert result.exit_code == 1, result.output
    assert "--no-data-check" in result.output
    saved = json.loads((out / "data-check.json").read_text())
    assert saved["errors"] >= 1
    assert (out / "data-check.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "checkpoints").exists()
