"""Trainer telemetry: per-step metrics, attention snapshots, verdicts and lifecycle events.

A ``TrainingObserver`` that turns the loop's events into schema messages and hands them to
the non-blocking ``Publisher``; it never waits on Redis. When a snapshot has reached Redis
(the publisher reports its entry id), the scoring outbox enqueues the diagnostics task *by
name* (the trainer imports no worker code) and sees that each snapshot gets its report.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np

from services.core.bus import Publisher
from services.core.indicators import Verdict
from services.core.schemas import (
    AttentionSample,
    AttentionSnapshot,
    Event,
    Message,
    MetricsMessage,
    ProbeReport,
    VerdictMessage,
)
from services.core.streams import Stream
from services.trainer.checkpoints import CheckpointInfo
from services.trainer.probes import ProbeSummary
from services.trainer.scoring import ScoringOutbox
from services.trainer.training import EvalResult, StepMetrics, Trainer, TrainingObserver

log = logging.getLogger(__name__)

SNAPSHOT_SAMPLES = 4

# A checkpoint that cannot be written (disk full) leaves the run without a way back: a
# person must make room, so it is critical (the notifier sends it at once).
_LIFECYCLE_SEVERITY = {"stopped": "warning", "checkpoint_failed": "critical"}


class Telemetry(TrainingObserver):
    """Publishes what the trainer does; attention every ``snapshot_every`` steps."""

    def __init__(self, publisher: Publisher, run_id: str, snapshot_every: int,
                 samples: int = SNAPSHOT_SAMPLES, scoring: ScoringOutbox | None = None):
        """``scoring`` has each stored snapshot scored (none: nobody scores them)."""
        self.publisher = publisher
        self.run_id = run_id
        self.snapshot_every = snapshot_every
        self.samples = samples
        self.scoring = scoring
        self._last_snapshot_step = -1

    def on_sent(self, stream: Stream, message: Message, entry_id: str) -> None:
        """Publisher callback: a snapshot is in Redis, so it can be scored now."""
        if isinstance(message, AttentionSnapshot) and self.scoring is not None:
            self.scoring.submit(self.run_id, entry_id, message.snapshot_id)

    def on_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        """One metrics message per optimizer step."""
        self.publisher.publish(Stream.METRICS,
                               MetricsMessage(run_id=self.run_id, **asdict(metrics)))

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        """An attention snapshot of the validation batch, at most every ``snapshot_every``."""
        if result.step - self._last_snapshot_step < self.snapshot_every and \
                self._last_snapshot_step >= 0:
            return
        self._last_snapshot_step = result.step
        self.publisher.publish(Stream.ATTENTION, snapshot_from_eval(self.run_id, result,
                                                                   self.samples))

    def on_verdict(self, trainer: Trainer, verdict: Verdict) -> None:
        """The verdict of every evaluation (with its checkpoint's probes, when it has some):
        the one every other service shows."""
        self.publisher.publish(Stream.VERDICT, VerdictMessage(run_id=self.run_id,
                                                              verdict=verdict))

    def on_checkpoint(self, trainer: Trainer, info: CheckpointInfo) -> None:
        """A checkpoint_saved event, with its health verdict."""
        self.publisher.publish(Stream.EVENTS, Event(
            run_id=self.run_id, event="checkpoint_saved", step=info.step,
            detail=f"{info.file} ({'healthy' if info.healthy else 'not healthy'})",
            data={"file": info.file, "healthy": info.healthy,
                  "metrics": {k: v for k, v in info.metrics.items() if math.isfinite(v)}}))

    def on_probes(self, trainer: Trainer, summary: ProbeSummary) -> None:
        """A probes event: does the checkpoint speak unseen text and stop?"""
        checks = summary.indicators()
        report = summary.report()
        self.publisher.publish(Stream.EVENTS, Event(
            run_id=self.run_id, event="probes", step=trainer.step,
            severity="info" if all(c.met for c in checks) else "warning",
            detail=probe_detail(report), data=report.model_dump(mode="json")))

    def on_lifecycle(self, trainer: Trainer, event: str, detail: str,
                     data: dict[str, Any]) -> None:
        """run_started (and restart), paused, resumed, finished, stopped."""
        if event == "run_started" and data.get("restarted"):
            self.publisher.publish(Stream.EVENTS, Event(
                run_id=self.run_id, event="restart", severity="warning", step=trainer.step,
                detail=f"restarted at step {trainer.step}: restart {data['restarts']}, "
                       f"{data['consecutive']} in a row",
                data={"restarts": data["restarts"], "consecutive": data["consecutive"]}))
        payload = {k: v for k, v in data.items() if k != "summary"}
        if "summary" in data:
            summary = data["summary"]
            payload = {"all_indicators_met": summary["all_indicators_met"],
                       "indicators": summary["indicators"], "stop_reason":
                       summary["stop_reason"], "step": summary["step"]}
        self.publisher.publish(Stream.EVENTS, Event(
            run_id=self.run_id, event=event, severity=_LIFECYCLE_SEVERITY.get(event, "info"),
            step=trainer.step, detail=detail, data=payload))


def probe_detail(report: ProbeReport) -> str:
    """One line: ``probes at step 300: 83% stop (10/12), inference diagonality 0.64``."""
    stopped = report.n - len(report.failures)
    line = (f"probes at step {report.checkpoint_step}: {report.stop_percent:.0f}% stop "
            f"({stopped}/{report.n}), inference diagonality {report.median_diagonality:.2f}")
    if report.relative_wer is not None:
        line += f", WER {report.relative_wer:+.2f} vs espeak-ng"
    return line


def snapshot_from_eval(run_id: str, result: EvalResult, samples: int) -> AttentionSnapshot:
    """The first ``samples`` validation attentions, cropped to their true lengths."""
    items = []
    for i in range(min(samples, result.attention.shape[0])):
        t, n = int(result.decoder_lengths[i]), int(result.input_lengths[i])
        matrix = np.asarray(result.attention[i, :t, :n])
        items.append(AttentionSample.from_array(matrix, input_length=n, output_length=t))
    return AttentionSnapshot(run_id=run_id, snapshot_id=f"{run_id}-{result.step}-"
                             f"{uuid.uuid4().hex[:8]}", step=result.step, samples=items)
