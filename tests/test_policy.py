"""The tuner's policy and config: pure unit tests on synthetic windows (no Redis)."""

from __future__ import annotations

import math
import tomllib
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core import bounds as command_bounds
from services.core import indicators, plateau
from services.core.schemas import (
    COMMAND_TTL_S,
    Ack,
    AlignmentReport,
    AlignmentScores,
    Event,
    MetricsMessage,
    ProbeFailure,
    ProbeReport,
    Trigger,
    VerdictMessage,
)
from services.trainer.config import TrainConfig
from services.tuner.config import (
    TunerConfig,
    TunerConfigError,
    load_tuner_config,
)
from services.tuner.policy import (
    RULE_ALIGNMENT,
    RULE_ALIGNMENT_RED_FLAG,
    RULE_ANNEAL,
    RULE_BAD_BATCHES,
    RULE_GRAD_NORM,
    RULE_INDICATORS,
    RULE_INFERENCE,
    RULE_LEARNING_RATE,
    RULE_NON_FINITE,
    RULE_PLATEAU,
    Decision,
    Measure,
    apply_decision,
    command_id_for,
    decide,
    measure_effect,
)
from services.tuner.state import RunWindow

ROOT = Path(__file__).resolve().parent.parent
RUN = "sim"
RED = indicators.GRAD_NORM_RED_FLAG


def make_config(**sections: dict[str, Any]) -> TunerConfig:
    """Defaults, with some sections' fields overridden."""
    return TunerConfig.model_validate(sections)


def metrics(step: int, *, grad: float = 1.0, finite: bool = True, objective: float = 2.0,
            lr: float = 1e-3, ga: float = 1.0, ts: float | None = None,
            gate: float | None = None) -> MetricsMessage:
    """One synthetic step; ts grows with the step unless given."""
    return MetricsMessage(
        run_id=RUN, step=step, loss=objective, mel=objective / 2, mel_postnet=objective / 2,
        gate=0.1, guided_attention=0.1, objective=objective, grad_norm=grad, lr=lr,
        guided_attention_weight=ga, clip_threshold=1.0, step_seconds=1.0, finite=finite,
        skipped_steps=0, ts=1_000_000.0 + step if ts is None else ts,
        gate_positive_weight=gate)


def report(step: int, diagonality: float, quality: float = 50.0) -> AlignmentReport:
    """A synthetic alignment report."""
    scores = AlignmentScores(diagonality=diagonality, monotonicity=0.9, focus=0.5,
                             coverage=0.9, entropy=0.5, quality=quality)
    return AlignmentReport(run_id=RUN, snapshot_id=f"snap-{step}", step=step, scores=scores,
                           per_sample=[scores], ts=1_000_000.0 + step)


class Sim:
    """The policy against a trainer that obeys and acks every command before its next step."""

    def __init__(self, config: TunerConfig | None = None, *, lr: float = 1e-3, ga: float = 1.0,
                 auto_ack: bool = True, gate: float | None = None):
        self.config = config or TunerConfig()
        self.window = RunWindow(RUN, self.config)
        self.lr = lr
        self.ga = ga
        self.gate = gate
        self.auto_ack = auto_ack
        self.step = 0
        self.decisions: list[Decision] = []
        self._unacked: list[tuple[str, Decision]] = []

    @property
    def commands(self) -> list[Decision]:
        return [d for d in self.decisions if d.action is not None]

    def events(self, kind: str | None = None) -> list[Decision]:
        return [d for d in self.decisions
                if d.event is not None and (kind is None or d.event.event == kind)]

    def _act(self) -> list[Decision]:
        new = decide(self.window, self.config)
        for decision in new:
            command_id = command_id_for(RUN, decision) if decision.action else None
            apply_decision(self.window, decision, command_id)
            if command_id is not None:
                self._unacked.append((command_id, decision))
        self.decisions.extend(new)
        return new

    def _ack_all(self) -> None:
        for command_id, decision in self._unacked:
            before = after = None
            if decision.action == "set_lr":
                before, self.lr = self.lr, decision.value
                after = self.lr
            elif decision.action == "set_guided_attention_weight":
                before, self.ga = self.ga, decision.value
                after = self.ga
            elif decision.action == "set_gate_positive_weight":
                before, self.gate = self.gate, decision.value
                after = self.gate
            self.window.observe_ack(Ack(run_id=RUN, command_id=command_id,
                                        action=decision.action, status="applied",
                                        step=max(self.step - 1, 0), before=before, after=after))
        self._unacked.clear()

    def metric(self, **fields: Any) -> list[Decision]:
        """Train one step with these metrics; returns the decisions it caused."""
        if self.auto_ack:
            self._ack_all()
        # A steadily falling objective unless the test says otherwise: no plateau.
        fields.setdefault("objective", 10.0 * 0.999**self.step)
        message = metrics(self.step, lr=self.lr, ga=self.ga, gate=self.gate, **fields)
        self.step += 1
        self.window.observe_metrics(message)
        return self._act()

    def run(self, count: int, **fields: Any) -> list[Decision]:
        """``count`` identical steps."""
        out: list[Decision] = []
        for _ in range(count):
            out.extend(self.metric(**fields))
        return out

    def report(self, diagonality: float, quality: float = 50.0) -> list[Decision]:
        """An alignment report of the latest step."""
        self.window.observe_report(report(max(self.step - 1, 0), diagonality, quality))
        return self._act()

    def verdict(self, grad: float = 2.0, diagonality: float = 0.9, restarts: int = 0,
                loss: float = 0.5, quality: float = 85.0) -> list[Decision]:
        """The trainer's verdict at the latest step, from these measurements."""
        checks = indicators.evaluate_indicators(grad, diagonality, restarts, loss, quality)
        self.window.observe_verdict(VerdictMessage(
            run_id=RUN, verdict=indicators.make_verdict(max(self.step - 1, 0), checks),
            ts=1_000_000.0 + self.step))
        return self._act()

    def event(self, kind: str, **data: Any) -> list[Decision]:
        """A lifecycle event."""
        self.window.observe_event(Event(run_id=RUN, event=kind, data=data))
        return self._act()

    def probes(self, stop_percent: float, never_fired: int, too_long: int = 0
               ) -> list[Decision]:
        """A probe pass of a checkpoint at the latest step: 12 probes, the failures given."""
        failures = ([ProbeFailure(probe_id=f"p{i}", kind="k", stopped=False, length_ratio=2.2,
                                  diagonality=0.4) for i in range(never_fired)]
                    + [ProbeFailure(probe_id=f"q{i}", kind="k", stopped=True, length_ratio=0.3,
                                    diagonality=0.4) for i in range(too_long)])
        report = ProbeReport(checkpoint_step=max(self.step - 1, 0), n=12,
                             stop_percent=stop_percent, median_diagonality=0.6,
                             median_quality=60.0, seconds=1.0, failures=failures)
        return self.event("probes", **report.model_dump(mode="json"))


def only(decisions: list[Decision], rule: str, action: str | None = None) -> list[Decision]:
    return [d for d in decisions if d.rule == rule and (action is None or d.action == action)]


# ---------------------------------------------------------------------- config


def _keys(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a TOML table."""
    leaves: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            leaves.update(_keys(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_shipped_config_sets_only_what_deviates_from_the_defaults() -> None:
    """config/tuner.toml lists overrides, never a copy of a default (which would drift)."""
    path = ROOT / "config" / "tuner.toml"
    defaults = _keys(TunerConfig().model_dump())
    shipped = _keys(tomllib.loads(path.read_text()))
    assert set(shipped) <= set(defaults)
    assert [key for key, value in shipped.items() if value == defaults[key]] == []
    assert _keys(load_tuner_config(path).model_dump()) == {**defaults, **shipped}


def test_defaults_are_the_plan_numbers_and_the_shared_constants() -> None:
    config = TunerConfig()
    assert config.grad_norm.red_flag == indicators.GRAD_NORM_RED_FLAG
    assert config.alignment.red_flag == indicators.DIAGONALITY_RED_FLAG
    assert config.alignment.low == indicators.DIAGONALITY_WEAK
    assert config.bounds.lr_min == command_bounds.LR_FLOOR == TrainConfig().optim.min_learning_rate
    assert config.service.command_ttl_s == COMMAND_TTL_S
    assert config.plateau.smoothing == plateau.DEFAULT_SMOOTHING
    assert config.plateau.min_rel_improvement == plateau.DEFAULT_MIN_REL_IMPROVEMENT
    assert config.plateau.steps == indicators.LOSS_PLATEAU_STEPS_RED_FLAG
    assert config.restarts.max_consecutive == indicators.CONSECUTIVE_RESTARTS_RED_FLAG
    assert config.anneal.stable_above == indicators.DIAGONALITY_OK
    trainer_lr = command_bounds.VALUE_BOUNDS["set_lr"]
    trainer_ga = command_bounds.VALUE_BOUNDS["set_guided_attention_weight"]
    assert trainer_lr.contains(config.bounds.lr_min) and trainer_lr.contains(config.bounds.lr_max)
    assert trainer_ga.contains(config.bounds.ga_weight_min)
    assert trainer_ga.contains(config.bounds.ga_weight_max)


@pytest.mark.parametrize(("text", "expected"), [
    ("[grad_norm]\nlr_factor = 2.0\n", "grad_norm.lr_factor"),
    ("[grad_norm]\nwindow = 5\nmin_above = 6\n", "grad_norm"),
    ("[bounds]\nlr_mn = 1e-5\n", "bounds.lr_mn"),
    ("warmup_steps = -1\n", "warmup_steps"),
    ("[service]\nmetrics_window = 10\n", "exceeds service.metrics_window"),
    ("[anneal]\nstable_above = 0.2\n", "anneal.stable_above"),
    ("[bounds]\nlr_max = 1.0\n", "must lie within the trainer's"),
])
def test_config_errors_name_the_field_and_the_file(tmp_path: Path, text: str,
                                                   expected: str) -> None:
    path = tmp_path / "tuner.toml"
    path.write_text(text)
    with pytest.raises(TunerConfigError) as caught:
        load_tuner_config(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_config_missing_or_not_toml(tmp_path: Path) -> None:
    with pytest.raises(TunerConfigError, match="not found"):
        load_tuner_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[grad_norm\n")
    with pytest.raises(TunerConfigError, match="not valid TOML"):
        load_tuner_config(bad)


def test_decision_is_a_command_or_an_event() -> None:
    t = Trigger(rule="r", metric="m", value=1.0, threshold=1.0, window=0)
    with pytest.raises(ValueError, match="either a command or an event"):
        Decision(rule="r", step=0, trigger=t)
    with pytest.raises(ValueError, match="does not fit"):
        Decision(rule="r", step=0, trigger=t, action="set_lr")
    with pytest.raises(ValueError, match="does not fit"):
        Decision(rule="r", step=0, trigger=t, action="stop", value=1.0)


# ---------------------------------------------------------------------- grad norm


def test_grad_norm_halves_lr_and_raises_one_red_flag() -> None:
    sim = Sim()
    sim.run(9, grad=500.0)
    assert sim.decisions == []  # 9 of 9 above, but m = 10
    fired = sim.metric(grad=500.0)
    commands = only(fired, RULE_GRAD_NORM, "set_lr")
    assert len(commands) == 1
    assert commands[0].value == pytest.approx(5e-4)
    assert commands[0].trigger.value > RED and commands[0].trigger.threshold == RED
    flags = [d for d in fired if d.event and d.event.event == "red_flag"]
    assert len(flags) == 1 and flags[0].event.severity == "critical"


def test_grad_norm_quiet_below_m_of_k() -> None:
    sim = Sim()
    for step in range(1000):
        # 9 spikes in every 20 steps: never >= 10 of the last 20.
        sim.metric(grad=500.0 if step % 20 < 9 else 2.0)
    assert only(sim.decisions, RULE_GRAD_NORM) == []


def test_grad_norm_cooldown_and_floor_under_sustained_explosion() -> None:
    config = TunerConfig()
    sim = Sim(config)
    sim.run(1000, grad=500.0)
    commands = only(sim.decisions, RULE_GRAD_NORM, "set_lr")
    steps = [d.step for d in commands]
    assert all(b - a >= config.grad_norm.cooldown_steps for a, b in pairwise(steps))
    assert len(commands) <= math.ceil(1000 / config.grad_norm.cooldown_steps)
    assert all(d.value >= config.bounds.lr_min for d in commands)
    assert len(sim.events("red_flag")) == 1


def test_grad_norm_stops_at_the_floor() -> None:
    config = TunerConfig()
    sim = Sim(config, lr=config.bounds.lr_min * 1.5)
    sim.run(1000, grad=500.0)
    commands = only(sim.decisions, RULE_GRAD_NORM, "set_lr")
    assert [d.value for d in commands] == [pytest.approx(config.bounds.lr_min)]


def test_grad_norm_flapping_signal_stays_bounded() -> None:
    sim = Sim()
    for step in range(1000):
        sim.metric(grad=500.0 if (step // 20) % 2 == 0 else 1.0)  # 20 high, 20 low
    for step in range(1000, 2000):
        sim.metric(grad=500.0 if step % 2 else 1.0)  # every other step
    commands = sim.commands
    assert 1 <= len(commands) <= 2000 // TunerConfig().grad_norm.cooldown_steps
    # Never calm for the 100-step recovery window: one red flag, no recovered/red-flag pairs.
    assert len(sim.events("red_flag")) == 1 and sim.events("red_flag")[0].rule == RULE_GRAD_NORM
    assert sim.events("recovered") == []


def test_grad_norm_recovers_after_a_calm_window_then_can_flag_again() -> None:
    config = TunerConfig()
    sim = Sim(config)
    sim.run(20, grad=500.0)
    sim.run(config.grad_norm.recover_window - 1, grad=1.0)
    assert sim.events("recovered") == []
    sim.metric(grad=1.0)
    assert len(sim.events("recovered")) == 1
    sim.run(20, grad=500.0)
    assert len(sim.events("red_flag")) == 2


def test_grad_norm_waits_for_its_command_to_be_acked() -> None:
    sim = Sim(auto_ack=False)
    sim.run(1000, grad=500.0)
    assert len(only(sim.decisions, RULE_GRAD_NORM, "set_lr")) == 1


def test_unanswered_command_expires() -> None:
    config = TunerConfig()
    window = RunWindow(RUN, config)
    for step in range(20):
        window.observe_metrics(metrics(step, grad=500.0))
    decision = only(decide(window, config), RULE_GRAD_NORM, "set_lr")[0]
    apply_decision(window, decision, "c1", expires_at=100.0)
    assert window.rule_in_flight(RULE_GRAD_NORM)
    assert window.expire_in_flight(now=150.0, grace_s=60.0) == []
    assert [i.command_id for i in window.expire_in_flight(now=161.0, grace_s=60.0)] == ["c1"]
    assert not window.rule_in_flight(RULE_GRAD_NORM)


# ---------------------------------------------------------------------- non-finite


def test_non_finite_first_skips_the_failed_batches() -> None:
    """Behaviour changed on purpose (issue 12): the trainer never applies a non-finite
    update, so the first answer leaves the failed batches out and keeps the progress; the
    skip worked when no further non-finite steps follow."""
    config = TunerConfig()
    sim = Sim(config)
    sim.run(10)
    sim.metric(grad=math.nan, finite=False)
    sim.metric(grad=math.nan, finite=False)
    assert sim.commands == []  # 2 of the last 20: k = 3
    fired = sim.metric(grad=math.inf, finite=False)
    [skip] = only(fired, RULE_BAD_BATCHES)
    assert skip.action == "skip_failed_batches"
    assert skip.value == config.non_finite.skip_lookback
    assert only(fired, RULE_NON_FINITE) == []
    sim.run(100)  # clean after the skip: no rollback, no lower LR
    assert only(sim.decisions, RULE_NON_FINITE) == []


def test_non_finite_rolls_back_then_lowers_lr_when_the_skip_did_not_help() -> None:
    sim = Sim()
    sim.run(10)
    for _ in range(3):
        sim.metric(grad=math.nan, finite=False)
    assert [d.action for d in only(sim.decisions, RULE_BAD_BATCHES)] == ["skip_failed_batches"]
    sim.run(5)
    sim.metric(grad=math.nan, finite=False)
    sim.metric(grad=math.nan, finite=False)
    fired = sim.metric(grad=math.inf, finite=False)  # 3 more after the skip
    commands = only(fired, RULE_NON_FINITE)
    assert [d.action for d in commands] == ["rollback", "set_lr"]
    assert commands[0].step == commands[1].step
    assert commands[1].value == pytest.approx(5e-4)
    # The two commands have distinct ids (they share rule and step).
    assert len({command_id_for(RUN, d) for d in commands}) == 2
    # The grad-norm rule must not also move the LR in the same breath.
    assert len([d for d in fired if d.action == "set_lr"]) == 1


def test_non_finite_cooldown() -> None:
    config = make_config(non_finite={"skip_lookback": 0})  # rollbacks alone, as before
    sim = Sim(config)
    for step in range(600):
        sim.metric(grad=math.nan if step % 3 == 0 else 1.0, finite=step % 3 != 0)
    rollbacks = only(sim.decisions, RULE_NON_FINITE, "rollback")
    steps = [d.step for d in rollbacks]
    assert len(rollbacks) == 3
    assert all(b - a >= config.non_finite.cooldown_steps for a, b in pairwise(steps))


def test_rewind_forgets_the_undone_steps_and_a_replay_is_not_a_rewind() -> None:
    config = TunerConfig()
    window = RunWindow(RUN, config)
    for step in range(30):
        window.observe_metrics(metrics(step, finite=step < 25, grad=1.0))
    assert sum(not m.finite for m in window.metrics) == 5
    window.observe_metrics(metrics(12, ts=1_000_000.0 + 12))  # redelivered entry
    assert window.memory.generation == 0 and window.step == 29
    window.record_fired(RULE_NON_FINITE, 27)
    window.observe_metrics(metrics(21, ts=2_000_000.0))  # resumed from a checkpoint
    assert window.memory.generation == 1 and window.step == 21
    assert all(m.finite for m in window.metrics)
    assert window.memory.last_fired[RULE_NON_FINITE] == 21


# ---------------------------------------------------------------------- plateau


def test_plateau_lowers_lr_after_the_plan_steps() -> None:
    config = TunerConfig()
    sim = Sim(config)
    sim.run(config.plateau.smoothing, objective=2.0)
    best_step = sim.window.memory.best_step
    assert best_step is not None
    sim.run(config.plateau.steps - 1, objective=2.0)
    assert only(sim.decisions, RULE_PLATEAU) == []
    fired = sim.metric(objective=2.0)
    commands = only(fired, RULE_PLATEAU, "set_lr")
    assert len(commands) == 1 and commands[0].value == pytest.approx(5e-4)
    assert commands[0].trigger.window == config.plateau.steps


def test_plateau_quiet_while_the_objective_falls() -> None:
    sim = Sim()
    for step in range(3000):
        sim.metric(objective=10.0 * 0.999**step)
    assert only(sim.decisions, RULE_PLATEAU) == []


def test_plateau_at_the_floor_stops_once_and_then_nothing_more() -> None:
    config = TunerConfig()
    sim = Sim(config, lr=config.bounds.lr_min)
    sim.run(config.plateau.smoothing + config.plateau.steps, objective=2.0)
    plateau = only(sim.decisions, RULE_PLATEAU)
    assert [d.action for d in plateau] == ["stop", None]
    assert plateau[1].event.event == "red_flag" and plateau[1].event.severity == "critical"
    before = len(sim.decisions)
    sim.run(1000, objective=2.0, grad=500.0, finite=False)
    assert [d for d in sim.decisions[before:] if d.action is not None] == []


def test_plateau_lr_lowering_is_bounded() -> None:
    config = TunerConfig()
    sim = Sim(config)
    sim.run(8000, objective=2.0)
    set_lrs = only(sim.decisions, RULE_PLATEAU, "set_lr")
    assert set_lrs and all(d.value >= config.bounds.lr_min for d in set_lrs)
    assert [d.action for d in only(sim.decisions, RULE_PLATEAU) if d.action][-1] == "stop"


# ---------------------------------------------------------------------- restarts


def test_restarts_stop_once_per_episode() -> None:
    limit = indicators.CONSECUTIVE_RESTARTS_RED_FLAG
    sim = Sim()
    assert sim.event("restart", consecutive=limit) == []
    fired = sim.event("restart", consecutive=limit + 1)
    assert [d.action for d in fired] == ["stop", None]
    assert fired[1].event.event == "red_flag" and fired[1].event.severity == "critical"
    assert sim.event("restart", consecutive=limit + 2) == []
    recovered = sim.event("restart", consecutive=0)
    assert [d.event.event for d in recovered] == ["recovered"]
    fired_again = sim.event("restart", consecutive=limit + 1)
    assert [d.action for d in fired_again] == ["stop", None]


def test_restart_count_follows_the_trainer() -> None:
    sim = Sim()
    sim.event("restart", consecutive=2)
    assert sim.window.memory.consecutive_restarts == 2
    sim.event("checkpoint_saved", healthy=False)
    assert sim.window.memory.consecutive_restarts == 2
    sim.event("checkpoint_saved", healthy=True)  # progress after a restart ends the loop
    assert sim.window.memory.consecutive_restarts == 0
    sim.event("run_started", consecutive=1, restarted=True)
    assert sim.window.memory.consecutive_restarts == 1
    sim.event("restart", consecutive=True)  # not a count: ignored
    assert sim.window.memory.consecutive_restarts == 1


# ---------------------------------------------------------------------- alignment


def test_alignment_raises_guided_attention_after_warm_up_only() -> None:
    config = TunerConfig()
    sim = Sim(config)
    sim.run(100)
    sim.report(0.05)
    sim.report(0.05)
    assert sim.decisions == []  # warm-up
    sim.run(config.warmup_steps)
    sim.report(0.2)
    assert only(sim.decisions, RULE_ALIGNMENT) == []  # one report is not a trend
    sim.metric()
    fired = sim.report(0.25)
    raised = only(fired, RULE_ALIGNMENT, "set_guided_attention_weight")
    assert len(raised) == 1 and raised[0].value == pytest.approx(1.5)


def test_alignment_raise_is_capped_and_starts_from_zero() -> None:
    config = TunerConfig()
    capped = Sim(config, ga=4.0)
    capped.run(config.warmup_steps + 1)
    capped.report(0.2)
    capped.metric()
    capped.report(0.2)
    assert [d.value for d in capped.commands] == [config.bounds.ga_weight_max]
    for _ in range(20):
        capped.run(config.alignment.cooldown_steps)
        capped.report(0.2)
    assert len(capped.commands) == 1  # at the cap: nothing more to give



def test_guided_attention_off_escalates_to_a_weight_that_aligns_early() -> None:
    """Behaviour changed on purpose (issue 12): a run with guided attention off used to get
    ga_weight_min (0.05) after the 300-step warm-up, then +50 % per cooldown; now a weight
    below rescue_weight jumps to it, from early_steps when the alignment has not moved."""
    config = TunerConfig()
    cfg = config.alignment
    zero = Sim(config, ga=0.0)
    zero.run(cfg.early_steps - 10)
    zero.report(0.05)
    zero.metric()
    zero.report(0.05)
    assert zero.commands == []  # before early_steps nothing, flat or not
    zero.run(10)
    zero.report(0.06)
    zero.metric()
    fired = zero.report(0.06)
    [raised] = only(fired, RULE_ALIGNMENT, "set_guided_attention_weight")
    assert raised.value == cfg.rescue_weight and zero.step < config.warmup_steps
    # Moving (but still poor) alignment below the rescue weight waits for the warm-up...
    moving = Sim(config, ga=0.2)
    moving.run(cfg.early_steps + 10)
    moving.report(0.05)
    moving.metric()
    moving.report(0.15)
    assert moving.commands == []
    moving.run(config.warmup_steps)
    moving.report(0.2)
    moving.metric()
    moving.report(0.25)
    # ...then still jumps to the rescue weight, not 0.2 x 1.5.
    assert [d.value for d in moving.commands] == [cfg.rescue_weight]
    # A run at the rescue weight already (the healthy presets) never acts before warm-up.
    healthy = Sim(config, ga=cfg.rescue_weight)
    healthy.run(cfg.early_steps + 10)
    healthy.report(0.05)
    healthy.metric()
    healthy.report(0.05)
    assert healthy.commands == []


def test_alignment_red_flag_latch_and_hysteresis() -> None:
    config = TunerConfig()
    sim = Sim(config)
    sim.run(config.warmup_steps)
    for _ in range(10):
        sim.metric()
        sim.report(0.05)
    flags = [d for d in sim.events("red_flag") if d.rule == RULE_ALIGNMENT_RED_FLAG]
    assert len(flags) == 1 and flags[0].event.severity == "critical"
    for _ in range(10):  # between red flag and recovery level: still latched, silent
        sim.metric()
        sim.report(0.15)
    assert sim.events("recovered") == []
    for _ in range(config.alignment.recover_reports):
        sim.metric()
        sim.report(0.5)
    assert [d.rule for d in sim.events("recovered")] == [RULE_ALIGNMENT_RED_FLAG]
    assert len([d for d in sim.events("red_flag") if d.rule == RULE_ALIGNMENT_RED_FLAG]) == 1


def test_alignment_flapping_reports_stay_bounded() -> None:
    config = TunerConfig()
    sim = Sim(config)
    sim.run(config.warmup_steps)
    for index in range(400):  # a report every 5 steps, 0.05 / 0.9 alternating
        sim.run(5)
        sim.report(0.05 if index % 2 else 0.9)
    assert len(sim.events("red_flag")) == 1
    assert len(sim.commands) <= 2000 // config.alignment.cooldown_steps


def test_anneal_lowers_weight_on_stable_alignment_with_floor_and_fresh_reports() -> None:
    """Behaviour changed on purpose (issue 12): the floor is the weight known to align, not
    ga_weight_min, so a healthy run at that weight gets no command (the trainer's own
    schedule decays it); anneal undoes raises above it."""
    config = TunerConfig()
    sim = Sim(config, ga=4.0)
    for _ in range(config.anneal.min_reports - 1):
        sim.run(25)
        sim.report(0.9, quality=85.0)
    assert sim.commands == []
    sim.run(25)
    fired = sim.report(0.9, quality=85.0)
    assert [d.value for d in only(fired, RULE_ANNEAL)] == [pytest.approx(2.0)]
    for _ in range(100):
        sim.run(25)
        sim.report(0.9, quality=85.0)
    values = [d.value for d in only(sim.decisions, RULE_ANNEAL)]
    assert values == [pytest.approx(2.0), pytest.approx(config.alignment.rescue_weight)]
    steps = [d.step for d in only(sim.decisions, RULE_ANNEAL)]
    assert steps[1] - steps[0] >= config.anneal.cooldown_steps
    healthy = Sim(config, ga=config.alignment.rescue_weight)
    for _ in range(3 * config.anneal.min_reports):
        healthy.run(25)
        healthy.report(0.95, quality=89.0)
    assert healthy.commands == []


def test_anneal_waits_for_the_quality_indicator() -> None:
    """Behaviour changed on purpose (issue 12): annealing a weight the quality still needs
    undid it (the collapse recipe); stable diagonality with quality short is left alone."""
    config = TunerConfig()
    sim = Sim(config, ga=config.alignment.rescue_weight)
    for _ in range(2 * config.anneal.min_reports):
        sim.run(25)
        sim.report(0.9, quality=75.0)
    assert only(sim.decisions, RULE_ANNEAL) == []


def test_guided_attention_removed_after_alignment_is_restored_when_quality_stalls() -> None:
    """The collapse recipe: aligned (diagonality 0.8), then guided attention set to 0; the
    quality stays at 73-75 % (< 80) without rising: the weight goes back to the rescue
    weight, triggered by quality. With the weight on, the same reports change nothing."""
    config = TunerConfig()
    removed = Sim(config, ga=0.0)
    removed.run(config.alignment.early_steps + 1)
    for quality in (74.0, 73.0, 74.5):
        removed.report(0.8, quality=quality)
        removed.run(25)
    [restored] = only(removed.decisions, RULE_ALIGNMENT)
    assert restored.value == config.alignment.rescue_weight
    assert restored.trigger.metric == "quality"
    assert restored.trigger.threshold == indicators.QUALITY_OK
    kept = Sim(config, ga=config.alignment.rescue_weight)
    kept.run(config.alignment.early_steps + 1)
    rising = Sim(config, ga=0.0)
    rising.run(config.alignment.early_steps + 1)
    for quality in (70.0, 72.0, 74.0):
        kept.report(0.8, quality=quality - 3)
        kept.run(25)
        rising.report(0.8, quality=quality)  # still rising: give it time
        rising.run(25)
    assert only(kept.decisions, RULE_ALIGNMENT) == only(rising.decisions, RULE_ALIGNMENT) == []


# ---------------------------------------------------------------------- success indicators


def test_indicators_met_once() -> None:
    sim = Sim()
    sim.run(50, grad=2.0, objective=0.5)
    sim.verdict(quality=70.0)
    assert sim.events("indicators_met") == []
    sim.verdict(quality=85.0)
    met = sim.events("indicators_met")
    assert len(met) == 1 and met[0].rule == RULE_INDICATORS
    assert "at step 49" in met[0].event.detail and "quality" in met[0].event.detail
    sim.run(50, grad=2.0, objective=0.5)
    sim.verdict(quality=90.0)
    assert len(sim.events("indicators_met")) == 1


@pytest.mark.parametrize("spoiler", ["grad", "loss", "quality", "restarts", "diagonality"])
def test_indicators_follow_the_trainers_verdict_not_the_window(spoiler: str) -> None:
    """Behaviour changed on purpose (issue 11): the tuner used to judge the indicators from
    its own window; now it announces the trainer's verdict and nothing else. A window that
    looks perfect with a verdict that fails one indicator announces nothing."""
    sim = Sim()
    sim.run(50, grad=2.0, objective=0.5)
    sim.report(0.9, quality=85.0)
    spoilt = {"grad": {"grad": 12.0}, "loss": {"loss": 1.5}, "quality": {"quality": 70.0},
              "restarts": {"restarts": 1}, "diagonality": {"diagonality": 0.5}}[spoiler]
    sim.verdict(**spoilt)
    assert sim.events("indicators_met") == []


def test_indicators_met_by_verdict_even_when_the_window_disagrees() -> None:
    """The window's last step has a grad norm of 12 and no alignment report at all; the
    trainer judged its evaluation window and says met: the tuner says what the trainer says."""
    sim = Sim()
    sim.run(50, grad=12.0, objective=1.5)
    sim.verdict()
    assert len(sim.events("indicators_met")) == 1


def test_a_rollback_drops_a_verdict_of_undone_steps() -> None:
    window = RunWindow(RUN, TunerConfig())
    for step in range(0, 60):
        window.observe_metrics(metrics(step))
    checks = indicators.evaluate_indicators(2.0, 0.9, 0, 0.5, 85.0)
    window.observe_verdict(VerdictMessage(run_id=RUN, verdict=indicators.make_verdict(
        59, checks), ts=1_000_059.0))
    assert window.verdict is not None
    window.observe_metrics(metrics(40, ts=1_000_100.0))  # rolled back to step 40
    assert window.verdict is None


# ---------------------------------------------------------------------- effects


def test_measure_effect() -> None:
    window = RunWindow(RUN, TunerConfig())
    for step in range(10):
        window.observe_metrics(metrics(step, grad=500.0 if step < 5 else 2.0))
    grad = Measure(metric="grad_norm", before=500.0, target=RED, recovered_when="below")
    effect = measure_effect(window, grad, since_step=4, steps=5)
    assert effect.recovered and effect.after == 2.0 and effect.steps == 5
    assert not measure_effect(window, grad, since_step=0, steps=5).recovered
    window.observe_report(report(8, 0.5))
    diag = Measure(metric="diagonality", before=0.1, target=0.3, recovered_when="above")
    assert measure_effect(window, diag, since_step=4, steps=5).recovered
    missing = measure_effect(window, diag, since_step=9, steps=5)
    assert math.isnan(missing.after) and not missing.recovered


# ---------------------------------------------------------------------- properties

SMALL = {
    "warmup_steps": 5,
    "grad_norm": {"window": 5, "min_above": 3, "cooldown_steps": 10, "recover_window": 10},
    "non_finite": {"window": 5, "min_count": 2, "cooldown_steps": 10},
    "plateau": {"steps": 30, "smoothing": 5, "cooldown_steps": 15},
    "alignment": {"min_reports": 1, "cooldown_steps": 10},
    "anneal": {"min_reports": 2, "cooldown_steps": 10},
    "service": {"metrics_window": 40, "measure_after_steps": 5},
}

step_strategy = st.tuples(
    st.sampled_from([0.5, 5.0, 50.0, 150.0, 500.0, 1e5, math.nan, math.inf]),
    st.booleans(),  # finite flag (a non-finite step usually has a NaN norm; any mix is legal)
    st.floats(min_value=0.01, max_value=100.0),  # objective
    st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),  # a report this step?
    st.booleans(),  # does the trainer ack what it got before this step?
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step_strategy, min_size=1, max_size=250),
       lr=st.floats(min_value=1e-5, max_value=1e-2), ga=st.floats(min_value=0.0, max_value=6.0))
def test_any_metric_sequence_respects_bounds_and_cooldowns(
        steps: list[tuple[float, bool, float, float | None, bool]], lr: float,
        ga: float) -> None:
    config = make_config(**SMALL)
    sim = Sim(config, lr=lr, ga=ga, auto_ack=False)
    for grad, finite, objective, diagonality, ack in steps:
        if ack:
            sim._ack_all()
        sim.metric(grad=grad, finite=finite and math.isfinite(grad), objective=objective)
        if diagonality is not None:
            sim.report(diagonality, quality=90.0)
    bounds = config.bounds
    cooldowns = {RULE_GRAD_NORM: config.grad_norm.cooldown_steps,
                 RULE_NON_FINITE: config.non_finite.cooldown_steps,
                 RULE_BAD_BATCHES: config.non_finite.cooldown_steps,
                 RULE_PLATEAU: config.plateau.cooldown_steps,
                 RULE_ALIGNMENT: config.alignment.cooldown_steps,
                 RULE_ANNEAL: config.anneal.cooldown_steps}
    for decision in sim.commands:
        if decision.action == "set_lr":
            assert bounds.lr_min <= decision.value <= bounds.lr_max
        if decision.action == "set_guided_attention_weight":
            assert bounds.ga_weight_min <= decision.value <= bounds.ga_weight_max
    for rule, cooldown in cooldowns.items():
        fired = sorted({d.step for d in only(sim.commands, rule)})
        assert all(b - a >= cooldown for a, b in pairwise(fired)), (rule, fired)
    # A stop is final; the success event is sent once; every trigger has its own id.
    assert len([d for d in sim.commands if d.action == "stop"]) <= 1
    assert len(sim.events("indicators_met")) <= 1
    ids = [command_id_for(RUN, d) for d in sim.commands]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------- inference


def test_a_gate_that_never_fires_gets_a_heavier_positive_weight() -> None:
    sim = Sim(gate=5.0)
    sim.run(400)
    sim.report(0.9)  # aligned teacher-forced
    assert only(sim.probes(25.0, never_fired=9), RULE_INFERENCE) == []  # one pass: wait
    sim.run(100)
    (raised,) = only(sim.probes(25.0, never_fired=9), RULE_INFERENCE,
                     "set_gate_positive_weight")
    assert raised.value == 10.0  # 5 * gate_factor
    assert raised.trigger.metric == "probes_stop" and raised.trigger.value == 25.0
    assert raised.trigger.threshold == indicators.PROBES_STOP_OK
    # Within the cooldown, more failing passes change nothing...
    sim.run(20)
    assert only(sim.probes(30.0, never_fired=8), RULE_INFERENCE) == []
    # ... until it ends: that one failing pass since the raise raises it again (the raise
    # did not do), without waiting for a second pass.
    sim.run(50)
    (again,) = [d for d in only(sim.decisions, RULE_INFERENCE) if d.step > raised.step]
    assert again.value == 40.0 and again.step == raised.step + 50  # 10 * escalate_factor
    # The effect is read from the next probe pass.
    effect = measure_effect(sim.window, again.measure, again.step, 100)
    assert math.isnan(effect.after) and not effect.recovered
    sim.run(100)
    sim.probes(95.0, never_fired=0)
    effect = measure_effect(sim.window, again.measure, again.step, 100)
    assert effect.after == 95.0 and effect.recovered


@pytest.mark.parametrize("lr", [1e-2, 1e-5])
def test_an_lr_far_from_one_that_aligns_is_set_to_it_when_nothing_aligns(lr: float) -> None:
    """Issue 12: lr 1e-2 (diverges or never aligns) and 1e-5 (crawls) with guided attention
    on: once three reports from early_steps on show no alignment and no rise, the LR is set
    to one known to align, at once (the grad-norm and plateau rules would take hundreds to
    thousands of steps of halvings, and never raise it)."""
    config = TunerConfig()
    sim = Sim(config, lr=lr, ga=config.alignment.rescue_weight)
    sim.run(config.alignment.early_steps + 1)
    for diagonality in (0.06, 0.05, 0.06):
        sim.report(diagonality)
        sim.run(25)
    [raised] = only(sim.decisions, RULE_LEARNING_RATE, "set_lr")
    assert raised.value == config.learning_rate.aligns == command_bounds.LR_ALIGNS
    assert raised.trigger.metric == "diagonality"
    # one decision per episode: the cooldown and the new LR keep it quiet
    for _ in range(5):
        sim.report(0.05)
        sim.run(25)
    assert len(only(sim.decisions, RULE_LEARNING_RATE)) == 1


def test_the_lr_rule_leaves_aligning_runs_good_lrs_and_missing_guided_attention_alone(
        ) -> None:
    config = TunerConfig()
    rising = Sim(config, lr=1e-2, ga=1.0)  # aligning, if slowly: not this rule's
    rising.run(config.alignment.early_steps + 1)
    for diagonality in (0.05, 0.1, 0.15, 0.2):
        rising.report(diagonality)
        rising.run(25)
    good = Sim(config, lr=2e-3, ga=1.0)  # within the band: the LR is not the problem
    good.run(config.alignment.early_steps + 1)
    off = Sim(config, lr=1e-2, ga=0.0)  # guided attention off: the alignment rule's turn
    off.run(config.alignment.early_steps + 1)
    for sim in (good, off):
        for _ in range(3):
            sim.report(0.05)
            sim.run(25)
    assert [only(s.decisions, RULE_LEARNING_RATE) for s in (rising, good, off)] == [[], [], []]
    assert [d.action for d in only(off.decisions, RULE_ALIGNMENT)] == [
        "set_guided_attention_weight"]


def test_a_pass_where_no_probe_stopped_is_evidence_enough() -> None:
    """Behaviour changed on purpose (issue 12, recorded speech): at the presets' weight a
    gate that never fired in a whole pass doubles at once; a partial failure still waits
    for a second pass."""
    sim = Sim(gate=5.0)
    sim.run(400)
    sim.report(0.9)
    (raised,) = only(sim.probes(0.0, never_fired=12), RULE_INFERENCE,
                     "set_gate_positive_weight")
    assert raised.value == 10.0
    sim.run(60)
    (again,) = only(sim.probes(40.0, never_fired=7), RULE_INFERENCE)  # raised, not there yet
    assert again.value == 40.0  # 10 * escalate_factor, at the cap
    sim.run(60)
    assert only(sim.probes(40.0, never_fired=7), RULE_INFERENCE) == []  # at the cap


def test_a_partial_failure_waits_for_a_second_pass_before_the_first_raise() -> None:
    sim = Sim(gate=5.0)
    sim.run(400)
    sim.report(0.9)
    assert only(sim.probes(40.0, never_fired=7), RULE_INFERENCE) == []
    sim.run(60)
    (raised,) = only(sim.probes(40.0, never_fired=7), RULE_INFERENCE)
    assert raised.value == 10.0


def test_a_gate_weight_far_too_low_jumps_to_one_that_stops_after_one_pass() -> None:
    """Behaviour changed on purpose (issue 12): below the presets' weight one failing pass
    is enough, and the weight jumps there instead of doubling pass by pass."""
    config = TunerConfig()
    sim = Sim(config, gate=1.0)
    sim.run(400)
    sim.report(0.9)
    (raised,) = only(sim.probes(0.0, never_fired=12), RULE_INFERENCE,
                     "set_gate_positive_weight")
    assert raised.value == config.inference.rescue_weight


def test_inference_rule_leaves_unaligned_runs_and_early_stops_alone() -> None:
    unaligned = Sim(gate=5.0)
    unaligned.run(400)
    unaligned.report(0.4)  # not aligned teacher-forced: other rules' business
    unaligned.probes(0.0, never_fired=12)
    unaligned.run(100)
    unaligned.report(0.4)
    assert only(unaligned.probes(0.0, never_fired=12), RULE_INFERENCE) == []
    early = Sim(gate=5.0)
    early.run(400)
    early.report(0.9)
    early.probes(25.0, never_fired=2, too_long=7)
    early.run(100)
    # It stops, but too early: a heavier stop weight would make that worse.
    assert only(early.probes(25.0, never_fired=2, too_long=7), RULE_INFERENCE) == []
    old_trainer = Sim(gate=None)  # a trainer that does not report the weight
    old_trainer.run(400)
    old_trainer.report(0.9)
    old_trainer.probes(0.0, never_fired=12)
    old_trainer.run(100)
    assert only(old_trainer.probes(0.0, never_fired=12), RULE_INFERENCE) == []
