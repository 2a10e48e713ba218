"""A value over training steps: linear warm-up, hold, exponential decay to a floor, and a
run-time override after which the decay continues from the new value.

The learning rate and the guided-attention weight both follow this shape; each has one
owner built on it (``optim.LearningRate``, ``losses.GuidedAttentionWeight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class DecayingValue:
    """``base`` after ``warmup`` steps, halved (``rate``) every ``steps`` after ``start``."""

    base: float
    floor: float
    warmup: int
    start: int
    rate: float
    steps: int
    _override: tuple[float, int] | None = None  # (value, step it was set at)

    def _decay(self, step: int) -> float:
        return self.rate ** (max(0, step - self.start) / self.steps)

    def value(self, step: int) -> float:
        """The value at ``step`` (0-based)."""
        if self._override is not None:
            value, since = self._override
            # An override below the floor is honoured: the floor bounds the decay only.
            return max(min(self.floor, value), value * self._decay(step) / self._decay(since))
        if self.base == 0:
            return 0.0  # switched off: the floor must not switch it back on
        if step < self.warmup:
            return self.base * (step + 1) / (self.warmup + 1)
        return max(self.floor, self.base * self._decay(step))

    def set(self, value: float, step: int) -> None:
        """The value is ``value`` from ``step`` on; warm-up is over, decay goes on from it."""
        if not math.isfinite(value) or value < 0:
            raise ValueError("a scheduled value must be a finite number >= 0")
        self._override = (value, step)

    def state_dict(self) -> dict:
        """The override, for exact resume (the schedule itself comes from the config)."""
        return {"override": self._override}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        override = state.get("override")
        self._override = (float(override[0]), int(override[1])) if override else None
