"""``/sample``: speak a sentence with a run's latest checkpoint, as MP3 for Telegram.

Telegram's sendAudio takes MP3 or M4A; libsndfile (via soundfile) writes MP3 itself, so no
ffmpeg is needed. Synthesis is CPU work of a second or more: the bot runs it in a thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from services.core.streams import validate_run_id

CHECKPOINT_DIR = "checkpoints"  # as the trainer lays out a run (training.CHECKPOINT_DIR)
AUDIO_FORMAT = "MP3"
AUDIO_SUFFIX = ".mp3"


class NoCheckpointError(FileNotFoundError):
    """The run has no valid checkpoint to speak with."""


@dataclass(frozen=True)
class Sample:
    """One spoken sentence, ready to send."""

    audio: bytes  # MP3
    step: int  # the checkpoint's training step
    stopped: bool  # the gate ended the utterance before the step limit
    diagonality: float  # of the inference alignment
    quality: float  # percent
    text: str  # as normalised by the front-end


def run_directory(runs_dir: Path, run_id: str) -> Path:
    """Where ``run_id`` keeps its checkpoints: ``<runs_dir>/<run_id>``, or ``runs_dir`` itself
    when that is a run's own directory (``smart-tuner up`` points the notifier at its run).
    """
    validate_run_id(run_id)  # never a path outside runs_dir
    nested = runs_dir / run_id
    if not nested.is_dir() and (runs_dir / CHECKPOINT_DIR).is_dir():
        return runs_dir
    return nested


def encode_mp3(wav: np.ndarray, sample_rate: int) -> bytes:
    """``wav`` (float, [-1, 1]) as MP3 bytes."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(wav, -1.0, 1.0), sample_rate, format=AUDIO_FORMAT)
    return buffer.getvalue()


def speak(runs_dir: Path, run_id: str, text: str, language: str = "auto") -> Sample:
    """Synthesise ``text`` with the newest valid checkpoint of ``run_id``.

    Raises NoCheckpointError when the run has none (or its directory does not exist).
    """
    from services.trainer.synthesis import Synthesizer  # torch: imported only when needed

    directory = run_directory(runs_dir, run_id)
    if not directory.is_dir():  # checked first: loading would create the folder
        raise NoCheckpointError(str(directory))
    try:
        synthesizer = Synthesizer(directory)
    except FileNotFoundError as error:
        raise NoCheckpointError(str(directory)) from error
    result = synthesizer.synthesize(text, language)
    return Sample(audio=encode_mp3(result.wav, result.sample_rate), step=synthesizer.step,
                  stopped=result.stopped, diagonality=float(result.scores["diagonality"]),
                  quality=float(result.scores["quality"]), text=result.normalized_text)
