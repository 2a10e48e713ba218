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
from services.trainer.checkpoints import load_checkpoint
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
    n_symbols: int  # encoded length, EOS included


class Synthesizer:
    """Holds a model restored from a checkpoint (or handed over in memory), ready to speak."""

    def __init__(self, checkpoint: Path, device: str = "cpu", best: bool = False):
        state = load_checkpoint(checkpoint, best=best).state
        cfg = TrainConfig.model_validate(state["config"])
        model = Tacotron2(cfg.model, cfg.audio.n_mels)
        model.load_state_dict(state["model"])
        self._setup(model, cfg, state["mel_mean"], state["mel_std"], int(state["step"]),
                    device)

    @classmethod
    def from_model(cls, model: Tacotron2, cfg: TrainConfig, mel_mean: np.ndarray,
                   mel_std: np.ndarray, step: int, device: str = "cpu") -> Synthesizer:
        """A synthesizer around a model already in memory (the trainer's probe copy)."""
        synthesizer = cls.__new__(cls)
        synthesizer._setup(model, cfg, mel_mean, mel_std, step, device)
        return synthesizer

    def _setup(self, model: Tacotron2, cfg: TrainConfig, mel_mean: np.ndarray,
               mel_std: np.ndarray, step: int, device: str) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.mean = torch.as_tensor(np.asarray(mel_mean)).float().unsqueeze(1)
        self.std = torch.as_tensor(np.asarray(mel_std)).float().unsqueeze(1)
        self.step = step
        # A model trained before the stress symbol existed has no row for it: its text
        # is encoded without stress marks, as it was trained.
        self.stress = (cfg.text.stress == "keep"
                       and cfg.model.n_symbols > text_frontend.STRESS_ID)

    @torch.no_grad()
    def synthesize(self, text: str, language: str = "auto", seed: int = 0,
                   max_decoder_steps: int | None = None, vocode: bool = True) -> Synthesis:
        """Speak ``text``; ``seed`` fixes the prenet dropout so output is reproducible.

        ``max_decoder_steps`` caps the free run below the model's own limit;
        ``vocode=False`` skips Griffin-Lim (``wav`` is then empty) when only the mel,
        the alignment and the stop matter.
        """
        encoded = text_frontend.text_to_sequence(text, language, self.stress)
        ids = torch.tensor([encoded.ids], dtype=torch.long, device=self.device)
        # A private generator: a probe pass runs beside training, whose random stream a
        # global reseed would disturb (and make the run irreproducible).
        generator = torch.Generator(device=self.device).manual_seed(seed)
        output = self.model.infer(ids, max_decoder_steps=max_decoder_steps, generator=generator)
        frames = int(output.output_lengths[0])
        mel = output.mel_postnet[0, :, :frames].cpu()
        r = self.cfg.model.n_frames_per_step
        steps = output.alignments.size(1)
        stopped = frames < steps * r or bool(torch.sigmoid(output.gate[0, frames - 1])
                                              > self.cfg.model.gate_threshold)
        alignment = output.alignments[0].cpu().numpy()
        scores = alignment_scores(alignment[None], np.array([len(encoded.ids)]),
                                  np.array([(frames + r - 1) // r]))
        wav = self.vocode(mel.numpy()) if vocode else np.zeros(0, dtype=np.float32)
        return Synthesis(wav=wav, sample_rate=self.cfg.audio.sample_rate, mel=mel.numpy(),
                         alignment=alignment, stopped=stopped, scores=scores,
                         normalized_text=encoded.normalized, n_symbols=len(encoded.ids))

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """Waveform of a normalised log-mel ``[n_mels, frames]`` (Griffin-Lim)."""
        return griffin_lim(torch.as_tensor(mel) * self.std + self.mean, self.cfg.audio)

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
