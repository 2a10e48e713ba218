"""Text to waveform with a trained checkpoint: free-running Tacotron2, then Griffin-Lim."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.diagnostics.metrics import alignment_scores
from services.diagnostics.plots import plot_alignment
from services.trainer import text as text_frontend
from services.trainer.audio import griffin_lim, save_wav
from services.trainer.checkpoints import CheckpointManager, LoadedCheckpoint
from services.trainer.config import TrainConfig
from services.trainer.model import Tacotron2


@dataclass
class Synthesis:
    """One synthesised utterance and what the model did to produce it."""

    wav: np.ndarray
    sample_rate: int
    mel: np.ndarray  # normalised log-mel [n_mels, frames]
    alignment: np.ndarray  # [decoder steps, tokens]
    stopped: bool  # the gate fired before the step limit
    scores: dict[str, float]
    normalized_text: str


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """A checkpoint file, or the newest valid one when ``path`` is a run or checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        loaded = CheckpointManager(folder).latest()
        if loaded is None:
            raise FileNotFoundError(f"no valid checkpoint in {folder}")
        return loaded
    return CheckpointManager(path.parent).load(path)


class Synthesizer:
    """Holds a model restored from a checkpoint, ready to speak."""

    def __init__(self, checkpoint: Path, device: str = "cpu"):
        loaded = load_checkpoint(checkpoint)
        state = loaded.state
        self.cfg = TrainConfig.model_validate(state["config"])
        self.device = torch.device(device)
        self.model = Tacotron2(self.cfg.model, self.cfg.audio.n_mels).to(self.device).eval()
        self.model.load_state_dict(state["model"])
        self.mean = torch.as_tensor(state["mel_mean"]).float().unsqueeze(1)
        self.std = torch.as_tensor(state["mel_std"]).float().unsqueeze(1)
        self.step = int(state["step"])
        # A model trained before the stress symbol existed has no row for it: its text
        # is encoded without stress marks, as it was trained.
        self.stress = (self.cfg.text.stress == "keep"
                       and self.cfg.model.n_symbols > text_frontend.STRESS_ID)

    def synthesize(self, text: str, language: str = "auto", seed: int = 0) -> Synthesis:
        """Speak ``text``; ``seed`` fixes the prenet dropout so output is reproducible."""
        encoded = text_frontend.text_to_sequence(text, language, self.stress)
        ids = torch.tensor([encoded.ids], dtype=torch.long, device=self.device)
        torch.manual_seed(seed)
        output = self.model.infer(ids)
        frames = int(output.output_lengths[0])
        mel = output.mel_postnet[0, :, :frames].cpu()
        r = self.cfg.model.n_frames_per_step
        steps = output.alignments.size(1)
        stopped = frames < steps * r or bool(torch.sigmoid(output.gate[0, frames - 1])
                                              > self.cfg.model.gate_threshold)
        alignment = output.alignments[0].cpu().numpy()
        scores = alignment_scores(alignment[None], np.array([len(encoded.ids)]),
                                  np.array([(frames + r - 1) // r]))
        wav = griffin_lim(mel * self.std + self.mean, self.cfg.audio)
        return Synthesis(wav=wav, sample_rate=self.cfg.audio.sample_rate, mel=mel.numpy(),
                         alignment=alignment, stopped=stopped, scores=scores,
                         normalized_text=encoded.normalized)

    def to_files(self, text: str, out: Path, language: str = "auto", seed: int = 0
                 ) -> tuple[Synthesis, Path]:
        """Write ``out`` (wav) and ``out`` with suffix ``.alignment.png``; returns both."""
        result = self.synthesize(text, language, seed)
        save_wav(out, result.wav, result.sample_rate)
        plot = plot_alignment(
            result.alignment, Path(out).with_suffix(".alignment.png"),
            title=f"inference alignment, step {self.step}: {result.normalized_text[:60]}",
            scores=result.scores)
        return result, plot
