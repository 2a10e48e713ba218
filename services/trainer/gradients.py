"""Gradient measurement and clipping that report the truth.

The old system logged the norm *after* clipping and, under fp16, *before* unscaling, so
its "400k+" norms were 491,036 / 65,536 ≈ 7.5 in reality. Here the norm is always the
global L2 norm of the true (unscaled) gradients, taken before clipping, and a step whose
loss or gradients are not finite is skipped and counted instead of poisoning the weights.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from services.core.bounds import check_value
from services.trainer.config import OptimConfig

log = logging.getLogger(__name__)

# AutoClip needs a few norms before its percentile means anything.
ADAPTIVE_MIN_HISTORY = 10


@dataclass
class ClipResult:
    """What happened to the gradients of one step."""

    norm: float  # global L2 norm before clipping, after unscaling
    threshold: float  # clipping threshold that was applied
    finite: bool
    clipped: bool


def global_grad_norm(parameters: Iterable[nn.Parameter]) -> float:
    """Global L2 norm of the gradients (inf or nan if any gradient is not finite)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


class GradientClipper:
    """Clips gradients at a fixed or adaptive (AutoClip percentile) threshold.

    It owns the clipping threshold; ``set_threshold`` is the tuner's way to change it.
    """

    def __init__(self, cfg: OptimConfig):
        self.mode = cfg.clip_mode
        self.threshold = cfg.grad_clip
        self.percentile = cfg.adaptive_clip_percentile
        self.history: deque[float] = deque(maxlen=cfg.adaptive_clip_history)

    def current_threshold(self) -> float:
        """Threshold for the next step (AutoClip: percentile of recent finite norms)."""
        if self.mode == "adaptive" and len(self.history) >= ADAPTIVE_MIN_HISTORY:
            return float(np.percentile(np.fromiter(self.history, float), self.percentile))
        return self.threshold

    def set_threshold(self, value: float) -> None:
        """Set the fixed threshold (also the fallback while AutoClip's history is short)."""
        if not value > 0 or not math.isfinite(value):
            raise ValueError("clip threshold must be a positive finite number")
        self.threshold = value

    def clip(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None = None) -> ClipResult:
        """Unscale (if a scaler is active), measure, and clip the gradients in place."""
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
        threshold = self.current_threshold()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=threshold,
                                                    error_if_nonfinite=False))
        finite = math.isfinite(norm)
        if finite:
            self.history.append(norm)
        return ClipResult(norm=norm, threshold=threshold, finite=finite,
                          clipped=finite and norm > threshold)

    def state_dict(self) -> dict:
        """Threshold and norm history, for exact resume."""
        return {"threshold": self.threshold, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.threshold = float(state["threshold"])
        self.history.clear()
        self.history.extend(float(x) for x in state["history"])


# The spike guard judges a norm against the median of this many recent finite norms, and
# only once it knows this many (before that a median says little about the run's level).
SPIKE_GUARD_HISTORY = 50
SPIKE_GUARD_MIN_HISTORY = 10


class SpikeGuard:
    """Withholds the update of a step whose pre-clip norm is a spike for this run.

    A norm above ``factor`` x the median of the last ``SPIKE_GUARD_HISTORY`` finite norms
    is a spike (ZClip-like detection on the run's own statistics, not a fixed threshold);
    ``factor`` 0 is off. Clipping bounds the step a spike takes but not its direction, and
    the grad norm indicator counts the spike itself; a withheld step does neither.

    The reference holds every finite norm, withheld ones too: a median ignores isolated
    spikes by construction (it takes half the window to move it), while a real, lasting
    rise of the norms becomes the new level after half a window instead of withholding
    every step from then on.
    """

    def __init__(self, factor: float):
        self.factor = 0.0
        self.set_factor(factor)
        self.history: deque[float] = deque(maxlen=SPIKE_GUARD_HISTORY)

    @property
    def enabled(self) -> bool:
        """Whether the guard withholds spikes at all (factor > 0)."""
        return self.factor > 0

    def set_factor(self, factor: float) -> None:
        """Set the factor: 0 (off) or within the trainer's bounds (services.core.bounds)."""
        reason = check_value("set_spike_guard", factor)
        if reason is not None:
            raise ValueError(reason)
        self.factor = float(factor)

    def reference(self) -> float | None:
        """The median the next norm is judged against; None until enough are known."""
        if len(self.history) < SPIKE_GUARD_MIN_HISTORY:
            return None
        return float(np.median(np.fromiter(self.history, float)))

    def admit(self, norm: float) -> bool:
        """Judge one finite step's pre-clip ``norm`` and remember it: False withholds it."""
        reference = self.reference() if self.enabled else None
        spike = reference is not None and norm > self.factor * reference
        self.history.append(norm)
        return not spike

    def state_dict(self) -> dict:
        """Factor and norm history, for exact resume."""
        return {"factor": self.factor, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.set_factor(float(state["factor"]))
        self.history.clear()
        self.history.extend(float(x) for x in state["history"])
