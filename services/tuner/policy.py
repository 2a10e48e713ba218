"""The tuner's rules: a run's window in, decisions out; no I/O, no clock.

Each rule is one function below and ``decide`` runs them in priority order (a crash loop
outranks exploding gradients, which outrank a plateau). The old tuner made 198 "fixes" per
100 steps; here every command has a cooldown in trained steps, never goes out while the
rule's previous command (or any command moving the same setting) awaits its ack, and every
alarm is a latch with hysteresis: raised once, cleared only after a sustained recovery.

``apply_decision`` is the one place a decision changes the window (cooldown, in-flight,
latches); the service calls it for each decision it publishes.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.core import indicators
from services.core.schemas import (
    VALUE_ACTIONS,
    AlignmentReport,
    CommandAction,
    Effect,
    EventKind,
    FiniteOrNot,
    Severity,
    Trigger,
)
from services.tuner.config import AlignmentRule, TunerConfig
from services.tuner.state import STOPPED, RunWindow

RULE_RESTARTS = "restarts"
RULE_NON_FINITE = "non_finite"
RULE_BAD_BATCHES = "bad_batches"  # the non_finite rule's first answer: leave the data out
RULE_GRAD_NORM = "grad_norm"
RULE_SPIKES = "spikes"
RULE_PLATEAU = "plateau"
RULE_ALIGNMENT = "alignment"
RULE_ALIGNMENT_RED_FLAG = "alignment_red_flag"
RULE_ANNEAL = "anneal"
RULE_INDICATORS = "indicators"
RULE_INFERENCE = "inference"
RULE_LEARNING_RATE = "learning_rate"

# An LR within this relative distance of the floor counts as at the floor (float noise).
_AT_FLOOR = 1e-6
# The median absolute deviation times this estimates a normal distribution's deviation.
_MAD_TO_SIGMA = 1.4826
# A window whose MAD is 0 (norms equal to print precision) still has a scale: this, in
# decades of the norm, so a robust z-score stays finite.
_MIN_LOG_SCALE = 1e-3

MeasuredMetric = Literal["grad_norm", "diagonality", "objective", "non_finite",
                         "probes_stop", "applied_grad_norm", "quality"]


class EventSpec(BaseModel):
    """An event a decision asks the service to emit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: EventKind
    severity: Severity
    detail: str = Field(max_length=4000)


class Measure(BaseModel):
    """How to judge a command's effect later: the metric, its value at the trigger, the goal."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    metric: MeasuredMetric
    before: FiniteOrNot
    target: float
    recovered_when: Literal["below", "above"]


class Decision(BaseModel):
    """One thing the policy wants done: a command (action + value) or an event."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    rule: str
    step: int = Field(ge=0, description="the training step the decision was taken at")
    generation: int = Field(0, ge=0, description="rewinds seen; a replayed step differs")
    trigger: Trigger
    action: CommandAction | None = None
    value: float | None = None
    event: EventSpec | None = None
    measure: Measure | None = None
    latch: str | None = None  # hysteresis flag this decision raises
    unlatch: str | None = None  # hysteresis flag this decision clears
    discriminator: str = ""  # tells apart decisions that share rule, step and generation

    @model_validator(mode="after")
    def _check(self) -> Decision:
        if (self.action is None) == (self.event is None):
            raise ValueError("a decision is either a command or an event")
        if self.action is not None and (self.action in VALUE_ACTIONS) != (self.value is not None):
            raise ValueError(f"{self.action}: value {self.value!r} does not fit the action")
        return self

    @property
    def key(self) -> str:
        """Idempotency key: the same trigger always yields the same key."""
        kind = self.action if self.action is not None else f"event.{self.event.event}"
        key = f"{self.rule}:{kind}@{self.step}:g{self.generation}"
        return f"{key}:{self.discriminator}" if self.discriminator else key


def command_id_for(run_id: str, decision: Decision) -> str:
    """A command id derived from (run, rule, action, trigger step, generation) alone."""
    digest = hashlib.sha256(f"{run_id}|{decision.key}".encode()).hexdigest()
    return f"tuner-{digest[:32]}"


def apply_decision(window: RunWindow, decision: Decision, command_id: str | None = None,
                   expires_at: float | None = None) -> None:
    """Record a published (or already published) decision in the window."""
    if decision.action is not None:
        window.record_fired(decision.rule, decision.step, command_id, decision.action,
                            expires_at)
        if decision.action == "stop":
            window.set_latch(STOPPED, True)
    if decision.latch is not None:
        window.set_latch(decision.latch, True)
    if decision.unlatch is not None:
        window.set_latch(decision.unlatch, False)


def propose_decision(window: RunWindow, decision: Decision, command_id: str,
                     deadline: float) -> None:
    """Record a command decision put to a person instead of sent (supervised mode).

    It blocks its rule and its setting exactly like a command in flight, until it is
    answered or ``deadline`` passes, so the rule does not propose again every step; it
    raises no latch (a proposed stop has stopped nothing yet)."""
    if decision.action is None:
        raise ValueError("only a command decision can be proposed")
    window.record_fired(decision.rule, decision.step, command_id, decision.action, deadline)


def resolve_proposal(window: RunWindow, rule: str, command_id: str, action: str,
                     applied: bool, expires_at: float | None = None) -> None:
    """A proposal answered or timed out. Applied: a command in flight from now (its cooldown
    starts now; a stop latches). Not applied: the setting is free again and the rule cools
    down from now, so a rejected proposal is not made again at the next step."""
    step = max(window.step, 0)
    if applied:
        window.record_fired(rule, step, command_id, action, expires_at)
        if action == "stop":
            window.set_latch(STOPPED, True)
    else:
        window.memory.in_flight.pop(command_id, None)
        window.record_fired(rule, step)


# ---------------------------------------------------------------------- helpers


def _sortable(value: float) -> float:
    # A NaN gradient norm is worse than any number, not incomparable.
    return math.inf if math.isnan(value) else value


def _median(values: Iterable[float]) -> float:
    ordered = [_sortable(v) for v in values]
    return statistics.median(ordered) if ordered else math.nan


def _kth_largest(values: Iterable[float], k: int) -> float:
    ordered = sorted((_sortable(v) for v in values), reverse=True)
    return ordered[k - 1] if len(ordered) >= k else math.nan


class _Builder:
    """Shared context of one ``decide`` call: the window, and which settings are taken."""

    def __init__(self, window: RunWindow, config: TunerConfig):
        self.window = window
        self.config = config
        self.taken: set[str] = set()  # actions already decided in this call

    def can_command(self, rule: str, actions: Iterable[str], cooldown_steps: int) -> bool:
        """No cooldown, nothing of the rule in flight, and the settings are free."""
        window = self.window
        if STOPPED in window.memory.latched:
            return False
        if window.cooling_down(rule, cooldown_steps) or window.rule_in_flight(rule):
            return False
        return not any(action in self.taken or window.knob_in_flight(action)
                       for action in actions)

    def command(self, rule: str, trigger: Trigger, action: CommandAction,
                value: float | None = None, measure: Measure | None = None,
                discriminator: str = "") -> Decision:
        """A command decision at the current step."""
        self.taken.add(action)
        return Decision(rule=rule, step=max(self.window.step, 0),
                        generation=self.window.memory.generation, trigger=trigger,
                        action=action, value=value, measure=measure,
                        discriminator=discriminator)

    def event(self, rule: str, trigger: Trigger, event: EventKind, severity: Severity,
              detail: str, latch: str | None = None, unlatch: str | None = None,
              discriminator: str = "") -> Decision:
        """An event decision at the current step."""
        return Decision(rule=rule, step=max(self.window.step, 0),
                        generation=self.window.memory.generation, trigger=trigger,
                        event=EventSpec(event=event, severity=severity, detail=detail),
                        latch=latch, unlatch=unlatch, discriminator=discriminator)

    def lowered_lr(self, factor: float) -> float | None:
        """The LR after lowering by ``factor`` within bounds, or None if it cannot go lower."""
        lr = self.window.lr
        bounds = self.config.bounds
        if lr is None:
            return None
        new = min(bounds.lr_max, max(bounds.lr_min, lr * factor))
        return new if new < lr * (1 - _AT_FLOOR) else None


# ---------------------------------------------------------------------- the rules


def _restarts(b: _Builder) -> list[Decision]:
    """More than the plan's limit of consecutive restarts: stop the run, once per episode."""
    cfg = b.config.restarts
    memory = b.window.memory
    count = memory.consecutive_restarts
    trigger = Trigger(rule=RULE_RESTARTS, metric="consecutive_restarts", value=float(count),
                      threshold=float(cfg.max_consecutive), window=0)
    episode = f"r{round(memory.last_restart_ts * 1000)}"
    if count > cfg.max_consecutive and RULE_RESTARTS not in memory.latched:
        decisions = [b.event(RULE_RESTARTS, trigger, "red_flag", "critical",
                             f"{count} consecutive restarts (more than "
                             f"{cfg.max_consecutive}): stopping the run",
                             latch=RULE_RESTARTS, discriminator=episode)]
        if STOPPED not in memory.latched:
            decisions.insert(0, b.command(RULE_RESTARTS, trigger, "stop",
                                          discriminator=episode))
        return decisions
    if count <= cfg.max_consecutive and RULE_RESTARTS in memory.latched:
        return [b.event(RULE_RESTARTS, trigger, "recovered", "info",
                        f"consecutive restarts back to {count}", unlatch=RULE_RESTARTS,
                        discriminator=episode)]
    return []


def _non_finite(b: _Builder) -> list[Decision]:
    """Repeated non-finite steps: first leave out the batches they failed on; if they go on
    after that, roll back and lower the LR (in that order).

    The trainer never applies a non-finite update, so the weights are as good as before
    the burst: what failed is data (a corrupt recording) or numerics. Skipping the failed
    batches costs nothing; a rollback costs the steps since the checkpoint and a lower LR
    slows the rest of the run, so they wait until the skip has shown it was not the data.
    """
    cfg = b.config.non_finite
    window = b.window
    skipped_at = window.memory.last_fired.get(RULE_BAD_BATCHES)
    if window.rule_in_flight(RULE_BAD_BATCHES):
        return []
    recent = window.last_metrics(cfg.window)
    skip_fresh = skipped_at is not None and \
        window.memory.latest_step - skipped_at < cfg.cooldown_steps
    if skip_fresh:  # only the steps after the skip tell whether it helped
        recent = [message for message in recent if message.step > skipped_at]
    bad = sum(1 for message in recent if not message.finite)
    if bad < cfg.min_count:
        return []
    measure = Measure(metric="non_finite", before=float(bad), target=1.0,
                      recovered_when="below")
    if cfg.skip_lookback and not skip_fresh:
        if not b.can_command(RULE_BAD_BATCHES, ("skip_failed_batches",), cfg.cooldown_steps):
            return []
        trigger = Trigger(rule=RULE_BAD_BATCHES, metric="non_finite_steps", value=float(bad),
                          threshold=float(cfg.min_count), window=len(recent))
        return [b.command(RULE_BAD_BATCHES, trigger, "skip_failed_batches",
                          float(cfg.skip_lookback), measure)]
    if not b.can_command(RULE_NON_FINITE, ("rollback", "set_lr"), cfg.cooldown_steps):
        return []
    trigger = Trigger(rule=RULE_NON_FINITE, metric="non_finite_steps", value=float(bad),
                      threshold=float(cfg.min_count), window=len(recent))
    decisions = [b.command(RULE_NON_FINITE, trigger, "rollback", measure=measure)]
    new_lr = b.lowered_lr(cfg.lr_factor)
    if new_lr is not None:
        decisions.append(b.command(RULE_NON_FINITE, trigger, "set_lr", new_lr, measure))
    return decisions


def _grad_norm(b: _Builder) -> list[Decision]:
    """Pre-clip grad norm above the red flag on >= m of the last K steps: halve the LR."""
    cfg = b.config.grad_norm
    window = b.window
    recent = window.last_metrics(cfg.window)
    # Non-finite steps are the non_finite rule's (rollback first); counting them here too
    # would let a set_lr of this rule get in first and block that rollback while in flight.
    norms = [m.grad_norm for m in recent if m.finite and math.isfinite(m.grad_norm)]
    above = sum(1 for norm in norms if norm > cfg.red_flag)
    firing = above >= cfg.min_above
    # The m-th largest norm exceeds the red flag exactly when >= m norms do.
    trigger = Trigger(rule=RULE_GRAD_NORM, metric="grad_norm",
                      value=_kth_largest(norms, cfg.min_above), threshold=cfg.red_flag,
                      window=len(recent))
    decisions: list[Decision] = []
    latched = RULE_GRAD_NORM in window.memory.latched
    if firing and not latched:
        decisions.append(b.event(RULE_GRAD_NORM, trigger, "red_flag", "critical",
                                 f"grad norm above {cfg.red_flag:g} on {above} of the last "
                                 f"{len(recent)} steps", latch=RULE_GRAD_NORM))
    elif not firing and latched:
        calm = window.last_metrics(cfg.recover_window)
        if len(calm) >= cfg.recover_window and all(
                message.finite and message.grad_norm < cfg.recover_below for message in calm):
            recovered = trigger.model_copy(update={"value": _median(m.grad_norm for m in calm),
                                                   "threshold": cfg.recover_below,
                                                   "window": len(calm)})
            decisions.append(b.event(RULE_GRAD_NORM, recovered, "recovered", "info",
                                     f"grad norm below {cfg.recover_below:g} for "
                                     f"{len(calm)} steps", unlatch=RULE_GRAD_NORM))
    if firing and b.can_command(RULE_GRAD_NORM, ("set_lr",), cfg.cooldown_steps):
        new_lr = b.lowered_lr(cfg.lr_factor)
        if new_lr is not None:
            measure = Measure(metric="grad_norm", before=_median(norms), target=cfg.red_flag,
                              recovered_when="below")
            decisions.append(b.command(RULE_GRAD_NORM, trigger, "set_lr", new_lr, measure))
    return decisions


def _grad_norm_sustained(norms: list[float], config: TunerConfig) -> bool:
    """The grad_norm rule's condition: >= m of its last K finite norms above the red flag."""
    cfg = config.grad_norm
    return sum(1 for norm in norms[-cfg.window:] if norm > cfg.red_flag) >= cfg.min_above


def robust_log_z(norms: list[float]) -> list[float]:
    """Each norm's robust z-score of log10 against the list's median and MAD.

    Logs because a grad norm's noise is multiplicative (a healthy run wanders by factors,
    a spike is orders of magnitude); median and MAD because the spikes must not inflate
    the statistics that judge them (a mean and deviation would, as ZClip's EMA does).
    """
    logs = [math.log10(max(norm, math.ulp(0.0))) for norm in norms]
    center = statistics.median(logs)
    scale = max(_MAD_TO_SIGMA * statistics.median(abs(x - center) for x in logs),
                _MIN_LOG_SCALE)
    return [(x - center) / scale for x in logs]


def _bursts(steps: list[int], gap: int) -> list[tuple[int, int]]:
    """Ascending ``steps`` grouped into (first, last) runs whose neighbours are <= gap apart."""
    bursts: list[tuple[int, int]] = []
    for step in steps:
        if bursts and step - bursts[-1][1] <= gap:
            bursts[-1] = (bursts[-1][0], step)
        else:
            bursts.append((step, step))
    return bursts


def _spikes(b: _Builder) -> list[Decision]:
    """Isolated spikes of the grad norm on the run's own statistics: switch the guard on.

    A spike: a robust z-score of log10(norm) above ``z_max`` in the last ``window`` steps,
    and above ``guard_factor`` x the window's median (what the guard will withhold). At
    least ``min_spikes`` separate ones (spiked steps within ``burst_gap`` of each other are
    one burst), all isolated: no burst spans more than ``max_burst`` steps and the grad_norm
    rule's sustained condition does not hold (a change of level or sustained high norms
    are that rule's: a lower LR, not withheld steps). And the trainer says its guard is
    off: set_spike_guard(guard_factor).
    """
    cfg = b.config.spikes
    window = b.window
    if window.spike_guard is None or window.spike_guard > 0:
        return []  # a trainer that has no guard, or one already guarding
    recent = [m for m in window.last_metrics(cfg.window)
              if m.finite and math.isfinite(m.grad_norm) and m.grad_norm > 0]
    norms = [m.grad_norm for m in recent]
    if len(norms) < cfg.min_steps or _grad_norm_sustained(norms, b.config):
        return []
    median = statistics.median(norms)
    spiked = [m.step for m, z in zip(recent, robust_log_z(norms), strict=True)
              if z > cfg.z_max and m.grad_norm > cfg.guard_factor * median]
    bursts = _bursts(spiked, cfg.burst_gap)
    if len(bursts) < cfg.min_spikes or any(last - first + 1 > cfg.max_burst
                                           for first, last in bursts):
        return []
    if not b.can_command(RULE_SPIKES, ("set_spike_guard",), cfg.cooldown_steps):
        return []
    trigger = Trigger(rule=RULE_SPIKES, metric="grad_norm_spikes", value=float(len(bursts)),
                      threshold=float(cfg.min_spikes), window=len(recent))
    # What the grad norm indicator judges: the largest norm of the applied steps.
    measure = Measure(metric="applied_grad_norm", before=max(norms),
                      target=indicators.GRAD_NORM_OK, recovered_when="below")
    return [b.command(RULE_SPIKES, trigger, "set_spike_guard", cfg.guard_factor, measure)]


def _plateau(b: _Builder) -> list[Decision]:
    """Objective not improving for ``plateau.steps``: lower the LR; at the floor, stop."""
    cfg = b.config.plateau
    window = b.window
    memory = window.memory
    if memory.best_step is None or memory.best_objective is None or window.lr is None:
        return []
    stalled = window.step - memory.best_step
    if stalled < cfg.steps:
        return []
    smoothed = window.smoothed_objective()
    goal = memory.best_objective * (1 - cfg.min_rel_improvement)
    trigger = Trigger(rule=RULE_PLATEAU, metric="objective",
                      value=math.nan if smoothed is None else smoothed, threshold=goal,
                      window=stalled)
    new_lr = b.lowered_lr(cfg.lr_factor)
    if new_lr is None:
        if not b.can_command(RULE_PLATEAU, ("stop",), cfg.cooldown_steps):
            return []
        return [b.command(RULE_PLATEAU, trigger, "stop"),
                b.event(RULE_PLATEAU, trigger, "red_flag", "critical",
                        f"objective has not improved by {cfg.min_rel_improvement:.0%} for "
                        f"{stalled} steps and the LR is at its floor "
                        f"{b.config.bounds.lr_min:g}: stopping the run")]
    if not b.can_command(RULE_PLATEAU, ("set_lr",), cfg.cooldown_steps):
        return []
    measure = Measure(metric="objective", before=trigger.value, target=goal,
                      recovered_when="below")
    return [b.command(RULE_PLATEAU, trigger, "set_lr", new_lr, measure)]


def _alignment(b: _Builder) -> list[Decision]:
    """Diagonality below ``low`` on the last reports after warm-up: raise the GA weight.

    A weight below ``rescue_weight`` jumps to it, and is acted on from ``early_steps`` when
    the alignment has not moved at all (a run with guided attention off would otherwise need
    thousands of steps of small raises)."""
    cfg = b.config.alignment
    window = b.window
    weight = window.ga_weight
    cap = b.config.bounds.ga_weight_max
    if weight is None or weight >= cap:
        return []
    reports = window.last_reports(cfg.min_reports)
    if len(reports) < cfg.min_reports:
        return []
    values = [r.scores.diagonality for r in reports]
    qualities = [r.scores.quality for r in reports]
    since = window.memory.last_fired.get(RULE_ALIGNMENT, -1)
    if weight < cfg.rescue_weight \
            and _quality_short(reports, cfg, since):
        # Aligned, but the quality indicator stalls short with a weight below one known to
        # align (guided attention removed once the alignment formed): restore it.
        return _raise_ga(b, reports, weight, Trigger(
            rule=RULE_ALIGNMENT, metric="quality", value=qualities[-1],
            threshold=cfg.quality_low, window=reports[-1].step - reports[0].step),
            Measure(metric="quality", before=qualities[-1], target=cfg.quality_low,
                    recovered_when="above"))
    # "Not moved": not risen by flat_delta over the reports (falling counts as stuck too).
    stuck = weight < cfg.rescue_weight and values[-1] - values[0] < cfg.flat_delta
    start = min(cfg.early_steps, b.config.warmup_steps) if stuck else b.config.warmup_steps
    if window.step < start or not all(
            r.step >= start and r.step > since and r.scores.diagonality < cfg.low
            for r in reports):
        return []
    latest = reports[-1].scores.diagonality
    return _raise_ga(b, reports, weight, Trigger(
        rule=RULE_ALIGNMENT, metric="diagonality", value=latest, threshold=cfg.low,
        window=reports[-1].step - reports[0].step),
        Measure(metric="diagonality", before=latest, target=cfg.low, recovered_when="above"))


def _quality_short(reports: list[AlignmentReport], cfg: AlignmentRule, since: int) -> bool:
    """Aligned (diagonality at or above ``low``) from ``early_steps`` on, yet the quality is
    below ``quality_low`` on every report and has not risen by ``quality_flat``."""
    qualities = [r.scores.quality for r in reports]
    return all(r.step >= cfg.early_steps and r.step > since and r.scores.diagonality >= cfg.low
               and r.scores.quality < cfg.quality_low for r in reports) \
        and qualities[-1] - qualities[0] < cfg.quality_flat


def _raise_ga(b: _Builder, reports: list[AlignmentReport], weight: float, trigger: Trigger,
              measure: Measure) -> list[Decision]:
    """The alignment rule's command: a weight below the rescue weight jumps to it, a weight
    at or above it grows by ``ga_factor``; capped; nothing while cooling down."""
    cfg = b.config.alignment
    cap = b.config.bounds.ga_weight_max
    if not b.can_command(RULE_ALIGNMENT, ("set_guided_attention_weight",),
                         cfg.cooldown_steps):
        return []
    if weight < cfg.rescue_weight:
        new = min(cap, cfg.rescue_weight)  # escalate: a weight known to align, at once
    else:
        new = min(cap, max(weight * cfg.ga_factor, b.config.bounds.ga_weight_min))
    if new <= weight:
        return []
    return [b.command(RULE_ALIGNMENT, trigger, "set_guided_attention_weight", new, measure)]


def _learning_rate(b: _Builder) -> list[Decision]:
    """Guided attention on at a weight known to align, yet from ``alignment.early_steps`` on
    the alignment has not moved, with an LR far from one known to align: set that LR."""
    cfg, align = b.config.learning_rate, b.config.alignment
    window = b.window
    lr, weight = window.lr, window.ga_weight
    if lr is None or weight is None or weight < align.rescue_weight \
            or cfg.aligns / cfg.band <= lr <= cfg.aligns * cfg.band:
        return []
    reports = window.last_reports(cfg.min_reports)
    # Reports judged after the last change of the LR or of the guided attention weight:
    # a weight the alignment rule has just raised gets its chance first.
    since = max(window.memory.last_fired.get(RULE_LEARNING_RATE, -1),
                window.memory.last_fired.get(RULE_ALIGNMENT, -1))
    if len(reports) < cfg.min_reports or window.step < align.early_steps:
        return []
    values = [r.scores.diagonality for r in reports]
    if values[-1] - values[0] >= align.flat_delta or not all(
            r.step >= align.early_steps and r.step > since and r.scores.diagonality < align.low
            for r in reports):
        return []
    new = min(b.config.bounds.lr_max, max(b.config.bounds.lr_min, cfg.aligns))
    if not b.can_command(RULE_LEARNING_RATE, ("set_lr",), cfg.cooldown_steps):
        return []
    latest = values[-1]
    trigger = Trigger(rule=RULE_LEARNING_RATE, metric="diagonality", value=latest,
                      threshold=align.low, window=reports[-1].step - reports[0].step)
    measure = Measure(metric="diagonality", before=latest, target=align.low,
                      recovered_when="above")
    return [b.command(RULE_LEARNING_RATE, trigger, "set_lr", new, measure)]


def _inference(b: _Builder) -> list[Decision]:
    """Aligned teacher-forced, but on the last probe passes the gate mostly never fired:
    raise the gate's positive weight (a gate that fires too early is not this rule's)."""
    cfg = b.config.inference
    window = b.window
    weight = window.gate_weight
    cap = b.config.bounds.gate_weight_max
    latest = window.latest_report
    if weight is None or weight >= cap or latest is None \
            or latest.scores.diagonality <= cfg.aligned_above:
        return []
    since = window.memory.last_fired.get(RULE_INFERENCE, -1)
    # Below the weight the presets stop with, when not one probe stopped, or when an earlier
    # raise has not yet made them stop, one pass that fails this way is evidence enough (a
    # second pass costs a whole checkpoint interval: on long recorded sentences the weight
    # a corpus needs can be 4x the presets', three raises away).
    recent = [p for p in window.probes if p.checkpoint_step > since]
    flat = bool(recent) and recent[-1].stop_percent == 0.0
    escalating = since >= 0
    wanted = 1 if weight < cfg.rescue_weight or flat or escalating else cfg.min_passes
    passes = recent[-wanted:]
    if len(passes) < wanted or not all(
            p.stop_percent < cfg.stop_below
            and 2 * sum(not f.stopped for f in p.failures) >= len(p.failures)
            for p in passes):
        return []
    if not b.can_command(RULE_INFERENCE, ("set_gate_positive_weight",), cfg.cooldown_steps):
        return []
    factor = cfg.escalate_factor if escalating else cfg.gate_factor
    new = min(cap, cfg.rescue_weight if weight < cfg.rescue_weight else weight * factor)
    trigger = Trigger(rule=RULE_INFERENCE, metric="probes_stop",
                      value=passes[-1].stop_percent, threshold=cfg.stop_below,
                      window=passes[-1].checkpoint_step - passes[0].checkpoint_step)
    measure = Measure(metric="probes_stop", before=passes[-1].stop_percent,
                      target=cfg.stop_below, recovered_when="above")
    return [b.command(RULE_INFERENCE, trigger, "set_gate_positive_weight", new, measure)]


def _alignment_red_flag(b: _Builder) -> list[Decision]:
    """Diagonality below the red flag after warm-up: one critical event until recovered."""
    cfg = b.config.alignment
    window = b.window
    latest = window.latest_report
    if latest is None or latest.step < b.config.warmup_steps:
        return []
    diagonality = latest.scores.diagonality
    trigger = Trigger(rule=RULE_ALIGNMENT_RED_FLAG, metric="diagonality", value=diagonality,
                      threshold=cfg.red_flag, window=0)
    if RULE_ALIGNMENT_RED_FLAG not in window.memory.latched:
        if diagonality < cfg.red_flag:
            return [b.event(RULE_ALIGNMENT_RED_FLAG, trigger, "red_flag", "critical",
                            f"attention diagonality {diagonality:.3f} below {cfg.red_flag:g} "
                            f"at step {latest.step}", latch=RULE_ALIGNMENT_RED_FLAG)]
        return []
    reports = window.last_reports(cfg.recover_reports)
    if len(reports) >= cfg.recover_reports and all(
            r.scores.diagonality > cfg.recover_above for r in reports):
        recovered = trigger.model_copy(update={"threshold": cfg.recover_above,
                                               "window": reports[-1].step - reports[0].step})
        return [b.event(RULE_ALIGNMENT_RED_FLAG, recovered, "recovered", "info",
                        f"attention diagonality above {cfg.recover_above:g} on the last "
                        f"{len(reports)} reports", unlatch=RULE_ALIGNMENT_RED_FLAG)]
    return []


def _anneal(b: _Builder) -> list[Decision]:
    """Diagonality above ``stable_above`` on M fresh reports: lower a GA weight above the
    one known to align back towards it (never below: the trainer's own schedule decays the
    weight, and a healthy run at that weight gets no command)."""
    cfg = b.config.anneal
    window = b.window
    weight = window.ga_weight
    floor = max(b.config.bounds.ga_weight_min, b.config.alignment.rescue_weight)
    if weight is None or weight <= floor:
        return []
    reports = window.last_reports(cfg.min_reports)
    since = window.memory.last_fired.get(RULE_ANNEAL, -1)
    if len(reports) < cfg.min_reports or not all(
            r.step > since and r.scores.diagonality > cfg.stable_above
            and r.scores.quality > cfg.quality_above for r in reports):
        return []
    if not b.can_command(RULE_ANNEAL, ("set_guided_attention_weight",), cfg.cooldown_steps):
        return []
    # Capped too: a weight a person set above the tuner's cap comes down into its range.
    new = min(b.config.bounds.ga_weight_max, max(floor, weight * cfg.ga_factor))
    latest = reports[-1].scores.diagonality
    trigger = Trigger(rule=RULE_ANNEAL, metric="diagonality",
                      value=min(r.scores.diagonality for r in reports),
                      threshold=cfg.stable_above, window=reports[-1].step - reports[0].step)
    measure = Measure(metric="diagonality", before=latest, target=cfg.stable_above,
                      recovered_when="above")
    return [b.command(RULE_ANNEAL, trigger, "set_guided_attention_weight", new, measure)]


def _indicators(b: _Builder) -> list[Decision]:
    """The trainer's verdict says every indicator is met: one ``indicators_met`` event for
    the run. The verdict is the trainer's; the tuner only announces it."""
    window = b.window
    verdict = window.verdict
    if RULE_INDICATORS in window.memory.latched or verdict is None or not verdict.all_met:
        return []
    trigger = Trigger(rule=RULE_INDICATORS, metric="success_indicators",
                      value=verdict.met_count, threshold=len(verdict.indicators), window=0)
    detail = (f"all success indicators met at step {verdict.step}: "
              + "; ".join(i.describe() for i in verdict.indicators))
    return [b.event(RULE_INDICATORS, trigger, "indicators_met", "info", detail,
                    latch=RULE_INDICATORS)]


# Priority order: a rule earlier in the list gets a setting first when two want it.
_COMMAND_RULES: tuple[Callable[[_Builder], list[Decision]], ...] = (
    _non_finite, _grad_norm, _spikes, _plateau, _alignment, _learning_rate, _anneal, _inference)
_EVENT_RULES: tuple[Callable[[_Builder], list[Decision]], ...] = (
    _alignment_red_flag, _indicators)


def decide(window: RunWindow, config: TunerConfig) -> list[Decision]:
    """The decisions the window calls for now, in the order they must be carried out."""
    if window.memory.ended:
        return []
    builder = _Builder(window, config)
    decisions = _restarts(builder)
    if any(d.action == "stop" for d in decisions):
        return decisions
    for rule in _COMMAND_RULES:
        new = rule(builder)
        decisions.extend(new)
        if any(d.action == "stop" for d in new):
            return decisions
    for rule in _EVENT_RULES:
        decisions.extend(rule(builder))
    return decisions


def measure_effect(window: RunWindow, measure: Measure, since_step: int, steps: int) -> Effect:
    """The effect of a command applied at ``since_step``, over the ``steps`` after it."""
    after = [m for m in window.metrics if since_step < m.step <= since_step + steps]
    value = math.nan
    if measure.metric == "grad_norm" and after:
        value = _median(m.grad_norm for m in after)
    elif measure.metric == "applied_grad_norm":
        # The grad norm indicator's measure: a withheld (guarded) step never reached the
        # weights, a non-finite one neither.
        applied = [m.grad_norm for m in after if m.finite and not m.guarded]
        value = max(map(_sortable, applied)) if applied else math.nan
    elif measure.metric == "objective":
        finite = [m.objective for m in after if math.isfinite(m.objective)]
        value = sum(finite) / len(finite) if finite else math.nan
    elif measure.metric == "non_finite" and after:
        value = float(sum(1 for m in after if not m.finite))
    elif measure.metric == "probes_stop":
        # Probes run at checkpoints, in the background: the newest pass of a checkpoint
        # taken after the command, whenever it arrived.
        passes = [p for p in window.probes if p.checkpoint_step > since_step]
        value = passes[-1].stop_percent if passes else math.nan
    elif measure.metric in ("diagonality", "quality"):
        reports = [r for r in window.reports if since_step < r.step <= since_step + steps]
        value = getattr(reports[-1].scores, measure.metric) if reports else math.nan
    if math.isnan(value):
        recovered = False
    elif measure.recovered_when == "below":
        recovered = value < measure.target
    else:
        recovered = value > measure.target
    spanned = (after[-1].step - since_step) if after else 0
    return Effect(metric=measure.metric, before=measure.before, after=value, steps=spanned,
                  recovered=recovered)
