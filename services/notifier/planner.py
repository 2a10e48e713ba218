"""What to tell people, and when: pure decisions over a run's messages, no I/O.

The feed hands every metrics message, alignment report, tuner action and event of a run to
``ReportPlanner.observe`` and sends what comes back. The rules:

- a progress report every ``every_steps`` steps or ``every_s`` seconds, whichever is first,
  with the alignment picture once there is an alignment report;
- each tuner decision once it has the trainer's ack, and again when its effect is measured;
  a decision whose ack has not come ``issued_grace_s`` after it was issued is reported as
  issued, so no decision ever goes unmentioned;
- a supervised proposal at once, with Approve / Reject buttons (the notice names it), and
  a rejected or dropped one when it ends;
- every lifecycle and health event except routine healthy checkpoints, with the picture
  where alignment is the subject.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.core.indicators import evaluate_inference
from services.core.schemas import (
    ActionRecord,
    AlignmentReport,
    AlignmentScores,
    Event,
    Message,
    MetricsMessage,
    ProbeReport,
    VerdictMessage,
    probe_report,
)
from services.notifier.reports import Language, action_report, event_report, progress_report

# Trigger metrics about alignment (its scores, and the success indicators, which include
# it): their decisions, red flags and recoveries get the picture.
ALIGNMENT_METRICS = frozenset(AlignmentScores.model_fields) | {"success_indicators"}
# Events whose summary is about alignment (the indicators include it).
PICTURE_EVENTS = frozenset({"indicators_met", "finished", "stopped"})
MAX_TRACKED_ACTIONS = 200  # per run; the progress report shows the newest few
# Runs remembered; beyond it the least recently heard of is forgotten (a run that speaks
# again starts a fresh digest: its next report comes a little later, nothing is lost).
MAX_RUNS = 64
# An action's stages in the order they happen; a record of a lower rank than the one known
# is redelivered or late. A proposal ends as issued, rejected or dropped.
STAGE_RANK = {"proposed": 0, "issued": 1, "rejected": 1, "dropped": 1, "acked": 2,
              "measured": 3}


@dataclass(frozen=True)
class Notice:
    """One message to send: HTML text, and whether the run's alignment picture goes with it."""

    run_id: str
    text: str
    picture: bool = False
    critical: bool = False
    proposal: str | None = None  # the action id a person is asked to approve (buttons)


@dataclass
class _RunDigest:
    """What the planner remembers of one run."""

    metrics: MetricsMessage | None = None
    report: AlignmentReport | None = None
    previous_report: AlignmentReport | None = None
    verdict: VerdictMessage | None = None
    probes: ProbeReport | None = None
    last_report_step: int | None = None
    last_report_at: float | None = None
    actions: OrderedDict[str, ActionRecord] = field(default_factory=OrderedDict)
    # action id -> when its "issued" record arrived, while no later stage has
    unanswered: dict[str, float] = field(default_factory=dict)


class ReportPlanner:
    """Turns a stream of run messages into the notices a person should get."""

    def __init__(self, language: Language, every_steps: int, every_s: float,
                 issued_grace_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if every_steps < 1 or every_s <= 0:
            raise ValueError("every_steps must be >= 1 and every_s > 0")
        self.language: Language = language
        self.every_steps = every_steps
        self.every_s = every_s
        self.issued_grace_s = issued_grace_s
        self.clock = clock
        # Least recently heard of first; at most MAX_RUNS.
        self._runs: OrderedDict[str, _RunDigest] = OrderedDict()

    def _digest(self, run_id: str) -> _RunDigest:
        """The run's digest, made when a message of it comes; the most recent now."""
        digest = self._runs.get(run_id)
        if digest is None:
            digest = self._runs[run_id] = _RunDigest()
            while len(self._runs) > MAX_RUNS:
                self._runs.popitem(last=False)
        self._runs.move_to_end(run_id)
        return digest

    def forget(self, run_id: str) -> None:
        """Drop what is remembered of ``run_id`` (it left Redis: retention expired it)."""
        self._runs.pop(run_id, None)

    def actions(self, run_id: str) -> list[ActionRecord]:
        """The newest stage of each decision seen for ``run_id``, oldest first."""
        digest = self._runs.get(run_id)
        return [] if digest is None else list(digest.actions.values())

    def observe(self, message: Message) -> list[Notice]:
        """The notices ``message`` calls for (often none)."""
        if isinstance(message, MetricsMessage):
            return self._on_metrics(message)
        if isinstance(message, AlignmentReport):
            digest = self._digest(message.run_id)
            if digest.report is None or message.step >= digest.report.step:
                digest.previous_report, digest.report = digest.report, message
            return []
        if isinstance(message, VerdictMessage):
            digest = self._digest(message.run_id)
            if digest.verdict is None or message.ts >= digest.verdict.ts:
                digest.verdict = message  # the newest written (a rollback judges earlier steps)
            return []
        if isinstance(message, ActionRecord):
            return self._on_action(message)
        if isinstance(message, Event):
            return self._on_event(message)
        return []

    def progress(self, run_id: str) -> Notice | None:
        """The progress report of ``run_id`` now (for /report), or None before any metrics."""
        digest = self._runs.get(run_id)  # asking creates nothing: run ids come from people
        if digest is None or digest.metrics is None:
            return None
        text = progress_report(run_id, digest.metrics, digest.report, digest.previous_report,
                               self.actions(run_id),
                               None if digest.verdict is None else digest.verdict.verdict,
                               self.language,
                               digest.probes)
        return Notice(run_id, text, picture=digest.report is not None)

    def tick(self) -> list[Notice]:
        """Decisions still without an ack ``issued_grace_s`` after they were issued."""
        now = self.clock()
        notices = []
        for run_id, digest in self._runs.items():
            for action_id, issued_at in list(digest.unanswered.items()):
                if now - issued_at >= self.issued_grace_s:
                    del digest.unanswered[action_id]
                    record = digest.actions.get(action_id)
                    if record is not None and record.stage == "issued":
                        notices.append(Notice(run_id, action_report(record, self.language)))
        return notices

    def _on_metrics(self, message: MetricsMessage) -> list[Notice]:
        digest = self._digest(message.run_id)
        now = self.clock()
        if digest.metrics is not None and message.step < digest.metrics.step:
            # The trainer rolled back or restarted from a checkpoint: count from here.
            digest.last_report_step = message.step
        digest.metrics = message
        if digest.last_report_step is None:
            digest.last_report_step, digest.last_report_at = message.step, now
            return []
        due_by_steps = message.step - digest.last_report_step >= self.every_steps
        due_by_time = digest.last_report_at is not None and now - digest.last_report_at >= \
            self.every_s
        if not (due_by_steps or due_by_time):
            return []
        digest.last_report_step, digest.last_report_at = message.step, now
        notice = self.progress(message.run_id)
        return [] if notice is None else [notice]

    def _on_action(self, record: ActionRecord) -> list[Notice]:
        digest = self._digest(record.run_id)
        known = digest.actions.get(record.action_id)
        if known is not None and STAGE_RANK[record.stage] <= STAGE_RANK[known.stage]:
            return []  # a redelivered or out-of-order stage
        digest.actions[record.action_id] = record
        digest.actions.move_to_end(record.action_id)
        while len(digest.actions) > MAX_TRACKED_ACTIONS:
            oldest, _ = digest.actions.popitem(last=False)
            digest.unanswered.pop(oldest, None)
        if record.stage == "issued":
            digest.unanswered[record.action_id] = self.clock()
            return []
        digest.unanswered.pop(record.action_id, None)
        picture = record.trigger.metric in ALIGNMENT_METRICS
        proposal = record.action_id if record.stage == "proposed" else None
        return [Notice(record.run_id, action_report(record, self.language), picture=picture,
                       proposal=proposal)]

    def _on_event(self, event: Event) -> list[Notice]:
        digest = self._digest(event.run_id)
        if event.event == "checkpoint_saved" and event.data.get("healthy", True) is not False:
            return []  # routine; an unhealthy checkpoint is worth a word
        probes = probe_report(event)
        if probes is not None:
            before, digest.probes = digest.probes, probes
            # Every checkpoint is probed: a word on the first pass and when the model
            # starts or stops speaking; the progress reports carry the rest.
            if before is not None and _speaks(before) == _speaks(probes):
                return []
        trigger = event.data.get("trigger")
        metric = trigger.get("metric") if isinstance(trigger, dict) else None
        picture = event.event in PICTURE_EVENTS or metric in ALIGNMENT_METRICS
        return [Notice(event.run_id, event_report(event, self.language),
                       picture=picture and digest.report is not None,
                       critical=event.severity == "critical")]


def _speaks(probes: ProbeReport) -> bool:
    """Whether a probe pass meets the inference indicator."""
    return all(check.met for check in evaluate_inference(probes.stop_percent,
                                                         probes.median_diagonality))
