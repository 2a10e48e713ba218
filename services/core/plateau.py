"""When a loss stops falling: one rule for the tuner's plateau red flag and the trainer's
``steps_since_loss_improved`` metric, so the alert and the tuner judge alike.

A new best is a moving mean of the loss at least ``min_rel_improvement`` below the previous
best (the first full window is always one).
"""

from __future__ import annotations

import math
from collections import deque

DEFAULT_SMOOTHING = 50  # steps in the moving mean: one noisy batch is not an improvement
DEFAULT_MIN_REL_IMPROVEMENT = 0.01  # 1 % lower than the best so far


def is_improvement(best: float | None, value: float, min_rel_improvement: float) -> bool:
    """Whether ``value`` is a new best against ``best`` (None: nothing yet, so it is)."""
    return best is None or value < best * (1 - min_rel_improvement)


class PlateauClock:
    """Counts steps since the moving mean of a loss last reached a new best."""

    def __init__(self, smoothing: int = DEFAULT_SMOOTHING,
                 min_rel_improvement: float = DEFAULT_MIN_REL_IMPROVEMENT):
        if smoothing < 1 or not 0 <= min_rel_improvement < 1:
            raise ValueError("smoothing must be >= 1 and min_rel_improvement in [0, 1)")
        self.min_rel_improvement = min_rel_improvement
        self.window: deque[float] = deque(maxlen=smoothing)
        self.best: float | None = None
        self.best_step: int | None = None

    @property
    def mean(self) -> float | None:
        """The moving mean of the last ``smoothing`` finite values (None until full)."""
        if len(self.window) < (self.window.maxlen or 1):
            return None
        return sum(self.window) / len(self.window)

    def observe(self, step: int, value: float) -> None:
        """Take the loss of ``step``; non-finite values are not losses and are ignored."""
        if not math.isfinite(value):
            return
        self.window.append(value)
        mean = self.mean
        if mean is not None and is_improvement(self.best, mean, self.min_rel_improvement):
            self.best, self.best_step = mean, step

    def restart(self) -> None:
        """Forget everything (the weights went back to an earlier checkpoint)."""
        self.window.clear()
        self.best = self.best_step = None

    def steps_since_improved(self, step: int) -> int:
        """Steps from the last new best to ``step``; 0 before the first full window."""
        return 0 if self.best_step is None else max(0, step - self.best_step)
