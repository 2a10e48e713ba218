"""The services' Prometheus metrics: the trainer's over real HTTP during a real run, the
tuner's decisions, the shared plateau clock, and the alert rules' numbers."""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.core import indicators
from services.core.bus import PublisherStats
from services.core.metrics import DeadLetterCounter
from services.core.plateau import PlateauClock, is_improvement
from services.core.settings import ConfigError
from services.diagnostics import exporter as diagnostics_exporter
from services.trainer import exporter as trainer_exporter
from services.trainer.exporter import PrometheusObserver, TrainerMetrics, serve_metrics
from services.trainer.faults import FaultPlan
from services.trainer.training import Trainer
from services.tuner import exporter as tuner_exporter
from services.tuner.config import load_tuner_config
from services.tuner.exporter import TunerMetrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "smart-tuner.yml"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_trainer_metrics_over_http_during_a_run(small_corpus, small_config, tmp_path,
                                                run_id) -> None:
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", progress=False,
                      cache_dir=small_corpus / ".features", run_id=run_id,
                      fault=FaultPlan(kind="nan_grad", start=3, steps=2))
    stats = PublisherStats(buffered=7, dropped=0)
    dead = {"count": 0}
    observer, server, _ = serve_metrics(trainer, 0, addr="127.0.0.1",
                                        bus=lambda: (stats, 10_000, dead["count"]))
    try:
        trainer.train(max_steps=6)
        stats.dropped, dead["count"] = 5, 2
        observer.on_step(trainer, trainer.train_step(next(trainer._batches())))
        text = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).text
    finally:
        server.shutdown()
    got = _samples(text)
    run = (("run", run_id),)
    assert got[("smart_tuner_trainer_step", run)] == 6
    assert got[("smart_tuner_trainer_nonfinite_steps_total", run)] == 2  # the injected NaNs
    assert got[("smart_tuner_trainer_step_duration_seconds_count", run)] == 7
    assert got[("smart_tuner_trainer_learning_rate", run)] > 0
    assert got[("smart_tuner_trainer_grad_clip_threshold", run)] == 1.0
    assert math.isfinite(got[("smart_tuner_trainer_grad_norm", run)])
    loss = got[("smart_tuner_trainer_loss", (("part", "objective"), ("run", run_id)))]
    assert 0 < loss < 100
    assert got[("smart_tuner_trainer_restarts", run)] == 0
    assert got[("smart_tuner_bus_buffered_messages", run)] == 7
    assert got[("smart_tuner_bus_buffer_capacity_messages", run)] == 10_000
    assert got[("smart_tuner_bus_dropped_messages_total", run)] == 5
    assert got[("smart_tuner_bus_dead_letters_total", (("consumer", "trainer"),))] == 2
    assert got[("smart_tuner_trainer_paused", run)] == 0
    # The verdict gauges say what the trainer's verdict says (the dashboards read them).
    verdict = trainer.verdict()
    assert got[("smart_tuner_verdict_step", run)] == verdict.step
    assert got[("smart_tuner_indicators_total", run)] == len(verdict.indicators)
    assert got[("smart_tuner_indicators_met", run)] == verdict.met_count
    for check in verdict.indicators:
        labels = (("indicator", check.name), ("run", run_id))
        assert got[("smart_tuner_indicator_met", labels)] == float(check.met)
        assert got[("smart_tuner_indicator_value", labels)] == pytest.approx(check.value,
                                                                           nan_ok=True)


def test_observer_counts_deltas_and_restarts_the_plateau_on_rollback() -> None:
    metrics = TrainerMetrics()
    clock = PlateauClock(smoothing=1, min_rel_improvement=0.0)
    observer = PrometheusObserver(metrics, "r", plateau=clock)

    class FakeState:  # the trainer's run state is all the observer reads of it
        restarts, consecutive_restarts = 3, 1

    class FakeTrainer:
        run_state = FakeState()

    from services.trainer.training import StepMetrics

    def step(n: int, objective: float, skipped: int) -> None:
        observer.on_step(FakeTrainer(), StepMetrics(  # type: ignore[arg-type]
            step=n, loss=objective, mel=0.1, mel_postnet=0.1, gate=0.1, guided_attention=0.0,
            objective=objective, grad_norm=2.0, lr=1e-3, guided_attention_weight=1.0,
            gate_positive_weight=5.0,
            clip_threshold=1.0, step_seconds=0.1, finite=True, skipped_steps=skipped))

    step(1, 1.0, 0)
    step(2, 2.0, 1)
    step(3, 2.0, 1)  # the same running total is not counted twice
    value = metrics.registry.get_sample_value
    assert value("smart_tuner_trainer_nonfinite_steps_total", {"run": "r"}) == 1
    assert value("smart_tuner_trainer_steps_since_loss_improved", {"run": "r"}) == 2
    assert value("smart_tuner_trainer_consecutive_restarts", {"run": "r"}) == 1
    step(2, 5.0, 1)  # rolled back to step 2: the clock starts over
    assert value("smart_tuner_trainer_steps_since_loss_improved", {"run": "r"}) == 0


def test_observer_exports_failing_checkpoints() -> None:
    metrics = TrainerMetrics()
    observer = PrometheusObserver(metrics, "r")
    value = metrics.registry.get_sample_value
    for event in ("checkpoint_failed", "checkpoint_failed"):
        observer.on_lifecycle(None, event, "disk full", {})  # type: ignore[arg-type]
    assert value("smart_tuner_trainer_checkpoint_failures_total", {"run": "r"}) == 2
    assert value("smart_tuner_trainer_checkpoint_failing", {"run": "r"}) == 1
    observer.on_lifecycle(None, "checkpoint_recovered", "", {})  # type: ignore[arg-type]
    assert value("smart_tuner_trainer_checkpoint_failing", {"run": "r"}) == 0
    assert value("smart_tuner_trainer_checkpoint_failures_total", {"run": "r"}) == 2


def test_observer_exports_the_publishers_health() -> None:
    """Redis refusing writes, and a publisher thread that had to be restarted, show in the
    trainer's metrics: errors by kind, the outage's start, restarts, the thread alive."""
    metrics = TrainerMetrics()
    stats = PublisherStats(buffered=40, connected=False)
    stats.errors_by_kind.update({"OOM": 3, "connection": 1})
    stats.outages, stats.outage_since, stats.thread_restarts = 2, 1_700_000_000.0, 1
    observer = PrometheusObserver(metrics, "r", bus=lambda: (stats, 10_000, 0))

    class FakeState:
        restarts, consecutive_restarts = 0, 0

    class FakeTrainer:
        run_state = FakeState()

    from services.trainer.training import StepMetrics

    def step(n: int) -> None:
        observer.on_step(FakeTrainer(), StepMetrics(  # type: ignore[arg-type]
            step=n, loss=1.0, mel=0.1, mel_postnet=0.1, gate=0.1, guided_attention=0.0,
            objective=1.0, grad_norm=2.0, lr=1e-3, guided_attention_weight=1.0,
            gate_positive_weight=5.0, clip_threshold=1.0, step_seconds=0.1, finite=True,
            skipped_steps=0))

    step(1)
    value = metrics.registry.get_sample_value
    assert value("smart_tuner_bus_publish_errors_total", {"run": "r", "kind": "OOM"}) == 3
    assert value("smart_tuner_bus_publish_errors_total",
                 {"run": "r", "kind": "connection"}) == 1
    assert value("smart_tuner_bus_publisher_connected", {"run": "r"}) == 0
    assert value("smart_tuner_bus_publisher_outage_start_timestamp_seconds",
                 {"run": "r"}) == 1_700_000_000.0
    assert value("smart_tuner_bus_publisher_outages_total", {"run": "r"}) == 2
    assert value("smart_tuner_bus_publisher_thread_restarts_total", {"run": "r"}) == 1
    assert value("smart_tuner_bus_publisher_alive", {"run": "r"}) == 1
    stats.errors_by_kind["OOM"] = 5  # counted as deltas, never twice
    stats.connected, stats.outage_since = True, None
    step(2)
    assert value("smart_tuner_bus_publish_errors_total", {"run": "r", "kind": "OOM"}) == 5
    assert value("smart_tuner_bus_publisher_connected", {"run": "r"}) == 1
    assert value("smart_tuner_bus_publisher_outage_start_timestamp_seconds",
                 {"run": "r"}) == 0
    # and an alert reads each failure, not only the buffer filling up an hour later
    exprs = {name: rule["expr"] for name, rule in _rules().items()}
    assert "smart_tuner_bus_publisher_connected == 0" in exprs["BusPublisherFailing"]
    assert "smart_tuner_bus_publisher_thread_restarts_total" in \
        exprs["BusPublisherThreadRestarted"]


def test_tuner_metrics_count_decisions_and_dead_letters() -> None:
    metrics = TunerMetrics()
    metrics.decided("r", "grad_norm", "set_lr")
    metrics.decided("r", "grad_norm", None)
    metrics.dead_lettered(3)
    metrics.dead_lettered(3)
    value = metrics.registry.get_sample_value
    assert value("smart_tuner_tuner_decisions_total",
                 {"run": "r", "rule": "grad_norm", "action": "set_lr"}) == 1
    assert value("smart_tuner_tuner_decisions_total",
                 {"run": "r", "rule": "grad_norm", "action": "event"}) == 1
    assert value("smart_tuner_bus_dead_letters_total", {"consumer": "tuner"}) == 3


def test_dead_letter_counter_never_goes_back() -> None:
    counter = DeadLetterCounter(CollectorRegistry(), "notifier")
    counter.sync(2)
    counter.sync(1)  # a fresh consumer starts its own count again
    assert counter.counter.labels("notifier")._value.get() == 2


@pytest.mark.parametrize("exporter", [trainer_exporter, tuner_exporter, diagnostics_exporter])
@pytest.mark.parametrize(("value", "ok"), [("", None), ("9101", 9101), ("0", "bad"),
                                           ("70000", "bad"), ("http", "bad")])
def test_metrics_ports_are_validated_settings(monkeypatch: pytest.MonkeyPatch, exporter,
                                              value: str, ok) -> None:
    """Each service's metrics port is a setting: read from the environment (or .env), empty
    means off, and a bad one fails with the variable named."""
    monkeypatch.setenv(exporter.METRICS_PORT_ENV, value)
    if ok == "bad":
        with pytest.raises(ConfigError, match=exporter.METRICS_PORT_ENV):
            exporter.metrics_port_from_env()
    else:
        assert exporter.metrics_port_from_env() == ok


def test_plateau_clock() -> None:
    clock = PlateauClock(smoothing=3, min_rel_improvement=0.01)
    for step, value in enumerate([3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0, float("nan")]):
        clock.observe(step, value)
    assert clock.best == pytest.approx(2.0) and clock.best_step == 5
    assert clock.steps_since_improved(1200) == 1195
    assert is_improvement(None, 5.0, 0.01)
    assert not is_improvement(1.0, 0.995, 0.01) and is_improvement(1.0, 0.98, 0.01)


# ---------------------------------------------------------------------------- alert rules


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def _threshold(expr: str, metric: str, op: str) -> float:
    match = re.search(rf"{re.escape(metric)}\S*\s*{re.escape(op)}\s*([0-9.]+)", expr)
    assert match, f"no {metric} {op} N in {expr!r}"
    return float(match.group(1))


def test_alert_rules_use_the_plans_numbers() -> None:
    rules = _rules()
    warmup = load_tuner_config(ROOT / "config" / "tuner.toml").warmup_steps
    assert _threshold(rules["GradNormRedFlag"]["expr"], "smart_tuner_trainer_grad_norm",
                      ">") == indicators.GRAD_NORM_RED_FLAG
    assert _threshold(rules["GradNormHigh"]["expr"], "smart_tuner_trainer_grad_norm",
                      ">") == indicators.GRAD_NORM_OK
    assert _threshold(rules["AlignmentRedFlag"]["expr"], "smart_tuner_alignment_diagonality",
                      "<") == indicators.DIAGONALITY_RED_FLAG
    assert _threshold(rules["AlignmentWeak"]["expr"], "smart_tuner_alignment_diagonality",
                      "<") == indicators.DIAGONALITY_WEAK
    for name in ("AlignmentRedFlag", "AlignmentWeak"):
        assert _threshold(rules[name]["expr"], "smart_tuner_alignment_snapshot_step",
                          ">") == warmup
    assert _threshold(rules["TrainerCrashLoop"]["expr"],
                      "smart_tuner_trainer_consecutive_restarts",
                      ">") == indicators.CONSECUTIVE_RESTARTS_RED_FLAG
    assert _threshold(rules["LossPlateau"]["expr"],
                      "smart_tuner_trainer_steps_since_loss_improved",
                      ">") == indicators.LOSS_PLATEAU_STEPS_RED_FLAG
    inference = rules["InferenceNotStopping"]["expr"]
    assert _threshold(inference, "smart_tuner_trainer_probes_stop_ratio",
                      "<") == indicators.PROBES_STOP_OK / 100
    assert _threshold(inference, "smart_tuner_alignment_diagonality",
                      ">") == indicators.DIAGONALITY_OK


def test_every_alert_is_labelled_and_described() -> None:
    for name, rule in _rules().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["labels"]["family"], name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    critical = {n for n, r in _rules().items() if r["labels"]["severity"] == "critical"}
    assert critical == {"GradNormRedFlag", "AlignmentRedFlag", "TrainerCrashLoop",
                        "LossPlateau", "CheckpointsFailing"}
