"""Fault plans: parsing, when a fault is active (once or periodic), and the ga_off fault
acting through the trainer's own setter in a real (tiny) training run."""

from __future__ import annotations

import pytest

from services.trainer.faults import FaultPlan, GuidedAttentionRemoval


def test_a_plan_parses_and_names_its_bad_part() -> None:
    plan = FaultPlan.parse("grad_spike:start=20,steps=2,every=10,factor=50")
    assert (plan.kind, plan.start, plan.steps, plan.every, plan.factor) == (
        "grad_spike", 20, 2, 10, 50.0)
    with pytest.raises(ValueError, match="every"):
        FaultPlan.parse("grad_spike:every=0")
    with pytest.raises(ValueError, match="kind"):
        FaultPlan.parse("cosmic_ray:start=1")


def test_once_and_periodic_activity() -> None:
    once = FaultPlan(kind="grad_spike", start=5, steps=2)
    assert [s for s in range(20) if once.active(s)] == [5, 6]
    periodic = FaultPlan(kind="grad_spike", start=5, steps=2, every=6)
    assert [s for s in range(20) if periodic.active(s)] == [5, 6, 11, 12, 17, 18]


@pytest.mark.slow
def test_ga_off_removes_guided_attention_through_the_setter(small_corpus, small_config,
                                                            tmp_path) -> None:
    from services.trainer.training import Trainer

    plan = FaultPlan.parse("ga_off:start=3")
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", progress=False,
                      cache_dir=small_corpus / ".features")
    weights: list[float] = []

    class Record:
        def on_step(self, trainer, metrics) -> None:  # the TrainingObserver hook
            weights.append(metrics.guided_attention_weight)

        def __getattr__(self, name):  # every other hook: nothing to record
            return lambda *args, **kwargs: None

    trainer.controllers.append(GuidedAttentionRemoval(plan))
    trainer.observers.append(Record())
    trainer.train(max_steps=5)
    assert weights[0] > 0 and weights[-1] == 0.0
    assert any(o["kind"] == "set_guided_attention_weight" and o["source"] == "fault"
               and o["after"] == 0.0 for o in trainer.overrides), trainer.overrides
