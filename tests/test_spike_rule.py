"""The tuner's spikes rule (issue 12): pure tests on synthetic windows (no Redis).

Isolated grad-norm spikes (fp16 overflow bursts look so) are found on the run's own
statistics, a robust z-score of log10(grad norm), and answered by switching the trainer's
spike guard on; a healthy run, noisy as real ones are, never triggers it.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from pydantic import ValidationError

from services.core import bounds as command_bounds
from services.core import indicators
from services.core.schemas import Ack
from services.tuner import policy
from services.tuner.config import COMMAND_RULES, SUPERVISED_BY_DEFAULT, TunerConfig
from services.tuner.policy import (
    RULE_GRAD_NORM,
    RULE_SPIKES,
    Decision,
    Measure,
    measure_effect,
    robust_log_z,
)
from services.tuner.state import KNOB_OF_ACTION, RunWindow
from tests.test_policy import RUN, Sim, metrics, only

SPIKE_FACTOR = 1000.0  # the rescue benchmark's grad_spike factor
SPIKE_EVERY = 25
SPIKE_START = 40


class GuardSim(Sim):
    """``Sim`` against a trainer with a spike guard: its metrics carry the guard's factor
    and mark the steps it withheld, and a set_spike_guard command is obeyed."""

    def __init__(self, config: TunerConfig | None = None, *, guard: float | None = 0.0,
                 **kwargs: Any):
        super().__init__(config, **kwargs)
        self.guard = guard

    def _ack_all(self) -> None:
        for _, decision in self._unacked:
            if decision.action == "set_spike_guard":
                self.guard = decision.value
        super()._ack_all()

    def metric(self, **fields: Any) -> list[Decision]:
        """One step; a norm above the guard's factor x the base level is withheld."""
        if self.auto_ack:
            self._ack_all()
        fields.setdefault("objective", 10.0 * 0.999**self.step)
        base = fields.pop("base", None)
        message = metrics(self.step, lr=self.lr, ga=self.ga, gate=self.gate, **fields)
        guarded = bool(self.guard) and base is not None and message.grad_norm > self.guard * base
        message = message.model_copy(update={"spike_guard": self.guard, "guarded": guarded})
        self.step += 1
        self.window.observe_metrics(message)
        return self._act()


def healthy_norm(rng: random.Random, step: int, sigma: float, start: float = 5.0) -> float:
    """A healthy run's pre-clip norm: lognormal noise around a slow downward trend from
    ``start``, with warm-up bumps of 2-3x in the first 200 steps."""
    level = start * 0.9995**step
    norm = level * math.exp(rng.gauss(0.0, sigma))
    if step < 200 and rng.random() < 0.1:
        norm *= rng.uniform(2.0, 3.0)
    return norm


def spiked(step: int) -> bool:
    """The rescue recipe's fault: one step in every SPIKE_EVERY from SPIKE_START."""
    return step >= SPIKE_START and (step - SPIKE_START) % SPIKE_EVERY == 0


# ---------------------------------------------------------------------- the statistic


def test_robust_z_is_scale_free_and_ignores_the_spikes_it_judges() -> None:
    norms = [1.0, 1.1, 0.9, 1.05, 0.95] * 10 + [1000.0, 1000.0]
    z = robust_log_z(norms)
    assert min(z[-2:]) > 50  # orders of magnitude over a ~5% wobble
    assert max(abs(v) for v in z[:-2]) < 3
    # multiplying every norm by a constant changes nothing (logs, median, MAD)
    assert robust_log_z([n * 37.0 for n in norms]) == pytest.approx(z)
    # equal norms have a MAD of 0: the scale floor keeps every score finite
    assert all(math.isfinite(v) for v in robust_log_z([2.0] * 20 + [3.0]))


# ---------------------------------------------------------------------- the rule


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("seed", range(4))
def test_a_healthy_noisy_run_never_triggers_it(sigma: float, seed: int) -> None:
    rng = random.Random(seed)
    sim = GuardSim()
    for step in range(1500):
        sim.metric(grad=healthy_norm(rng, step, sigma))
    assert only(sim.decisions, RULE_SPIKES) == []
    assert sim.guard == 0.0


def test_periodic_1000x_spikes_switch_the_guard_on_once() -> None:
    rng = random.Random(7)
    config = TunerConfig()
    sim = GuardSim(config)
    fired_at: list[int] = []
    effect = None
    after = config.service.measure_after_steps
    for step in range(600):
        base = healthy_norm(rng, step, 0.3, start=1.0)  # the tiny preset's level
        norm = base * SPIKE_FACTOR if spiked(step) else base
        if only(sim.metric(grad=norm, base=base), RULE_SPIKES):
            fired_at.append(step)
        if fired_at and step == fired_at[0] + after + 1:  # as the service measures it
            [decision] = only(sim.decisions, RULE_SPIKES)
            assert decision.measure is not None
            effect = measure_effect(sim.window, decision.measure, decision.step, after)
    [decision] = only(sim.decisions, RULE_SPIKES)
    assert decision.action == "set_spike_guard"
    assert decision.value == config.spikes.guard_factor == 10.0
    # it waits for a median worth the name and for the second spike
    assert fired_at == [max(config.spikes.min_steps - 1, SPIKE_START + SPIKE_EVERY)]
    assert decision.trigger.metric == "grad_norm_spikes"
    assert decision.trigger.value >= config.spikes.min_spikes
    assert decision.measure == Measure(metric="applied_grad_norm",
                                       before=decision.measure.before,
                                       target=indicators.GRAD_NORM_OK, recovered_when="below")
    assert decision.measure.before > 1000  # the largest norm was a spike's
    assert sim.guard == 10.0  # obeyed: every later spike was withheld
    # the grad_norm rule, which needs them sustained, never fired
    assert only(sim.decisions, RULE_GRAD_NORM) == []
    # the effect: the largest norm of the applied steps after the ack is a healthy one
    assert effect is not None and effect.recovered
    assert effect.after < indicators.GRAD_NORM_OK and effect.steps == after


def test_one_spike_is_not_enough() -> None:
    rng = random.Random(3)
    sim = GuardSim()
    for step in range(300):
        base = healthy_norm(rng, step, 0.3)
        sim.metric(grad=base * SPIKE_FACTOR if step == 150 else base)
    assert only(sim.decisions, RULE_SPIKES) == []


def test_spikes_below_the_guard_factor_are_not_its_business() -> None:
    """Far out in z (a quiet run), yet only 5x: a guard at 10x would not withhold them."""
    sim = GuardSim()
    for step in range(300):
        sim.metric(grad=5.0 if step % 25 == 0 else 1.0 + 0.01 * (step % 3))
    assert only(sim.decisions, RULE_SPIKES) == []


def test_sustained_high_norms_are_the_grad_norm_rules() -> None:
    sim = GuardSim()
    sim.run(80, grad=1.0)
    for step in range(20):
        sim.metric(grad=1000.0 if step % 2 == 0 else 1.0)  # 10 of 20 above the red flag
    assert only(sim.decisions, RULE_SPIKES) == []
    assert only(sim.decisions, RULE_GRAD_NORM, "set_lr")


def test_a_change_of_level_is_no_spike() -> None:
    """The norms jump 1000x and stay: a burst longer than max_burst, not isolated spikes."""
    sim = GuardSim()
    sim.run(80, grad=1.0)
    sim.run(15, grad=1000.0)
    assert only(sim.decisions, RULE_SPIKES) == []


@pytest.mark.parametrize("guard", [None, 20.0])
def test_silent_when_the_trainer_has_no_guard_or_guards_already(guard: float | None) -> None:
    sim = GuardSim(guard=guard)
    for step in range(300):
        sim.metric(grad=1000.0 if spiked(step) else 1.0 + 0.1 * (step % 5))
    assert only(sim.decisions, RULE_SPIKES) == []


def test_a_guard_switched_off_again_waits_for_the_cooldown() -> None:
    config = TunerConfig()
    sim = GuardSim(config)
    for step in range(2000):
        if step == 200:
            sim.guard = 0.0  # a person switched it off: spikes reach the weights again
        sim.metric(grad=1000.0 if spiked(step) else 1.0 + 0.1 * (step % 5))
    steps = [d.step for d in only(sim.decisions, RULE_SPIKES)]
    assert len(steps) >= 2 and steps[1] - steps[0] >= config.spikes.cooldown_steps


def test_measure_counts_only_applied_steps() -> None:
    window = RunWindow(RUN, TunerConfig())
    for step, grad, finite, guarded in ((10, 900.0, True, False), (11, 2.0, True, False),
                                        (12, 800.0, True, True), (13, math.nan, False, False),
                                        (14, 3.0, True, False)):
        message = metrics(step, grad=grad, finite=finite).model_copy(
            update={"guarded": guarded, "spike_guard": 10.0})
        window.observe_metrics(message)
    measure = Measure(metric="applied_grad_norm", before=900.0,
                      target=indicators.GRAD_NORM_OK, recovered_when="below")
    effect = measure_effect(window, measure, 10, 100)
    assert effect.after == 3.0 and effect.recovered


def test_the_window_follows_the_guard_through_metrics_and_acks() -> None:
    window = RunWindow(RUN, TunerConfig())
    assert window.spike_guard is None
    window.observe_metrics(metrics(0))  # a trainer from before the guard: still unknown
    assert window.spike_guard is None
    window.observe_metrics(metrics(1).model_copy(update={"spike_guard": 0.0}))
    assert window.spike_guard == 0.0
    window.observe_ack(Ack(run_id=RUN, command_id="c", action="set_spike_guard",
                           status="applied", step=1, before=0.0, after=10.0))
    assert window.spike_guard == 10.0
    assert KNOB_OF_ACTION["set_spike_guard"] == "spike_guard"


# ---------------------------------------------------------------------- config


def test_the_rule_is_a_command_rule_and_supervised_by_default() -> None:
    assert RULE_SPIKES in COMMAND_RULES and RULE_SPIKES in SUPERVISED_BY_DEFAULT
    assert policy._spikes in policy._COMMAND_RULES
    supervised = TunerConfig.model_validate(
        {"supervised": {"enabled": True, "rules": ["spikes"]}}).supervised
    assert supervised.needs_approval("spikes")


@pytest.mark.parametrize("section", [
    {"spikes": {"guard_factor": 2.0}},  # a guard that would withhold healthy steps
    {"spikes": {"guard_factor": command_bounds.SPIKE_GUARD_MAX * 2}},
    {"spikes": {"min_steps": 60, "window": 50}},
])
def test_config_refuses_what_could_not_work(section: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TunerConfig.model_validate(section)
