"""The bounds of every value a command may set: the trainer's own, named once.

The trainer checks each command against these before applying it (it never trusts the
sender); the control API and the bot check the same bounds first, so a person
gets the reason at once instead of a ``rejected`` ack a few steps later. The bounds are
deliberately tighter than what a training config accepts: a config is reviewed before a
run, a command is typed in the middle of one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from services.core.schemas import VALUE_ACTIONS, Command

LR_MIN = 1e-6
LR_MAX = 1e-2
GA_WEIGHT_MIN = 0.0  # zero switches the guided attention loss off
GA_WEIGHT_MAX = 50.0
GRAD_CLIP_MIN = 0.01
GRAD_CLIP_MAX = 1000.0
# The stop token's positive weight: below 1 the rare "stop here" frames would weigh less
# than the others; far above ~100 the gate fires everywhere.
GATE_POS_WEIGHT_MIN = 1.0
GATE_POS_WEIGHT_MAX = 100.0
# The spike guard's factor: a step whose pre-clip grad norm exceeds factor x the median of
# the recent norms is not applied. 0 switches it off. Below 3 it would withhold ordinary
# steps (a healthy run's norms wander 2-3x around their median, warm-up more); above 1000
# it would let through the very spikes it is for.
SPIKE_GUARD_OFF = 0.0
SPIKE_GUARD_MIN = 3.0
SPIKE_GUARD_MAX = 1000.0
# skip_failed_batches: how many recent steps' failed batches to leave out.
SKIP_LOOKBACK_MIN = 1.0
SKIP_LOOKBACK_MAX = 10_000.0
# The LR a schedule decays to by default and the lowest the tuner lowers it to: below it a
# Tacotron2 learns too slowly to matter, so a plateau there stops the run instead. Commands
# from a person may still go down to LR_MIN.
LR_FLOOR = 1e-5
# A learning rate known to align Tacotron2 (NVIDIA/tacotron2's, and the tiny preset's:
# bench/alignment.py aligned in ~100 steps with it, not in 427 with 1e-4). The tuner sets
# it when a run far from it has not aligned at all.
LR_ALIGNS = 1e-3
# The guided attention weight the presets train with: known to align them (bench/alignment.py
# measured ~100 steps on the demo corpus). The tuner jumps to it from a weight below it.
GA_WEIGHT_ALIGNS = 1.0
# The stop token's positive weight the presets train with: their probes stop with it.
GATE_WEIGHT_STOPS = 5.0


@dataclass(frozen=True)
class Bounds:
    """A closed interval ``[low, high]`` of finite values, and maybe one value outside it
    that switches the knob off (``off``: the spike guard's 0; the values between 0 and its
    low end would be a guard that withholds healthy steps, so they are refused)."""

    low: float
    high: float
    off: float | None = None

    def contains(self, value: float) -> bool:
        """Whether ``value`` is finite and within the interval, or the ``off`` value."""
        return math.isfinite(value) and (self.low <= value <= self.high or value == self.off)

    def describe(self) -> str:
        """The accepted values in words: ``[3, 1000] or 0 (off)``."""
        text = f"[{self.low:g}, {self.high:g}]"
        return text if self.off is None else f"{text} or {self.off:g} (off)"


# Action -> the interval its value must lie in; exactly the actions that take a value.
VALUE_BOUNDS: Mapping[str, Bounds] = MappingProxyType({
    "set_lr": Bounds(LR_MIN, LR_MAX),
    "set_guided_attention_weight": Bounds(GA_WEIGHT_MIN, GA_WEIGHT_MAX),
    "set_grad_clip": Bounds(GRAD_CLIP_MIN, GRAD_CLIP_MAX),
    "set_gate_positive_weight": Bounds(GATE_POS_WEIGHT_MIN, GATE_POS_WEIGHT_MAX),
    "set_spike_guard": Bounds(SPIKE_GUARD_MIN, SPIKE_GUARD_MAX, off=SPIKE_GUARD_OFF),
    "skip_failed_batches": Bounds(SKIP_LOOKBACK_MIN, SKIP_LOOKBACK_MAX),
})
if set(VALUE_BOUNDS) != VALUE_ACTIONS:  # pragma: no cover - guards an edit of either list
    raise RuntimeError("VALUE_BOUNDS must bound exactly schemas.VALUE_ACTIONS")


def check_value(action: str, value: float | None) -> str | None:
    """Why ``value`` may not be set by ``action`` (one line), or None if it may."""
    bounds = VALUE_BOUNDS.get(action)
    if bounds is None:
        return None if value is None else f"{action} takes no value"
    if value is None:
        return f"{action} needs a value"
    if not math.isfinite(value):
        return f"{action} value {value} is not a finite number"
    if not bounds.contains(value):
        return f"{action} value {value:g} is outside {bounds.describe()}"
    return None


def check_command(command: Command) -> str | None:
    """Why the trainer must reject ``command`` by its bounds (one line), or None if within."""
    return check_value(command.action, command.value)
