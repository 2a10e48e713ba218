"""The tuner's policy configuration: every threshold, bound, cooldown and window, one file.

The plan's numbers (red flags, success thresholds) default to ``services.core.indicators``
so the tuner, the alert rules and the report agree on them; ``config/tuner.toml`` sets only
what is the tuner's own choice and may override a plan number deliberately. Unknown keys are
errors (a misspelt key must not silently fall back to a default).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from services.core import bounds as command_bounds
from services.core import indicators, plateau
from services.core.schemas import COMMAND_TTL_S, OnTimeout
from services.core.settings import ConfigError


class TunerConfigError(ConfigError):
    """The tuner config file is missing, not TOML, or has an invalid field (named)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GradNormRule(_Section):
    """Exploding gradients (red flag): halve the LR, raise a critical event."""

    red_flag: float = Field(indicators.GRAD_NORM_RED_FLAG, gt=0,
                            description="pre-clip grad norm above this is a red flag")
    window: int = Field(20, ge=1, description="K: the last K steps are judged")
    min_above: int = Field(10, ge=1, description="m: fire when >= m of the last K are above")
    recover_below: float = Field(50.0, gt=0, description="recovered: all of the recovery "
                                 "window below this")
    recover_window: int = Field(100, ge=1, description="steps the recovery must hold")
    lr_factor: float = Field(0.5, gt=0, lt=1)
    cooldown_steps: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _check(self) -> GradNormRule:
        if self.min_above > self.window:
            raise ValueError(f"min_above ({self.min_above}) exceeds window ({self.window})")
        if self.recover_below > self.red_flag:
            raise ValueError("recover_below must not exceed red_flag (hysteresis)")
        return self


class SpikesRule(_Section):
    """Isolated gradient spikes (fp16 overflow bursts look so): each is clipped, yet each
    fails the grad norm indicator's window, and the grad_norm rule, which wants them
    sustained, never fires. Found on the run's own statistics, not a fixed threshold: a
    robust z-score of log10(grad norm) against the window's median and MAD. Switches the
    trainer's spike guard on, which withholds such steps."""

    window: int = Field(100, ge=10, description="the last N steps are judged (fewer when "
                        "the service keeps fewer: service.metrics_window)")
    min_steps: int = Field(50, ge=10, description="finite norms needed before judging "
                           "(a median and a MAD of a few steps say little)")
    z_max: float = Field(4.0, gt=0, description="a norm whose robust z-score of log10 "
                         "exceeds this is a spike ...")
    guard_factor: float = Field(10.0, gt=0, description="... if it is also above this x the "
                                "window's median; the factor the guard is set to, so the "
                                "rule fires only on spikes the guard will withhold")
    min_spikes: int = Field(2, ge=1, description="fire when >= this many separate spikes "
                            "are in the window (one could be chance); spiked steps at most "
                            "burst_gap apart count as one")
    burst_gap: int = Field(3, ge=1, description="spiked steps this close are one burst")
    max_burst: int = Field(5, ge=1, description="a burst spanning more steps is no spike but "
                           "a change of level: the rule stays silent (the grad_norm rule's, "
                           "if it lasts)")
    cooldown_steps: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SpikesRule:
        if self.min_steps > self.window:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds window ({self.window})")
        # A factor outside the trainer's bounds would only come back "rejected" (and 0 is
        # the guard off, not a guard).
        reason = command_bounds.check_value("set_spike_guard", self.guard_factor)
        if reason is not None:
            raise ValueError(f"guard_factor: {reason}")
        return self


class AlignmentRule(_Section):
    """Poor alignment after warm-up: raise the guided attention weight; red flag below 0.1.

    A weight below ``rescue_weight`` (guided attention off, or too weak) jumps straight to
    it instead of creeping up by ``ga_factor``; and such a run does not wait for the whole
    warm-up when its alignment has not moved at all: from ``early_steps`` on, reports that
    are all below ``low`` and have not risen by ``flat_delta`` are enough.
    """

    low: float = Field(indicators.DIAGONALITY_WEAK, gt=0, le=1)
    min_reports: int = Field(2, ge=1, description="consecutive reports below `low` to act")
    ga_factor: float = Field(1.5, gt=1)
    rescue_weight: float = Field(command_bounds.GA_WEIGHT_ALIGNS, gt=0, description="a "
                                 "weight known to align the presets; a lower one jumps here")
    early_steps: int = Field(100, ge=0, description="a run below rescue_weight whose "
                             "alignment has not moved is acted on from this step")
    flat_delta: float = Field(0.02, gt=0, lt=1, description="'not moved': the diagonality "
                              "has risen by less than this over the reports")
    quality_low: float = Field(indicators.QUALITY_OK, gt=0, le=100, description="aligned, "
                               "but quality below this and not rising, with a weight below "
                               "rescue_weight: the weight is restored")
    quality_flat: float = Field(1.0, gt=0, description="'not rising': quality up by less "
                                "than this many points over the reports")
    cooldown_steps: int = Field(300, ge=1)
    red_flag: float = Field(indicators.DIAGONALITY_RED_FLAG, ge=0, lt=1)
    recover_above: float = Field(0.2, gt=0, le=1, description="hysteresis level of the red "
                                 "flag: recovered when the last reports are all above it")
    recover_reports: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check(self) -> AlignmentRule:
        if not self.red_flag < self.recover_above:
            raise ValueError("recover_above must exceed red_flag (hysteresis)")
        if self.red_flag > self.low:
            raise ValueError("red_flag must not exceed low")
        return self


class PlateauRule(_Section):
    """Objective not improving for 1000 steps (red flag): lower the LR; at the floor, stop."""

    steps: int = Field(indicators.LOSS_PLATEAU_STEPS_RED_FLAG, ge=1)
    min_rel_improvement: float = Field(plateau.DEFAULT_MIN_REL_IMPROVEMENT, ge=0, lt=1,
                                       description="a new best must be this much lower")
    smoothing: int = Field(plateau.DEFAULT_SMOOTHING, ge=1,
                           description="steps in the moving mean of the objective")
    lr_factor: float = Field(0.5, gt=0, lt=1)
    cooldown_steps: int = Field(500, ge=1)


class NonFiniteRule(_Section):
    """Repeated non-finite steps: leave out the batches they failed on; if non-finite steps
    go on after that, roll back to the last good checkpoint and lower the LR."""

    window: int = Field(20, ge=1, description="n: the last n steps are judged")
    min_count: int = Field(3, ge=1, description="k: fire when >= k of them were not finite")
    skip_lookback: int = Field(
        50, ge=0, description="first answer: skip_failed_batches over the last N steps "
                              "(0: roll back at once, as before)")
    lr_factor: float = Field(0.5, gt=0, lt=1)
    cooldown_steps: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _check(self) -> NonFiniteRule:
        if self.min_count > self.window:
            raise ValueError(f"min_count ({self.min_count}) exceeds window ({self.window})")
        return self


class RestartsRule(_Section):
    """Crash loop (red flag): stop when consecutive restarts exceed the plan's limit."""

    max_consecutive: int = Field(indicators.CONSECUTIVE_RESTARTS_RED_FLAG, ge=0)


class AnnealRule(_Section):
    """Stable alignment: lower the guided attention weight so it stops constraining."""

    stable_above: float = Field(indicators.DIAGONALITY_OK, gt=0, lt=1)
    quality_above: float = Field(indicators.QUALITY_OK, gt=0, le=100, description="and the "
                                 "quality indicator met: a weight the quality still needs "
                                 "is not annealed")
    min_reports: int = Field(4, ge=1, description="consecutive reports above to act")
    ga_factor: float = Field(0.5, gt=0, lt=1)
    cooldown_steps: int = Field(500, ge=1)


class InferenceRule(_Section):
    """Aligned teacher-forced, yet free-running the gate never fires (the sixth indicator's
    most common failure): raise the gate's positive weight."""

    aligned_above: float = Field(indicators.DIAGONALITY_OK, gt=0, lt=1, description=
                                 "teacher-forced diagonality the model must already reach")
    stop_below: float = Field(indicators.PROBES_STOP_OK, gt=0, le=100, description=
                              "% of probes that stop, below which a pass counts as failing")
    min_passes: int = Field(2, ge=1, description="consecutive failing probe passes to act "
                            "(one is enough where no probe stopped at all, and after a "
                            "raise of this rule that has not made them stop yet)")
    gate_factor: float = Field(2.0, gt=1, description="gate positive weight *= factor")
    escalate_factor: float = Field(4.0, gt=1, description="... and *= this when a raise of "
                                   "this rule has not made the probes stop yet (a second "
                                   "doubling costs another checkpoint interval)")
    rescue_weight: float = Field(command_bounds.GATE_WEIGHT_STOPS, gt=0, description="a "
                                 "weight the presets stop with: a lower one jumps here, "
                                 "after one failing pass")
    # Short: the next raise also waits for failing passes since this one, which is the
    # real brake; a long cooldown only let a gate that never fires keep failing.
    cooldown_steps: int = Field(50, ge=1)


class LearningRateRule(_Section):
    """No alignment at all although guided attention is on, and an LR far from one known to
    align (1e-2 diverges or never aligns, 1e-5 crawls): set that LR, at once."""

    aligns: float = Field(command_bounds.LR_ALIGNS, gt=0, description="the LR to set")
    band: float = Field(3.0, gt=1, description="an LR within aligns / band .. aligns x band "
                        "is left alone")
    min_reports: int = Field(3, ge=1, description="consecutive reports below alignment.low, "
                             "not risen by alignment.flat_delta")
    cooldown_steps: int = Field(300, ge=1)


class TunerBounds(_Section):
    """What the tuner may command: within the trainer's own bounds (services.core.bounds)."""

    lr_min: float = Field(command_bounds.LR_FLOOR, gt=0, description="the tuner's LR floor "
                          "(the trainer's min_learning_rate default); the trainer would "
                          "accept lower")
    lr_max: float = Field(command_bounds.LR_MAX, gt=0)
    ga_weight_min: float = Field(0.05, ge=0, description="annealing floor; also the weight a "
                                 "raise starts from when the weight is 0")
    ga_weight_max: float = Field(5.0, gt=0, description="cap of the raises")
    gate_weight_max: float = Field(40.0, gt=0, description="cap of the gate positive "
                                   "weight's raises (more makes the gate fire early)")

    @model_validator(mode="after")
    def _check(self) -> TunerBounds:
        if self.lr_min >= self.lr_max:
            raise ValueError("lr_min must be below lr_max")
        if self.ga_weight_min >= self.ga_weight_max:
            raise ValueError("ga_weight_min must be below ga_weight_max")
        # A command outside the trainer's bounds would only come back "rejected".
        for action, low, high in (("set_lr", self.lr_min, self.lr_max),
                                  ("set_guided_attention_weight", self.ga_weight_min,
                                   self.ga_weight_max),
                                  ("set_gate_positive_weight", self.gate_weight_max,
                                   self.gate_weight_max)):
            trainer = command_bounds.VALUE_BOUNDS[action]
            if not (trainer.contains(low) and trainer.contains(high)):
                raise ValueError(f"{action} bounds [{low:g}, {high:g}] must lie within the "
                                 f"trainer's [{trainer.low:g}, {trainer.high:g}]")
        return self


# The rules that send commands (services.tuner.policy's RULE_* names; the policy imports
# this module, so the names are spelt here and a test checks they match).
COMMAND_RULES = frozenset({"restarts", "non_finite", "grad_norm", "spikes", "plateau",
                           "alignment", "learning_rate", "anneal", "inference"})
# A crash loop's stop is a safety net, not a tuning choice: not asked about unless listed.
SUPERVISED_BY_DEFAULT = COMMAND_RULES - {"restarts"}


class SupervisedConfig(_Section):
    """Supervised mode: the listed rules propose in Telegram and wait for an admin's answer
    instead of commanding; silence for ``timeout_s`` applies or drops the command."""

    enabled: bool = False
    rules: frozenset[str] = Field(default=SUPERVISED_BY_DEFAULT,
                                  description="rules whose commands need approval")
    timeout_s: float = Field(600.0, gt=0, description="how long a proposal waits")
    on_timeout: OnTimeout = Field("apply", description="what an unanswered proposal "
                                  "becomes: 'apply' sends the command, 'drop' does not")

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, rules: frozenset[str]) -> frozenset[str]:
        unknown = sorted(rules - COMMAND_RULES)
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; rules that send "
                             f"commands: {', '.join(sorted(COMMAND_RULES))}")
        return rules

    def needs_approval(self, rule: str) -> bool:
        """Whether a command of ``rule`` waits for a person's answer."""
        return self.enabled and rule in self.rules


class ServiceConfig(_Section):
    """The loop around the policy: window sizes, command expiry, measuring, reclaiming."""

    metrics_window: int = Field(200, ge=1, description="metrics kept per run")
    reports_window: int = Field(16, ge=1, description="alignment reports kept per run")
    command_ttl_s: float = Field(COMMAND_TTL_S, gt=0,
                                 description="a command expires after this")
    ack_grace_s: float = Field(60.0, ge=0, description="after expiry + grace an unacked "
                               "command stops blocking its rule")
    measure_after_steps: int = Field(100, ge=1, description="effect measured N steps after "
                                     "the ack")
    max_lag_s: float = Field(300.0, gt=0, description="older messages update the window but "
                             "trigger nothing (catching up on history must not act on it)")
    poll_count: int = Field(100, ge=1)
    claim_idle_ms: int = Field(30_000, ge=1)
    claim_every_s: float = Field(30.0, gt=0)
    issued_ttl_s: int = Field(30 * 24 * 3600, ge=60, description="life of the per-run "
                              "idempotency keys")
    max_runs: int = Field(256, ge=1, description="run windows kept in memory; beyond it the "
                          "least recently active run without pending actions is let go (its "
                          "memory is in Redis and comes back when it speaks again)")


class TunerConfig(_Section):
    """The whole policy configuration."""

    warmup_steps: int = Field(300, ge=0, description="alignment rules wait this many steps")
    grad_norm: GradNormRule = Field(default_factory=GradNormRule)
    spikes: SpikesRule = Field(default_factory=SpikesRule)
    alignment: AlignmentRule = Field(default_factory=AlignmentRule)
    plateau: PlateauRule = Field(default_factory=PlateauRule)
    non_finite: NonFiniteRule = Field(default_factory=NonFiniteRule)
    restarts: RestartsRule = Field(default_factory=RestartsRule)
    anneal: AnnealRule = Field(default_factory=AnnealRule)
    inference: InferenceRule = Field(default_factory=InferenceRule)
    learning_rate: LearningRateRule = Field(default_factory=LearningRateRule)
    bounds: TunerBounds = Field(default_factory=TunerBounds)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    supervised: SupervisedConfig = Field(default_factory=SupervisedConfig)

    @model_validator(mode="after")
    def _check(self) -> TunerConfig:
        needed = {"grad_norm.window": self.grad_norm.window,
                  "grad_norm.recover_window": self.grad_norm.recover_window,
                  "non_finite.window": self.non_finite.window,
                  "plateau.smoothing": self.plateau.smoothing,
                  "service.measure_after_steps": self.service.measure_after_steps}
        for name, steps in needed.items():
            if steps > self.service.metrics_window:
                raise ValueError(f"{name} ({steps}) exceeds service.metrics_window "
                                 f"({self.service.metrics_window})")
        reports = {"alignment.min_reports": self.alignment.min_reports,
                   "alignment.recover_reports": self.alignment.recover_reports,
                   "anneal.min_reports": self.anneal.min_reports}
        for name, count in reports.items():
            if count > self.service.reports_window:
                raise ValueError(f"{name} ({count}) exceeds service.reports_window "
                                 f"({self.service.reports_window})")
        if self.anneal.stable_above <= self.alignment.low:
            raise ValueError("anneal.stable_above must exceed alignment.low, or raising and "
                             "annealing the weight could chase each other")
        return self


def _describe(error: ValidationError, path: Path) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"{path}: {field}: {item['msg']} (got {item.get('input')!r})")
    return "invalid tuner config:\n  " + "\n  ".join(lines)


def load_tuner_config(path: str | Path) -> TunerConfig:
    """Read and validate a tuner TOML file; TunerConfigError names the file and each field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunerConfigError(f"{path}: tuner config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TunerConfigError(f"{path}: cannot read tuner config: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise TunerConfigError(f"{path}: not valid TOML: {error}") from error
    try:
        return TunerConfig.model_validate(raw)
    except ValidationError as error:
        raise TunerConfigError(_describe(error, path)) from error
