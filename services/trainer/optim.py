"""Adam and the one owner of its learning rate.

Only ``LearningRate`` writes ``param_group["lr"]``: warm-up, decay and the tuner's
``set_lr`` all go through it, so no two parts can fight over the LR in the same step
(the old system had four).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from services.trainer.config import OptimConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Adam:
    """Adam as in the Tacotron2 paper, with a small L2 weight decay."""
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas,
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


class LearningRate:
    """Linear warm-up, constant, then exponential decay to a floor; overridable at run time.

    ``set(value, step)`` makes the LR ``value`` now; warm-up is then over and the decay
    continues from the new value.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig):
        self.optimizer = optimizer
        self.base = cfg.learning_rate
        self.floor = cfg.min_learning_rate
        self.warmup = cfg.warmup_steps
        self.decay_start = cfg.decay_start
        self.decay_rate = cfg.decay_rate
        self.decay_steps = cfg.decay_steps
        self._override: tuple[float, int] | None = None

    def _decay(self, step: int) -> float:
        return self.decay_rate ** (max(0, step - self.decay_start) / self.decay_steps)

    def value(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if self._override is not None:
            value, since = self._override
            return max(min(self.floor, value), value * self._decay(step) / self._decay(since))
        if step < self.warmup:
            return self.base * (step + 1) / (self.warmup + 1)
        return max(self.floor, self.base * self._decay(step))

    def apply(self, step: int) -> float:
        """Write the LR for ``step`` into the optimizer; returns it."""
        lr = self.value(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def set(self, value: float, step: int) -> None:
        """Override: the LR is ``value`` from ``step`` on (bounds are the caller's job)."""
        if not value > 0 or not math.isfinite(value):
            raise ValueError("learning rate must be a positive finite number")
        self._override = (value, step)
        self.apply(step)

    def state_dict(self) -> dict:
        """Override state for exact resume (the schedule itself comes from the config)."""
        return {"override": self._override}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        override = state.get("override")
        self._override = (float(override[0]), int(override[1])) if override else None
