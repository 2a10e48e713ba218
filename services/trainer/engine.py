"""The step engine: forward, losses, pre-clip grad norm, clipping and the optimizer step.

It owns what one optimisation step touches (the model, its DDP wrapper, the optimizer, the
learning-rate and guided-attention schedules, the clipper, the AMP scaler and the gate's
positive weight) and nothing of the run around it: the loop (services/trainer/training.py)
counts steps, keeps the history and decides when to evaluate, checkpoint and stop.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.diagnostics.metrics import alignment_scores
from services.trainer import distributed
from services.trainer.config import TrainConfig
from services.trainer.dataset import Batch
from services.trainer.distributed import DistInfo
from services.trainer.faults import FaultInjector, FaultPlan
from services.trainer.gradients import GradientClipper, SpikeGuard
from services.trainer.losses import GuidedAttentionWeight, LossTerms, tacotron_loss
from services.trainer.model import Tacotron2, TacotronOutput
from services.trainer.optim import LearningRate, make_optimizer


@dataclass
class StepMetrics:
    """Everything measured in one optimizer step."""

    step: int
    loss: float
    mel: float
    mel_postnet: float
    gate: float
    guided_attention: float
    objective: float
    grad_norm: float  # before clipping, after unscaling; nan when the step was skipped early
    lr: float
    guided_attention_weight: float
    gate_positive_weight: float
    clip_threshold: float
    step_seconds: float
    finite: bool  # loss and gradients were finite (a guarded step is, yet not applied)
    skipped_steps: int  # total so far in this run
    # The spike guard: its factor (0: off), whether it withheld this step's update, and how
    # many steps it has withheld so far in this run.
    spike_guard: float = 0.0
    guarded: bool = False
    guarded_steps: int = 0


@dataclass
class EvalResult:
    """Teacher-forced evaluation on the fixed validation batch."""

    step: int
    losses: dict[str, float]
    scores: dict[str, float]
    attention: np.ndarray = field(repr=False)  # [B, decoder steps, tokens]
    input_lengths: np.ndarray = field(repr=False)
    decoder_lengths: np.ndarray = field(repr=False)
    # The largest pre-clip norm of the applied steps before this evaluation and how many
    # there were: the grad norm indicator is judged on the window the evaluation closes.
    window_grad_norm: float = math.inf
    window_steps: int = 0
    # The spike guard's factor then (0: off) and the steps it withheld in the window: their
    # norms are not in it, and the indicator says so.
    spike_guard: float = 0.0
    window_guarded: int = 0


@dataclass
class StepOutcome:
    """What the engine measured in one step; the loop adds the step count and the time."""

    losses: dict[str, float]  # the mean over the ranks when distributed
    grad_norm: float
    lr: float
    guided_attention_weight: float
    gate_positive_weight: float
    clip_threshold: float
    finite: bool  # loss and gradients were finite
    loss_finite: bool  # false: skipped before backward; true and not finite: bad gradients
    total: float  # this rank's back-propagated loss, for the log line of a skipped step
    spike_guard: float = 0.0  # the guard's factor at this step (0: off)
    guarded: bool = False  # finite, but a spike: the spike guard withheld the update

    @property
    def applied(self) -> bool:
        """Whether the optimizer update was applied."""
        return self.finite and not self.guarded


@dataclass
class RunTimeSettings:
    """The knobs a command may turn; a rollback restores the weights but keeps these."""

    lr: dict[str, Any]
    guided_attention: dict[str, Any]
    clip_threshold: float
    gate_positive_weight: float
    spike_guard: float


class StepEngine:
    """One model's optimisation: the steps the loop asks for, at the step it names."""

    def __init__(self, cfg: TrainConfig, model: Tacotron2, device: torch.device,
                 dist: DistInfo, fault: FaultPlan | None = None):
        self.cfg = cfg
        self.model = model
        self.device = device
        self.dist = dist
        self.fault = FaultInjector(fault)
        self.optimizer = make_optimizer(model, cfg.optim)
        self.lr = LearningRate(self.optimizer, cfg.optim)
        self.ga_weight = GuidedAttentionWeight(cfg.optim)
        # The stop token's positive weight; a command may raise it when the gate never fires.
        self.gate_positive_weight = cfg.optim.gate_positive_weight
        self.clipper = GradientClipper(cfg.optim)
        self.spike_guard = SpikeGuard(cfg.optim.spike_guard)
        self.amp = cfg.optim.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        # The module the training step runs: DDP around the model when distributed (it
        # all-reduces the gradients); evaluation and checkpoints use the bare model.
        self.ddp = self._wrap_ddp() if dist.distributed else None
        self.train_module: torch.nn.Module = self.ddp if self.ddp is not None else model

    def _wrap_ddp(self) -> torch.nn.parallel.DistributedDataParallel:
        from torch.nn.parallel import DistributedDataParallel

        # The buffers are copied from rank 0 after each step (distributed.broadcast_buffers),
        # so they are equal between steps too; DDP's own copy before each forward is off.
        # Its flag was renamed in torch 2.13; the old one still works, with a warning.
        params = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **no_buffer_sync)

    # ---------------------------------------------------------------- steps

    def forward(self, batch: Batch, step: int) -> tuple[TacotronOutput, LossTerms]:
        """The model's output and loss terms on ``batch`` with the weights of ``step``."""
        # A training step goes through DDP when distributed (it all-reduces the gradients);
        # evaluation, rank 0's alone, must not wait for the other ranks: the bare model.
        module = self.train_module if self.model.training else self.model
        with torch.autocast(self.device.type, enabled=self.amp):
            output = module(batch.text, batch.input_lengths, batch.mel, batch.output_lengths)
            terms = tacotron_loss(
                output, batch.mel, batch.gate, batch.input_lengths,
                self.cfg.model.n_frames_per_step, self.gate_positive_weight,
                self.ga_weight(step), self.cfg.optim.guided_attention_sigma)
        return output, terms

    def step(self, batch: Batch, step: int) -> StepOutcome:
        """One optimizer step; a non-finite loss or gradient skips the update, and so does
        a spike the spike guard withholds (services/trainer/gradients.py).

        A skipped or withheld step leaves no trace in the model: BatchNorm running
        statistics, which the forward pass updates, are put back as they were, so NaN
        activations (or a spiked batch's) cannot poison them.

        Distributed, every rank steps on its own batch; the losses reported are the mean
        over the ranks, a non-finite loss on any rank skips the step on all of them, and
        the gradients (hence the pre-clip norm) are DDP's all-reduced ones, so every rank
        takes the same decision and the same update.
        """
        self.model.train()
        lr = self.lr.apply(step)
        ga_weight = self.ga_weight(step)
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.optimizer.zero_grad(set_to_none=True)
        output, terms = self.forward(batch.to(self.device), step)
        terms.total = self.fault.apply(step, batch.ids, terms.total, output.mel)
        norm = math.nan
        threshold = self.clipper.current_threshold()
        if self.ddp is None:
            losses = terms.as_floats()
            loss_finite = bool(torch.isfinite(terms.total))
        else:
            losses = self._mean_losses(terms)
            loss_finite = math.isfinite(losses["loss"])
        finite = loss_finite
        guarded = False
        if loss_finite:
            self.scaler.scale(terms.total).backward()
            clip = self.clipper.clip(self.model, self.optimizer, self.scaler)
            norm, threshold, finite = clip.norm, clip.threshold, clip.finite
            # The norm is DDP's all-reduced one and every rank's guard holds the same
            # history and factor: every rank withholds the same steps.
            guarded = finite and not self.spike_guard.admit(norm)
            if finite and not guarded:
                self.scaler.step(self.optimizer)
            self.scaler.update()  # also after an unscale without a step: resets the scaler
        if not finite or guarded:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        if self.ddp is not None:
            distributed.broadcast_buffers(self.model)
        return StepOutcome(losses=losses, grad_norm=norm, lr=lr, guided_attention_weight=ga_weight,
                           gate_positive_weight=self.gate_positive_weight,
                           clip_threshold=threshold, finite=finite, loss_finite=loss_finite,
                           total=float(terms.total.detach()),
                           spike_guard=self.spike_guard.factor, guarded=guarded)

    def _mean_losses(self, terms: LossTerms) -> dict[str, float]:
        """The loss terms averaged over the ranks: one all-reduce, the same on every rank.

        A term that is not finite on one rank is not finite in the mean, so every rank
        sees the same verdict on the loss.
        """
        parts = (terms.total, terms.mel, terms.mel_postnet, terms.gate,
                 terms.guided_attention)
        summed = distributed.all_reduce_sum(torch.stack([p.detach().float() for p in parts]))
        loss, mel, mel_postnet, gate, guided = (summed / self.dist.world_size).tolist()
        return {"loss": loss, "mel": mel, "mel_postnet": mel_postnet, "gate": gate,
                "guided_attention": guided, "objective": mel + mel_postnet + gate}

    @torch.no_grad()
    def evaluate(self, batch: Batch, step: int) -> EvalResult:
        """Teacher-forced losses and alignment scores on ``batch`` (the bare model)."""
        self.model.eval()
        batch = batch.to(self.device)
        output, terms = self.forward(batch, step)
        r = self.cfg.model.n_frames_per_step
        decoder_lengths = (batch.output_lengths + r - 1) // r
        attention = output.alignments.float().cpu().numpy()
        input_lengths = batch.input_lengths.cpu().numpy()
        dec_lengths = decoder_lengths.cpu().numpy()
        scores = alignment_scores(attention, input_lengths, dec_lengths)
        return EvalResult(step, terms.as_floats(), scores, attention, input_lengths,
                          dec_lengths)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The optimisation state a checkpoint keeps (the keys of the checkpoint format)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "guided_attention": self.ga_weight.state_dict(),
            "clipper": self.clipper.state_dict(),
            "gate_positive_weight": self.gate_positive_weight,
            "spike_guard": self.spike_guard.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (a checkpoint's dict, other keys ignored)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        self.ga_weight.load_state_dict(state["guided_attention"])
        self.clipper.load_state_dict(state["clipper"])
        # Checkpoints from before the gate knob existed do not carry it.
        self.gate_positive_weight = float(state.get("gate_positive_weight",
                                                    self.cfg.optim.gate_positive_weight))
        # ... nor those from before the spike guard: the config's factor, no history yet.
        self.spike_guard = SpikeGuard(self.cfg.optim.spike_guard)
        if "spike_guard" in state:
            self.spike_guard.load_state_dict(state["spike_guard"])
        self.scaler.load_state_dict(state["scaler"])

    def settings(self) -> RunTimeSettings:
        """The run-time knobs as they are now."""
        return RunTimeSettings(self.lr.state_dict(), self.ga_weight.state_dict(),
                               self.clipper.threshold, self.gate_positive_weight,
                               self.spike_guard.factor)

    def restore_settings(self, settings: RunTimeSettings) -> None:
        """Put the run-time knobs back as ``settings`` holds them."""
        self.lr.load_state_dict(settings.lr)
        self.ga_weight.load_state_dict(settings.guided_attention)
        self.clipper.threshold = settings.clip_threshold
        self.gate_positive_weight = settings.gate_positive_weight
        self.spike_guard.set_factor(settings.spike_guard)
