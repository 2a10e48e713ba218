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
from services.trainer.schedules import DecayingValue


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
        self.schedule = DecayingValue(base=cfg.learning_rate, floor=cfg.min_learning_rate,
                                      warmup=cfg.warmup_steps, start=cfg.decay_start,
                                      rate=cfg.decay_rate, steps=cfg.decay_steps)

    def value(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        return self.schedule.value(step)

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
        self.schedule.set(value, step)
        self.apply(step)

    def state_dict(self) -> dict:
        """Override state for exact resume (the schedule itself comes from the config)."""
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.schedule.load_state_dict(state)
