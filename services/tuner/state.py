"""The per-run window the policy sees, and the pure updates that maintain it.

A ``RunWindow`` has two parts. The recent metrics and alignment reports are bounded deques,
rebuilt from the streams. ``PolicyMemory`` is what the policy must not forget across a tuner
restart (cooldowns, hysteresis latches, commands in flight, best objective, restarts): it is
small, serialisable, and the service stores it in Redis together with every command it
issues, so a restarted tuner never repeats a decision its predecessor already acted on.

Entries can be delivered twice (at-least-once consumer groups). Every update therefore uses
absolute values (the restart count an event reports, not "one more"), and a metrics message
that is neither newer in step nor in time than what was seen is a replay, not a rewind.
"""

from __future__ import annotations

from collections import deque

from pydantic import BaseModel, ConfigDict, Field

from services.core.indicators import Verdict
from services.core.plateau import PlateauClock
from services.core.schemas import (
    Ack,
    AlignmentReport,
    Event,
    MetricsMessage,
    ProbeReport,
    VerdictMessage,
    probe_report,
)
from services.tuner.config import TunerConfig

# Which trainer setting a value command changes; two rules never move one knob at once.
KNOB_OF_ACTION = {"set_lr": "lr", "set_guided_attention_weight": "ga_weight",
                  "set_grad_clip": "clip", "set_gate_positive_weight": "gate_weight",
                  "set_spike_guard": "spike_guard", "rollback": "weights",
                  "skip_failed_batches": "data"}
PROBES_KEPT = 8  # probe passes remembered per run: enough to see a trend
# Latch set by any stop command: nothing more is commanded until the run starts again.
STOPPED = "stopped"


def _count(value: object) -> int | None:
    """A non-negative int from an event's data, or None (a bool is not a count)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class InFlight(BaseModel):
    """A command sent and not yet acknowledged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command_id: str
    rule: str
    action: str
    step: int
    expires_at: float | None = None


class PolicyMemory(BaseModel):
    """The part of a run's window that survives a tuner restart (stored in Redis)."""

    model_config = ConfigDict(extra="forbid")

    latest_step: int = -1
    latest_ts: float = 0.0
    generation: int = Field(0, description="real rewinds seen (rollback or resume)")
    consecutive_restarts: int = 0
    last_restart_ts: float = 0.0
    best_objective: float | None = None
    best_step: int | None = None
    last_fired: dict[str, int] = Field(default_factory=dict, description="rule -> step")
    latched: set[str] = Field(default_factory=set, description="hysteresis flags raised")
    in_flight: dict[str, InFlight] = Field(default_factory=dict)
    ended: bool = False


class RunWindow:
    """Everything the policy knows about one run."""

    def __init__(self, run_id: str, config: TunerConfig, memory: PolicyMemory | None = None):
        self.run_id = run_id
        self.config = config
        self.memory = memory if memory is not None else PolicyMemory()
        self.metrics: deque[MetricsMessage] = deque(maxlen=config.service.metrics_window)
        self.reports: deque[AlignmentReport] = deque(maxlen=config.service.reports_window)
        # The trainer's current settings, as its latest metrics (or applied acks) say.
        self.lr: float | None = None
        self.ga_weight: float | None = None
        self.clip_threshold: float | None = None
        self.gate_weight: float | None = None
        # None: the trainer does not say (one from before the spike guard existed).
        self.spike_guard: float | None = None
        # Inference probe passes (the sixth indicator), oldest first.
        self.probes: deque[ProbeReport] = deque(maxlen=PROBES_KEPT)
        # The plateau rule's clock: the trainer's steps_since_loss_improved rule, the same
        # object; its best survives a restart in the memory.
        self.plateau = PlateauClock(config.plateau.smoothing,
                                    config.plateau.min_rel_improvement)
        self.plateau.best, self.plateau.best_step = (self.memory.best_objective,
                                                     self.memory.best_step)
        # The trainer's newest verdict on the indicators: the tuner shows it, never recomputes.
        self.verdict: Verdict | None = None
        self._verdict_ts = 0.0

    # ------------------------------------------------------------------ read side

    @property
    def step(self) -> int:
        """The latest training step seen (-1 before any metrics)."""
        return self.memory.latest_step

    @property
    def warmed_up(self) -> bool:
        """True once the run is past the alignment warm-up."""
        return self.memory.latest_step >= self.config.warmup_steps

    def last_metrics(self, count: int) -> list[MetricsMessage]:
        """The newest ``count`` metrics, oldest first (fewer if fewer are known)."""
        if count >= len(self.metrics):
            return list(self.metrics)
        return list(self.metrics)[-count:]

    def last_reports(self, count: int) -> list[AlignmentReport]:
        """The newest ``count`` alignment reports by step, oldest first."""
        if count >= len(self.reports):
            return list(self.reports)
        return list(self.reports)[-count:]

    @property
    def latest_report(self) -> AlignmentReport | None:
        """The alignment report of the highest step, if any."""
        return self.reports[-1] if self.reports else None

    def smoothed_objective(self) -> float | None:
        """Mean objective of the last ``plateau.smoothing`` finite steps (None until full)."""
        return self.plateau.mean

    def cooling_down(self, rule: str, cooldown_steps: int) -> bool:
        """True while ``rule`` fired fewer than ``cooldown_steps`` trained steps ago."""
        last = self.memory.last_fired.get(rule)
        return last is not None and self.memory.latest_step - last < cooldown_steps

    def rule_in_flight(self, rule: str) -> bool:
        """True while a command of ``rule`` awaits its ack."""
        return any(item.rule == rule for item in self.memory.in_flight.values())

    def knob_in_flight(self, action: str) -> bool:
        """True while any command moving the same trainer setting awaits its ack."""
        knob = KNOB_OF_ACTION.get(action, action)
        return any(KNOB_OF_ACTION.get(item.action, item.action) == knob
                   for item in self.memory.in_flight.values())

    # ------------------------------------------------------------------ updates

    def observe_metrics(self, message: MetricsMessage) -> None:
        """Take one step's metrics: append, track settings and the best objective."""
        memory = self.memory
        if message.step <= memory.latest_step:
            if message.ts <= memory.latest_ts:
                # A redelivered entry (e.g. re-read after a tuner restart): refill the window
                # if it is empty there, but it is no news.
                if not self.metrics or message.step > self.metrics[-1].step:
                    self.metrics.append(message)
                    self._take_settings(message)
                    self.plateau.observe(message.step, message.objective)
                    self._keep_best()
                return
            self._rewind(message.step)
        self.metrics.append(message)
        memory.latest_step = message.step
        memory.latest_ts = message.ts
        memory.ended = False
        self._take_settings(message)
        self.plateau.observe(message.step, message.objective)
        self._keep_best()

    def _take_settings(self, message: MetricsMessage) -> None:
        self.lr = message.lr
        self.ga_weight = message.guided_attention_weight
        self.clip_threshold = message.clip_threshold
        if message.gate_positive_weight is not None:
            self.gate_weight = message.gate_positive_weight
        if message.spike_guard is not None:
            self.spike_guard = message.spike_guard

    def _rewind(self, step: int) -> None:
        """The trainer went back to ``step`` (rollback or resume): forget what it undid."""
        memory = self.memory
        memory.generation += 1
        kept = [m for m in self.metrics if m.step < step]
        self.metrics.clear()
        self.metrics.extend(kept)
        kept_reports = [r for r in self.reports if r.step < step]
        self.reports.clear()
        self.reports.extend(kept_reports)
        # Cooldowns count steps trained since firing, so a rule that fired in the undone
        # stretch cools down from the rewind point.
        memory.last_fired = {rule: min(fired, step) for rule, fired in memory.last_fired.items()}
        if self.verdict is not None and self.verdict.step >= step:
            self.verdict = None  # judged weights the trainer no longer has
        # The plateau clock starts over: the weights are those of an earlier step.
        self.plateau.restart()
        self._keep_best()

    def _keep_best(self) -> None:
        """The plateau clock's best goes in the memory, so a restarted tuner keeps it."""
        self.memory.best_objective = self.plateau.best
        self.memory.best_step = self.plateau.best_step

    def observe_report(self, report: AlignmentReport) -> None:
        """Take one alignment report; reports may arrive late or twice, order is by step."""
        if any(known.snapshot_id == report.snapshot_id for known in self.reports):
            return
        if self.reports and report.step < self.reports[0].step \
                and len(self.reports) == self.reports.maxlen:
            return  # older than everything kept: it would be evicted at once
        ordered = sorted([*self.reports, report], key=lambda r: r.step)
        self.reports.clear()
        self.reports.extend(ordered)

    def observe_verdict(self, message: VerdictMessage) -> None:
        """Take the trainer's verdict; the newest one written wins (after a rollback the
        trainer judges an earlier step, so step alone does not order them)."""
        if message.ts < self._verdict_ts:
            return  # a redelivered older verdict
        self.verdict, self._verdict_ts = message.verdict, message.ts

    def observe_event(self, event: Event) -> None:
        """Take a lifecycle event: restart counts, run start and end."""
        memory = self.memory
        consecutive = _count(event.data.get("consecutive"))
        if event.event in ("restart", "run_started"):
            if consecutive is not None:
                memory.consecutive_restarts = consecutive
            if event.event == "restart":
                memory.last_restart_ts = max(memory.last_restart_ts, event.ts)
            memory.ended = False
            memory.latched.discard(STOPPED)
        elif (report := probe_report(event)) is not None:
            if not self.probes or report.checkpoint_step > self.probes[-1].checkpoint_step:
                self.probes.append(report)
        elif event.event == "checkpoint_saved" and event.data.get("healthy") is True:
            # The trainer's own rule: a healthy checkpoint after a restart ends the crash loop.
            memory.consecutive_restarts = 0
        elif event.event in ("finished", "stopped"):
            memory.ended = True

    def observe_ack(self, ack: Ack) -> None:
        """Take the trainer's answer to a command: it is no longer in flight."""
        self.memory.in_flight.pop(ack.command_id, None)
        if ack.status != "applied" or ack.after is None:
            return
        # The next metrics would say the same; knowing now lets a follow-up use the new value.
        if ack.action == "set_lr":
            self.lr = ack.after
        elif ack.action == "set_guided_attention_weight":
            self.ga_weight = ack.after
        elif ack.action == "set_grad_clip":
            self.clip_threshold = ack.after
        elif ack.action == "set_gate_positive_weight":
            self.gate_weight = ack.after
        elif ack.action == "set_spike_guard":
            self.spike_guard = ack.after

    def expire_in_flight(self, now: float, grace_s: float) -> list[InFlight]:
        """Drop in-flight commands past expiry + grace (the trainer never answered)."""
        expired = [item for item in self.memory.in_flight.values()
                   if item.expires_at is not None and item.expires_at + grace_s < now]
        for item in expired:
            del self.memory.in_flight[item.command_id]
        return expired

    def record_fired(self, rule: str, step: int, command_id: str | None = None,
                     action: str | None = None, expires_at: float | None = None) -> None:
        """Remember that ``rule`` acted at ``step`` (cooldown) and what is now in flight."""
        self.memory.last_fired[rule] = step
        if command_id is not None and action is not None:
            self.memory.in_flight[command_id] = InFlight(
                command_id=command_id, rule=rule, action=action, step=step,
                expires_at=expires_at)

    def set_latch(self, name: str, raised: bool) -> None:
        """Raise or clear a hysteresis latch."""
        if raised:
            self.memory.latched.add(name)
        else:
            self.memory.latched.discard(name)
