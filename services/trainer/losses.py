"""Training objective: masked mel MSE (before and after the postnet), gate BCE, guided attention.

Every term is averaged over *valid* positions only, so padding in a batch never changes
the loss of an utterance, and a long utterance weighs no more per frame than a short one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from services.trainer.config import OptimConfig
from services.trainer.model import TacotronOutput, length_mask
from services.trainer.schedules import DecayingValue


def masked_mse(prediction: Tensor, target: Tensor, lengths: Tensor) -> Tensor:
    """Mean squared error over valid frames of [B, C, T] tensors."""
    mask = length_mask(lengths, target.size(2)).unsqueeze(1).to(prediction.dtype)
    squared = (prediction - target) ** 2 * mask
    return squared.sum() / (mask.sum() * target.size(1)).clamp_min(1.0)


def gate_loss(logits: Tensor, target: Tensor, lengths: Tensor, r: int,
              positive_weight: float) -> Tensor:
    """Stop-token BCE over frames of valid decoder steps, weighting the rare positives.

    The frames up to the end of the last valid decoder step count (they are what the
    decoder produces at inference), padding beyond that does not.
    """
    step_lengths = (lengths + r - 1) // r * r
    mask = length_mask(step_lengths, target.size(1)).to(logits.dtype)
    weight = torch.tensor(positive_weight, dtype=logits.dtype, device=logits.device)
    per_frame = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight,
                                                   reduction="none")
    return (per_frame * mask).sum() / mask.sum().clamp_min(1.0)


def guided_attention_weights(input_lengths: Tensor, decoder_lengths: Tensor, max_input: int,
                             max_output: int, sigma: float) -> Tensor:
    """DC-TTS penalty W[b, t, n] = 1 - exp(-(n/N_b - t/T_b)^2 / (2 sigma^2)).

    Shaped like the attention, [B, decoder steps, encoder steps]; zero outside each item's
    true lengths (N_b encoder steps, T_b decoder steps) so padding is never penalised.
    """
    dtype = torch.float32
    n = torch.arange(max_input, device=input_lengths.device, dtype=dtype)
    t = torch.arange(max_output, device=input_lengths.device, dtype=dtype)
    n_norm = n.unsqueeze(0) / input_lengths.unsqueeze(1).to(dtype)  # [B, N]
    t_norm = t.unsqueeze(0) / decoder_lengths.unsqueeze(1).to(dtype)  # [B, T]
    w = 1.0 - torch.exp(-((n_norm.unsqueeze(1) - t_norm.unsqueeze(2)) ** 2) / (2 * sigma**2))
    mask = (length_mask(decoder_lengths, max_output).unsqueeze(2)
            & length_mask(input_lengths, max_input).unsqueeze(1))
    return w * mask


def guided_attention_loss(alignments: Tensor, input_lengths: Tensor, decoder_lengths: Tensor,
                          sigma: float) -> Tensor:
    """Attention mass away from the diagonal: sum over tokens, mean over valid decoder steps.

    Summing over tokens (instead of averaging over every cell, as ESPnet does) keeps the
    penalty's scale independent of text length; averaging over cells makes "weight 1"
    about N times weaker (measured in a feasibility sweep on 2 CPU cores).
    """
    _, max_out, max_in = alignments.shape
    w = guided_attention_weights(input_lengths, decoder_lengths, max_in, max_out, sigma)
    per_item = (alignments * w.to(alignments.dtype)).sum(dim=(1, 2))
    return (per_item / decoder_lengths.to(alignments.dtype).clamp_min(1.0)).mean()


class GuidedAttentionWeight(DecayingValue):
    """The guided-attention weight over training: hold, then exponential decay to a floor.

    It is the one owner of that weight; ``set`` is how the tuner overrides it, after which
    the decay continues from the new value.
    """

    def __init__(self, cfg: OptimConfig):
        super().__init__(base=cfg.guided_attention_weight,
                         floor=cfg.guided_attention_min_weight, warmup=0,
                         start=cfg.guided_attention_decay_start,
                         rate=cfg.guided_attention_decay_rate,
                         steps=cfg.guided_attention_decay_steps)

    def __call__(self, step: int) -> float:
        """The weight to use at ``step``."""
        return self.value(step)


@dataclass
class LossTerms:
    """Loss components of one batch; ``total`` is what is back-propagated."""

    total: Tensor
    mel: Tensor
    mel_postnet: Tensor
    gate: Tensor
    guided_attention: Tensor

    @property
    def objective(self) -> Tensor:
        """Mel + postnet mel + gate: the model's loss without the auxiliary attention term.

        This is the number held to the plan's "loss < 1.0": the guided attention term's
        weight is changed by the tuner, so including it would let a command move the loss.
        """
        return self.mel + self.mel_postnet + self.gate

    def as_floats(self) -> dict[str, float]:
        """Plain floats for logging and messages."""
        terms = {"loss": self.total, "mel": self.mel, "mel_postnet": self.mel_postnet,
                 "gate": self.gate, "guided_attention": self.guided_attention,
                 "objective": self.objective}
        return {name: float(value.detach()) for name, value in terms.items()}


def tacotron_loss(output: TacotronOutput, mel_target: Tensor, gate_target: Tensor,
                  input_lengths: Tensor, r: int, gate_positive_weight: float,
                  guided_attention_weight: float, guided_attention_sigma: float) -> LossTerms:
    """All loss terms of a teacher-forced batch."""
    lengths = output.output_lengths
    mel = masked_mse(output.mel, mel_target, lengths)
    mel_post = masked_mse(output.mel_postnet, mel_target, lengths)
    gate = gate_loss(output.gate, gate_target, lengths, r, gate_positive_weight)
    decoder_lengths = (lengths + r - 1) // r
    if guided_attention_weight > 0:
        ga = guided_attention_loss(output.alignments, input_lengths, decoder_lengths,
                                   guided_attention_sigma)
    else:
        ga = output.mel.new_zeros(())
    total = mel + mel_post + gate + guided_attention_weight * ga
    return LossTerms(total, mel, mel_post, gate, ga)
