"""Prometheus metrics of a training run, served by the trainer itself (rank 0).

The alert rules read these directly, so a red flag pages someone even when the tuner, the
bus or the notifier's feed is down. Values are set from the step the loop just took: an
observer, like the telemetry, that never raises into the loop.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.core.bus import ERROR_KINDS, PublisherStats
from services.core.indicators import Verdict
from services.core.metrics import DeadLetterCounter
from services.core.plateau import PlateauClock
from services.core.settings import ENV_PREFIX, load_settings
from services.trainer.probes import ProbeSummary
from services.trainer.training import StepMetrics, Trainer, TrainingObserver

log = logging.getLogger(__name__)

METRICS_PORT_ENV = f"{ENV_PREFIX}TRAINER_METRICS_PORT"  # setting trainer_metrics_port
DEFAULT_ADDR = "0.0.0.0"  # all interfaces: Prometheus scrapes from another container
LOSS_PARTS = ("loss", "objective", "mel", "mel_postnet", "gate", "guided_attention")
# From a fraction of a second (tiny model, GPU) to a minute (base model, CPU).
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEAD_LETTER_CONSUMER = "trainer"  # its commands reader


class TrainerMetrics:
    """The trainer's series, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step = Gauge("smart_tuner_trainer_step", "The optimizer step just taken",
                          ["run"], registry=r)
        self.loss = Gauge("smart_tuner_trainer_loss", "Training losses of the step, by part",
                          ["run", "part"], registry=r)
        self.grad_norm = Gauge("smart_tuner_trainer_grad_norm",
                               "Global L2 gradient norm before clipping, unscaled",
                               ["run"], registry=r)
        self.clip = Gauge("smart_tuner_trainer_grad_clip_threshold",
                          "Gradient clipping threshold in force", ["run"], registry=r)
        self.lr = Gauge("smart_tuner_trainer_learning_rate", "Learning rate of the step",
                        ["run"], registry=r)
        self.ga_weight = Gauge("smart_tuner_trainer_guided_attention_weight",
                               "Guided attention loss weight of the step", ["run"], registry=r)
        self.step_seconds = Histogram("smart_tuner_trainer_step_duration_seconds",
                                      "Wall time of one optimizer step", ["run"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.nonfinite = Counter("smart_tuner_trainer_nonfinite_steps",
                                 "Steps skipped for a non-finite loss or gradient", ["run"],
                                 registry=r)
        self.restarts = Gauge("smart_tuner_trainer_restarts", "Restarts of the run so far",
                              ["run"], registry=r)
        self.consecutive = Gauge("smart_tuner_trainer_consecutive_restarts",
                                 "Restarts since the last healthy checkpoint", ["run"],
                                 registry=r)
        self.since_improved = Gauge("smart_tuner_trainer_steps_since_loss_improved",
                                    "Steps since the smoothed objective reached a new low",
                                    ["run"], registry=r)
        self.paused = Gauge("smart_tuner_trainer_paused", "1 while paused by a command",
                            ["run"], registry=r)
        self.checkpoint_failures = Counter(
            "smart_tuner_trainer_checkpoint_failures",
            "Checkpoint saves that failed (disk full, quota, I/O error)", ["run"], registry=r)
        self.checkpoint_failing = Gauge(
            "smart_tuner_trainer_checkpoint_failing",
            "1 from a failed checkpoint save until one is written again", ["run"], registry=r)
        self.buffered = Gauge("smart_tuner_bus_buffered_messages",
                              "Telemetry waiting in the publisher's buffer", ["run"],
                              registry=r)
        self.capacity = Gauge("smart_tuner_bus_buffer_capacity_messages",
                              "Size of the publisher's buffer", ["run"], registry=r)
        self.dropped = Counter("smart_tuner_bus_dropped_messages",
                               "Telemetry dropped because the buffer overflowed", ["run"],
                               registry=r)
        self.dead_letters = DeadLetterCounter(r, DEAD_LETTER_CONSUMER)
        # The publisher's own health: Redis refusing or missing writes (by kind, a bounded
        # label set: services.core.bus.ERROR_KINDS) and a sending thread that had died.
        self.publish_errors = Counter("smart_tuner_bus_publish_errors",
                                      "Failed telemetry writes to Redis, by error kind "
                                      "(OOM, READONLY, MISCONF, connection ...)",
                                      ["run", "kind"], registry=r)
        self.publisher_connected = Gauge("smart_tuner_bus_publisher_connected",
                                         "1 when the publisher's latest write succeeded",
                                         ["run"], registry=r)
        self.outage_start = Gauge("smart_tuner_bus_publisher_outage_start_timestamp_seconds",
                                  "Unix time the current write outage began; 0: none",
                                  ["run"], registry=r)
        self.outages = Counter("smart_tuner_bus_publisher_outages",
                               "Times telemetry writes started failing", ["run"], registry=r)
        self.publisher_restarts = Counter("smart_tuner_bus_publisher_thread_restarts",
                                          "Times the publisher thread was found dead and "
                                          "started again", ["run"], registry=r)
        self.publisher_alive = Gauge("smart_tuner_bus_publisher_alive",
                                     "1 while the publisher's sending thread runs",
                                     ["run"], registry=r)
        # The inference indicator, from the probes of the newest probed checkpoint.
        self.probes_stop = Gauge("smart_tuner_trainer_probes_stop_ratio",
                                 "Share of inference probes whose gate stops at a sane length",
                                 ["run"], registry=r)
        self.probes_diagonality = Gauge("smart_tuner_trainer_probes_inference_diagonality",
                                        "Median free-running diagonality over the probes",
                                        ["run"], registry=r)
        self.probes_step = Gauge("smart_tuner_trainer_probes_checkpoint_step",
                                 "Step of the checkpoint the probe figures are from",
                                 ["run"], registry=r)
        # The trainer's verdict, the same object the verdict stream carries: the dashboards'
        # indicator panels show these, so they say what the bot and the API say.
        self.indicator_value = Gauge("smart_tuner_indicator_value",
                                     "Each success indicator's value in the latest verdict",
                                     ["run", "indicator"], registry=r)
        self.indicator_met = Gauge("smart_tuner_indicator_met",
                                   "1 when the indicator is met in the latest verdict",
                                   ["run", "indicator"], registry=r)
        self.indicators_met = Gauge("smart_tuner_indicators_met",
                                    "How many indicators the latest verdict meets",
                                    ["run"], registry=r)
        self.indicators_total = Gauge("smart_tuner_indicators_total",
                                      "How many indicators the verdict judges", ["run"],
                                      registry=r)
        self.verdict_step = Gauge("smart_tuner_verdict_step",
                                  "The step the latest verdict was judged at", ["run"],
                                  registry=r)


class PrometheusObserver(TrainingObserver):
    """Sets the trainer's metrics after every step and lifecycle event.

    ``bus`` (optional) returns the publisher's stats, its buffer size and the count of
    commands the trainer dead-lettered, when the trainer is attached to the bus.
    """

    def __init__(self, metrics: TrainerMetrics, run_id: str,
                 bus: Callable[[], tuple[PublisherStats, int, int]] | None = None,
                 plateau: PlateauClock | None = None):
        self.metrics = metrics
        self.run_id = run_id
        self.bus = bus
        self.plateau = plateau or PlateauClock()
        self._skipped = 0
        self._dropped = 0
        # What the counters already hold of the publisher's running totals.
        self._publisher_counts: dict[str, int] = {}
        self._last_step: int | None = None
        metrics.nonfinite.labels(run_id)  # every series exists from the start, at 0
        metrics.dropped.labels(run_id)
        metrics.outages.labels(run_id)
        metrics.publisher_restarts.labels(run_id)
        metrics.paused.labels(run_id).set(0)

    def on_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        """Everything measured in the step, the run's restarts, the bus's state."""
        try:
            self._on_step(trainer, metrics)
        except Exception:  # metrics must never stop training
            log.exception("updating the trainer's Prometheus metrics failed")

    def _on_step(self, trainer: Trainer, m: StepMetrics) -> None:
        run, series = self.run_id, self.metrics
        if self._last_step is not None and m.step < self._last_step:
            self.plateau.restart()  # rolled back: the weights are an earlier step's
        self._last_step = m.step
        series.step.labels(run).set(m.step)
        for part in LOSS_PARTS:
            series.loss.labels(run, part).set(getattr(m, part))
        series.grad_norm.labels(run).set(m.grad_norm)
        series.clip.labels(run).set(m.clip_threshold)
        series.lr.labels(run).set(m.lr)
        series.ga_weight.labels(run).set(m.guided_attention_weight)
        if math.isfinite(m.step_seconds):
            series.step_seconds.labels(run).observe(m.step_seconds)
        if m.skipped_steps > self._skipped:
            series.nonfinite.labels(run).inc(m.skipped_steps - self._skipped)
        self._skipped = max(self._skipped, m.skipped_steps)
        state = trainer.run_state
        series.restarts.labels(run).set(state.restarts)
        series.consecutive.labels(run).set(state.consecutive_restarts)
        self.plateau.observe(m.step, m.objective)
        series.since_improved.labels(run).set(self.plateau.steps_since_improved(m.step))
        if self.bus is not None:
            stats, capacity, dead = self.bus()
            series.buffered.labels(run).set(stats.buffered)
            series.capacity.labels(run).set(capacity)
            if stats.dropped > self._dropped:
                series.dropped.labels(run).inc(stats.dropped - self._dropped)
                self._dropped = stats.dropped
            series.dead_letters.sync(dead)
            self._publisher_health(stats)

    def _publisher_health(self, stats: PublisherStats) -> None:
        run, series = self.run_id, self.metrics
        series.publisher_connected.labels(run).set(1 if stats.connected else 0)
        series.publisher_alive.labels(run).set(1 if stats.alive else 0)
        series.outage_start.labels(run).set(stats.outage_since or 0)
        totals = {f"kind:{kind}": count for kind, count in stats.errors_by_kind.items()
                  if kind in ERROR_KINDS}
        totals.update(outages=stats.outages, restarts=stats.thread_restarts)
        for name, total in totals.items():
            delta = total - self._publisher_counts.get(name, 0)
            if delta <= 0:
                continue
            self._publisher_counts[name] = total
            if name == "outages":
                series.outages.labels(run).inc(delta)
            elif name == "restarts":
                series.publisher_restarts.labels(run).inc(delta)
            else:
                series.publish_errors.labels(run, name.removeprefix("kind:")).inc(delta)

    def on_probes(self, trainer: Trainer, summary: ProbeSummary) -> None:
        """The inference indicator's two numbers and the checkpoint they are from."""
        run = self.run_id
        self.metrics.probes_stop.labels(run).set(summary.stop_share)
        self.metrics.probes_diagonality.labels(run).set(summary.median_diagonality)
        self.metrics.probes_step.labels(run).set(summary.step)

    def on_verdict(self, trainer: Trainer, verdict: Verdict) -> None:
        """Every indicator of the trainer's verdict, as published on the verdict stream."""
        run, series = self.run_id, self.metrics
        for check in verdict.indicators:
            series.indicator_value.labels(run, check.name).set(check.value)
            series.indicator_met.labels(run, check.name).set(1 if check.met else 0)
        series.indicators_met.labels(run).set(verdict.met_count)
        series.indicators_total.labels(run).set(len(verdict.indicators))
        series.verdict_step.labels(run).set(verdict.step)

    def on_lifecycle(self, trainer: Trainer, event: str, detail: str,
                     data: dict[str, Any]) -> None:
        """Paused / resumed, checkpoint saves failing and recovered, and the restart counts
        as the run (re)starts."""
        run = self.run_id
        if event in ("paused", "resumed"):
            self.metrics.paused.labels(run).set(1 if event == "paused" else 0)
        if event == "checkpoint_failed":
            self.metrics.checkpoint_failures.labels(run).inc()
            self.metrics.checkpoint_failing.labels(run).set(1)
        if event == "checkpoint_recovered":
            self.metrics.checkpoint_failing.labels(run).set(0)
        if event == "run_started":
            state = trainer.run_state
            self.metrics.restarts.labels(run).set(state.restarts)
            self.metrics.consecutive.labels(run).set(state.consecutive_restarts)
            self.metrics.step.labels(run).set(trainer.step)


def metrics_port_from_env() -> int | None:
    """The ``trainer_metrics_port`` setting (None: not served); ConfigError if bad."""
    return load_settings().trainer_metrics_port


def serve_metrics(trainer: Trainer, port: int, addr: str = DEFAULT_ADDR,
                  bus: Callable[[], tuple[PublisherStats, int, int]] | None = None
                  ) -> tuple[PrometheusObserver, WSGIServer, threading.Thread]:
    """Attach a PrometheusObserver to ``trainer`` and serve its registry on ``addr:port``.

    Port 0 picks a free one (``server.server_port`` tells which).
    """
    metrics = TrainerMetrics()
    observer = PrometheusObserver(metrics, trainer.run_state.run_id, bus)
    trainer.observers.append(observer)
    server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    log.info("trainer metrics on http://%s:%d/metrics", addr, server.server_port)
    return observer, server, thread
