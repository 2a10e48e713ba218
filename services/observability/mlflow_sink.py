"""The MLflow sink: each Smart Tuner run's metrics, alignment, tuner actions and events in MLflow.

Optional and off unless ``MLFLOW_TRACKING_URI`` is set (install ``smart-tuner[mlflow]``). A
consumer group (``mlflow``) reads every run's metrics, diagnostics, actions and events
streams, so a restarted sink goes on where it stopped. Each Smart Tuner run gets one MLflow
run, found again by its tag ``smart_tuner.run_id``, in one experiment (``smart-tuner``
unless named otherwise):

* metrics: losses, the pre-clip gradient norm, the controlled values and the step time, at
  the trainer's step; alignment scores (``alignment/*``) at the report's step; the measured
  effect of each tuner action (``effect/<action>/<metric>/*``) at the step it was measured.
  A non-finite value is logged as NaN (a gap in MLflow's charts; an infinity would be
  clamped to ±1.8e308 by MLflow's SQL stores and flatten every chart), and
  ``train/nonfinite_step`` says 1 at such a step.
* artifacts: ``alignment/step_<N, 8 digits>.png`` for a report at most every
  ``picture_every_steps`` steps; every action record and event as one JSON line in
  ``actions/actions-<part>.jsonl`` and ``events/events-<part>.jsonl`` (parts of at most
  ``JSONL_PART_LINES`` lines, so a long run never rewrites one ever-growing file).
* run state: ``run_started``/``resumed`` mark the MLflow run RUNNING, ``finished`` FINISHED,
  ``stopped`` KILLED; lifecycle facts become tags (they change on restarts, and MLflow params
  never may).

An entry is acked only after MLflow accepted what it carries. Each MLflow run also keeps how
far each stream was logged (a cursor: a tag written in the same ``log_batch`` call as the
metrics, or the entry id of the JSONL's last line), so entries delivered again after a crash
or a lost consumer group are acked without being logged twice. Run one sink per experiment.
Redis and MLflow outages are ridden out with back-off; an entry MLflow refuses as invalid
(which the mapping here should never produce) is dead-lettered instead of blocking the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, TypeVar

import redis
import typer

from services.core.bus import CONNECTION_ERRORS, Consumer, Delivery, entry_order
from services.core.consumer import LoopSettings, RunStreamReader
from services.core.runstore import PNG_SIGNATURE, RunStore
from services.core.schemas import (
    WIRE_FIELD,
    ActionRecord,
    AlignmentReport,
    AttentionSnapshot,
    Event,
    Message,
    MessageError,
    MetricsMessage,
    decode,
)
from services.core.streams import (
    Stream,
    alignment_png_key,
    alignment_png_meta_key,
    stream_key,
    validate_run_id,
)
from services.diagnostics.plots import render_snapshot

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable for the experiment
TELEMETRY_ENV = "MLFLOW_DISABLE_TELEMETRY"
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
DEFAULT_EXPERIMENT = "smart-tuner"
GROUP = "mlflow"
DEFAULT_CONSUMER = "mlflow-1"
INPUT_STREAMS = (Stream.METRICS, Stream.DIAGNOSTICS, Stream.ACTIONS, Stream.EVENTS)
DEFAULT_PICTURE_EVERY_STEPS = 500
SNAPSHOT_SCAN = 32  # newest attention entries searched for a report's snapshot (they are big)
SNAPSHOT_PAGE = 4
JSONL_PART_LINES = 1000
# MLflow runs whose state (cursors, JSONL tail) is kept in memory; beyond it the least
# recently logged is let go and found again in MLflow (its tags and artifacts) when needed.
MAX_CACHED_RUNS = 32

# MLflow's limits on one log_batch call (mlflow.utils.validation), named here so the pure
# chunking below needs no MLflow import.
MAX_METRICS_PER_BATCH = 1000
MAX_ENTITIES_PER_BATCH = 1000
MAX_TAG_VALUE_CHARS = 8000
MAX_NAME_PART_CHARS = 100  # of one segment; MLflow allows 250 for a whole metric name

TAG_RUN_ID = "smart_tuner.run_id"
TAG_CURSOR = "smart_tuner.cursor."  # + stream name: the newest entry id logged
TAG_PICTURE_STEP = "smart_tuner.last_picture_step"
TAG_PREFIX = "smart_tuner."
CURSOR_STREAMS = (Stream.METRICS, Stream.DIAGNOSTICS)  # the JSONL streams keep theirs in the file
JSONL_STREAMS = {Stream.ACTIONS: "actions", Stream.EVENTS: "events"}
NO_ENTRY = "0-0"

# MlflowException codes that mean "this request is wrong", not "MLflow is unwell": retrying
# them never helps, so their entries are dead-lettered.
PERMANENT_ERROR_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST",
                                   "MALFORMED_REQUEST"})

# MetricsMessage field -> MLflow metric name. Never both a name and a prefix of another
# name: MLflow's file store keeps a metric as a file named like it.
METRIC_NAMES: dict[str, str] = {
    "loss": "loss/total",
    "mel": "loss/mel",
    "mel_postnet": "loss/mel_postnet",
    "gate": "loss/gate",
    "guided_attention": "loss/guided_attention",
    "objective": "loss/objective",
    "grad_norm": "train/grad_norm_preclip",
    "lr": "train/lr",
    "guided_attention_weight": "train/guided_attention_weight",
    "clip_threshold": "train/clip_threshold",
    "step_seconds": "train/step_seconds",
    "skipped_steps": "train/skipped_steps",
}
NONFINITE_METRIC = "train/nonfinite_step"
ALIGNMENT_PREFIX = "alignment/"
ALIGNMENT_SCORES = ("diagonality", "monotonicity", "focus", "coverage", "entropy", "quality")
EFFECT_PREFIX = "effect/"
RUN_STATUS_OF_EVENT = {"run_started": "RUNNING", "resumed": "RUNNING", "finished": "FINISHED",
                       "stopped": "KILLED"}
# Facts of lifecycle events worth a tag: event -> data keys.
EVENT_TAG_KEYS = {"run_started": ("restarts",), "finished": ("stop_reason", "all_indicators_met"),
                  "stopped": ("stop_reason", "all_indicators_met")}
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class MlflowSinkError(RuntimeError):
    """The sink cannot start: the message says what to set or install."""


class MlflowUnavailableError(RuntimeError):
    """MLflow did not accept a write that may succeed later; nothing of it was acked."""


class MetricPoint(NamedTuple):
    """One MLflow metric value, as ``mlflow.entities.Metric`` takes it."""

    name: str
    value: float
    step: int
    timestamp_ms: int


# --------------------------------------------------------------------------- pure mapping


def enabled() -> bool:
    """Whether the sink is configured: ``MLFLOW_TRACKING_URI`` is set (and not blank)."""
    return bool(os.environ.get(TRACKING_URI_ENV, "").strip())


def logged_value(value: float) -> float:
    """``value`` as logged: finite values unchanged, NaN for every non-finite one."""
    return value if math.isfinite(value) else math.nan


def name_part(text: str) -> str:
    """``text`` as one segment of an MLflow metric name (no slash, only safe characters)."""
    return _UNSAFE_NAME_CHARS.sub("_", text).strip("_")[:MAX_NAME_PART_CHARS] or "unnamed"


def _timestamp_ms(message: Message) -> int:
    return int(message.ts * 1000)


def metrics_points(message: MetricsMessage) -> list[MetricPoint]:
    """The MLflow metrics of one trainer step, at its step."""
    ts = _timestamp_ms(message)
    points = [MetricPoint(name, logged_value(float(getattr(message, field_name))), message.step,
                          ts)
              for field_name, name in METRIC_NAMES.items()]
    points.append(MetricPoint(NONFINITE_METRIC, 0.0 if message.finite else 1.0, message.step,
                              ts))
    return points


def alignment_points(report: AlignmentReport) -> list[MetricPoint]:
    """The batch-mean alignment scores of a report (``alignment/<score>``), at its step."""
    ts = _timestamp_ms(report)
    return [MetricPoint(f"{ALIGNMENT_PREFIX}{score}", float(getattr(report.scores, score)),
                        report.step, ts)
            for score in ALIGNMENT_SCORES]


def action_points(record: ActionRecord) -> list[MetricPoint]:
    """For a ``measured`` record: the effect, at the step it was measured; else nothing.

    The names are ``effect/<action>/<metric>/{before,after,recovered}``.
    """
    effect, ack = record.effect, record.ack
    if record.stage != "measured" or effect is None or ack is None:
        return []
    prefix = f"{EFFECT_PREFIX}{name_part(record.command.action)}/{name_part(effect.metric)}/"
    step, ts = ack.step + effect.steps, _timestamp_ms(record)
    return [MetricPoint(f"{prefix}before", logged_value(effect.before), step, ts),
            MetricPoint(f"{prefix}after", logged_value(effect.after), step, ts),
            MetricPoint(f"{prefix}recovered", 1.0 if effect.recovered else 0.0, step, ts)]


def action_row(record: ActionRecord, entry_id: str) -> dict[str, Any]:
    """One line of ``actions/*.jsonl``: the decision, flat, as far as it has got."""
    command, trigger, ack, effect = record.command, record.trigger, record.ack, record.effect
    row: dict[str, Any] = {
        "entry_id": entry_id, "ts": record.ts, "action_id": record.action_id,
        "stage": record.stage, "action": command.action, "value": command.value,
        "source": command.source, "command_id": command.command_id, "note": command.note,
        "rule": trigger.rule, "metric": trigger.metric, "trigger_value": trigger.value,
        "threshold": trigger.threshold, "window": trigger.window,
    }
    if ack is not None:
        row.update(ack_status=ack.status, ack_step=ack.step, before=ack.before,
                   after=ack.after, ack_detail=ack.detail)
    if effect is not None:
        row.update(effect_metric=effect.metric, effect_before=effect.before,
                   effect_after=effect.after, effect_steps=effect.steps,
                   recovered=effect.recovered)
    return row


def event_row(event: Event, entry_id: str) -> dict[str, Any]:
    """One line of ``events/*.jsonl``."""
    return {"entry_id": entry_id, "ts": event.ts, "event": event.event,
            "severity": event.severity, "step": event.step, "detail": event.detail,
            "data": event.data}


def event_tags(event: Event) -> dict[str, str]:
    """The MLflow run tags an event sets: its name as the last event, and its lifecycle facts."""
    tags = {f"{TAG_PREFIX}last_event": event.event}
    for key in EVENT_TAG_KEYS.get(event.event, ()):
        if key in event.data:
            tags[f"{TAG_PREFIX}{key}"] = str(event.data[key])[:MAX_TAG_VALUE_CHARS]
    return tags


def event_status(event: Event) -> str | None:
    """The MLflow run status an event implies, if any (``RUNNING``, ``FINISHED``, ``KILLED``)."""
    return RUN_STATUS_OF_EVENT.get(event.event)


def jsonl_line(row: dict[str, Any]) -> str:
    """``row`` as one JSON line; NaN and infinities written as the streams write them."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def is_after(entry_id: str, cursor: str) -> bool:
    """Whether ``entry_id`` is newer than ``cursor`` (the newest entry id already logged)."""
    return entry_order(entry_id) > entry_order(cursor)


def wants_picture(step: int, last_picture_step: int | None, every_steps: int) -> bool:
    """Whether a report at ``step`` gets a picture: the first, then one per ``every_steps``."""
    return last_picture_step is None or step >= last_picture_step + every_steps


def picture_path(step: int) -> str:
    """The artifact path of the alignment picture at ``step`` (zero-padded: sorts by step)."""
    return f"alignment/step_{step:08d}.png"


def jsonl_path(name: str, part: int) -> str:
    """The artifact path of part ``part`` of the ``name`` JSONL log."""
    return f"{name}/{name}-{part:05d}.jsonl"


def chunk_points(items: Sequence[tuple[str, list[MetricPoint]]], reserved: int = 0,
                 ) -> list[list[tuple[str, list[MetricPoint]]]]:
    """Split (entry id, points) items into ``log_batch``-sized chunks, never splitting an item.

    ``reserved`` entities per call are kept free for tags (the cursor). Every chunk has at
    most MAX_METRICS_PER_BATCH points and MAX_ENTITIES_PER_BATCH - ``reserved`` in all.
    """
    limit = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - reserved)
    chunks: list[list[tuple[str, list[MetricPoint]]]] = []
    current: list[tuple[str, list[MetricPoint]]] = []
    size = 0
    for entry_id, points in items:
        if len(points) > limit:
            raise ValueError(f"entry {entry_id} has {len(points)} metrics, over {limit}")
        if current and size + len(points) > limit:
            chunks.append(current)
            current, size = [], 0
        current.append((entry_id, points))
        size += len(points)
    if current:
        chunks.append(current)
    return chunks


@dataclass
class JsonlLog:
    """The newest part of one JSONL artifact log, as this sink last wrote it."""

    name: str
    part: int = 0
    lines: list[str] = field(default_factory=list)
    last_entry_id: str = NO_ENTRY

    def append(self, rows: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Add (entry id, line) pairs; returns the text of every part to (re)write, by path."""
        writes: dict[str, str] = {}
        for entry_id, line in rows:
            if len(self.lines) >= JSONL_PART_LINES:
                writes[jsonl_path(self.name, self.part)] = self.text()
                self.part, self.lines = self.part + 1, []
            self.lines.append(line)
            self.last_entry_id = entry_id
        if self.lines:
            writes[jsonl_path(self.name, self.part)] = self.text()
        return writes

    def text(self) -> str:
        """The current part's content."""
        return "".join(f"{line}\n" for line in self.lines)


@dataclass
class RunLog:
    """What the sink knows of one Smart Tuner run's MLflow run."""

    mlflow_run_id: str
    cursors: dict[Stream, str]
    last_picture_step: int | None
    jsonl: dict[Stream, JsonlLog]


@dataclass
class SinkStats:
    """Counters since the sink started."""

    metrics: int = 0  # metric points logged
    reports: int = 0
    pictures: int = 0
    actions: int = 0
    events: int = 0
    duplicates: int = 0  # entries delivered again after they were logged: acked only
    refused: int = 0  # entries MLflow refused as invalid: dead-lettered


# --------------------------------------------------------------------------- MLflow I/O


def _import_mlflow() -> Any:
    """Import MLflow, with its usage telemetry off unless the operator turned it on."""
    # The sink sends training data to the tracking server named and nowhere else.
    os.environ.setdefault(TELEMETRY_ENV, "true")
    # A progress bar per downloaded JSONL part is noise in a service's log.
    os.environ.setdefault(PROGRESS_BAR_ENV, "false")
    try:
        import mlflow
    except ImportError as error:
        raise MlflowSinkError("MLflow is not installed: pip install 'smart-tuner[mlflow]'"
                              ) from error
    return mlflow


def make_client() -> MlflowClient:
    """An MlflowClient for ``MLFLOW_TRACKING_URI``; MlflowSinkError when unset or unusable."""
    if not enabled():
        raise MlflowSinkError(f"{TRACKING_URI_ENV} is not set; the MLflow sink is off")
    mlflow = _import_mlflow()
    try:
        return mlflow.MlflowClient(tracking_uri=os.environ[TRACKING_URI_ENV].strip())
    except mlflow.exceptions.MlflowException as error:
        raise MlflowSinkError(f"MLflow at {os.environ[TRACKING_URI_ENV]!r}: {error.message}"
                              ) from error


class MlflowSink:
    """Reads runs' streams and logs them to MLflow; acks only what MLflow accepted."""

    def __init__(self, client: redis.Redis, mlflow_client: MlflowClient | None = None,
                 experiment: str = DEFAULT_EXPERIMENT, runs: Sequence[str] | None = None,
                 picture_every_steps: int = DEFAULT_PICTURE_EVERY_STEPS,
                 name: str = DEFAULT_CONSUMER, settings: LoopSettings | None = None):
        if picture_every_steps < 1:
            raise ValueError("picture_every_steps must be at least 1")
        mlflow = _import_mlflow()
        self._entities = mlflow.entities
        self._mlflow_errors: tuple[type[BaseException], ...] = (
            mlflow.exceptions.MlflowException, OSError)
        self.client = client
        self.store = RunStore(client)
        self.mlflow = mlflow_client if mlflow_client is not None else make_client()
        self.experiment = experiment
        self.picture_every_steps = picture_every_steps
        # runs empty or None: every run in the runs set.
        self.reader = RunStreamReader(client, GROUP, name, INPUT_STREAMS, settings,
                                      runs=runs or None, on_drop=self.forget)
        self.stats = SinkStats()
        self._run_logs: OrderedDict[str, RunLog] = OrderedDict()  # least recent first
        self._experiment_id: str | None = None

    # ---- reading

    @property
    def consumer(self) -> Consumer:
        """The reader's consumer (a fresh one after an outage or a deleted stream)."""
        return self.reader.consumer

    @property
    def runs(self) -> list[str]:
        """The runs being logged."""
        return self.reader.runs

    def discover(self) -> list[str]:
        """Start reading runs not seen before (the given ones, else the runs set)."""
        return self.reader.discover()

    def run_once(self, wait: bool = True) -> int:
        """One read and its logging; returns how many entries were read (dead letters too).

        Own unacked entries come first after a start or a failure (every page of them, in
        order, so no cursor skips one), then stale ones, then new ones, waited for up to the
        poll's block time when ``wait``.
        """
        dead_before = self.consumer.dead_lettered
        deliveries = self.reader.step(self.reader.settings.block_ms if wait else None)
        try:
            self.handle(deliveries)
        except BaseException:
            self.reader.recover()  # what was read but not acked is still ours: re-read it
            raise
        return len(deliveries) + self.consumer.dead_lettered - dead_before

    def drain(self, timeout_s: float = 60.0) -> int:
        """Log everything there is now, then return how many entries were handled.

        Raises MlflowUnavailableError or a Redis error when one stops it (nothing unlogged acked).
        """
        self.reader.discover()  # see runs that appeared since the last look
        deadline = time.monotonic() + timeout_s
        handled = 0
        while time.monotonic() < deadline:
            count = self.run_once(wait=False)
            handled += count
            if count == 0 and not self.reader.recovering:
                break
        return handled

    def run_forever(self, stop: threading.Event) -> None:
        """Log until ``stop`` is set; the reader rides out Redis and MLflow outages."""
        self.reader.run(stop, self.handle, retry_on=(MlflowUnavailableError,))

    # ---- logging

    def handle(self, deliveries: list[Delivery]) -> None:
        """Log ``deliveries`` per run and stream in entry order, acking each group once logged.

        Raises MlflowUnavailableError at the first group MLflow did not take; the groups before it
        are logged and acked, that one and the rest are not.
        """
        groups: dict[tuple[str, Stream], list[Delivery]] = {}
        for delivery in deliveries:
            # The run of the stream, not the message's claim: a message never moves its
            # entries into another run's MLflow run or cursor.
            groups.setdefault(self.reader.sources[delivery.key], []).append(delivery)
        for (run_id, stream), group in groups.items():
            group.sort(key=lambda delivery: entry_order(delivery.entry_id))
            self._log_group(run_id, stream, group)

    def _log_group(self, run_id: str, stream: Stream, group: list[Delivery]) -> None:
        try:
            run_log = self._run_log(run_id)
        except self._mlflow_errors as error:
            # Finding the experiment or run is never the entries' fault: retry, never refuse.
            raise MlflowUnavailableError(f"run {run_id}: no MLflow run: {error}") from error
        try:
            cursor = self._cursor(run_log, stream)
            fresh = [d for d in group if is_after(d.entry_id, cursor)]
            self.stats.duplicates += len(group) - len(fresh)
            if fresh:
                self._log(run_id, run_log, stream, fresh)
        except self._mlflow_errors as error:
            # What is cached of this run may no longer match MLflow: read it again next time.
            self._run_logs.pop(run_id, None)
            if not _is_permanent(error):
                raise MlflowUnavailableError(f"run {run_id} {stream.value}: {error}") from error
            if len(group) > 1:  # find the entries MLflow refuses; log the others
                for delivery in group:
                    self._log_group(run_id, stream, [delivery])
                return
            self._refuse(group[0], str(error))
            return
        key = group[0].key
        self.client.xack(key, self.consumer.group, *[delivery.entry_id for delivery in group])

    def _refuse(self, delivery: Delivery, reason: str) -> None:
        fields = {WIRE_FIELD: delivery.message.model_dump_json()}
        self.consumer.dead_letter(delivery.key, delivery.entry_id, fields,
                                  f"MLflow refused it: {reason}"[:1000])
        self.stats.refused += 1

    @staticmethod
    def _cursor(run_log: RunLog, stream: Stream) -> str:
        if stream in run_log.jsonl:
            return run_log.jsonl[stream].last_entry_id
        return run_log.cursors.get(stream, NO_ENTRY)

    def _log(self, run_id: str, run_log: RunLog, stream: Stream,
             deliveries: list[Delivery]) -> None:
        if stream is Stream.METRICS:
            self._log_points(run_log, stream, [
                (entry_id, metrics_points(message))
                for entry_id, message in _typed(deliveries, MetricsMessage)])
        elif stream is Stream.DIAGNOSTICS:
            self._log_reports(run_id, run_log, _typed(deliveries, AlignmentReport))
        elif stream is Stream.ACTIONS:
            records = _typed(deliveries, ActionRecord)
            points = [p for _, record in records for p in action_points(record)]
            if points:  # before the JSONL line, which moves the cursor past the record
                self._log_batch(run_log, points, {})
            self._append_jsonl(run_log, stream, [
                (entry_id, jsonl_line(action_row(record, entry_id)))
                for entry_id, record in records])
            self.stats.actions += len(records)
        elif stream is Stream.EVENTS:
            self._log_events(run_log, _typed(deliveries, Event))

    def _log_points(self, run_log: RunLog, stream: Stream,
                    items: list[tuple[str, list[MetricPoint]]],
                    extra_tags: dict[str, str] | None = None) -> None:
        """Metrics with the stream's cursor in the same call, so both land or neither does."""
        for chunk in chunk_points(items, reserved=1 + len(extra_tags or {})):
            last_id = chunk[-1][0]
            tags = {f"{TAG_CURSOR}{stream.value}": last_id, **(extra_tags or {})}
            self._log_batch(run_log, [p for _, points in chunk for p in points], tags)
            run_log.cursors[stream] = last_id

    def _log_batch(self, run_log: RunLog, points: list[MetricPoint],
                   tags: dict[str, str]) -> None:
        entities = self._entities
        metrics = [entities.Metric(p.name, p.value, p.timestamp_ms, p.step) for p in points]
        self.mlflow.log_batch(run_log.mlflow_run_id, metrics=metrics,
                              tags=[entities.RunTag(k, v) for k, v in tags.items()])
        self.stats.metrics += len(metrics)

    def _log_reports(self, run_id: str, run_log: RunLog,
                     reports: list[tuple[str, AlignmentReport]]) -> None:
        """Pictures first (re-logging one overwrites it), then scores with the cursor."""
        picture_step = run_log.last_picture_step
        for _, report in reports:
            if not wants_picture(report.step, picture_step, self.picture_every_steps):
                continue
            png = self._picture(run_id, report)
            if png is not None:
                self._log_bytes(run_log, picture_path(report.step), png)
                picture_step = report.step
                self.stats.pictures += 1
        extra = {} if picture_step is None else {TAG_PICTURE_STEP: str(picture_step)}
        self._log_points(run_log, Stream.DIAGNOSTICS,
                         [(entry_id, alignment_points(report)) for entry_id, report in reports],
                         extra)
        run_log.last_picture_step = picture_step
        self.stats.reports += len(reports)

    def _picture(self, run_id: str, report: AlignmentReport) -> bytes | None:
        """The report's own picture: the diagnostics worker's if it shows this snapshot, else
        drawn from the snapshot if it is still among the newest; None when neither is."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(alignment_png_meta_key(run_id))
        pipe.get(alignment_png_key(run_id))
        meta_raw, png = pipe.execute()
        try:
            meta = json.loads(meta_raw) if meta_raw else {}
        except ValueError:
            meta = {}
        if (isinstance(meta, dict) and meta.get("snapshot_id") == report.snapshot_id
                and png and png.startswith(PNG_SIGNATURE)):
            return png
        key, newest = stream_key(run_id, Stream.ATTENTION), "+"
        wanted = json.dumps(report.snapshot_id).encode()
        for _ in range(0, SNAPSHOT_SCAN, SNAPSHOT_PAGE):
            # Small pages, newest first: the snapshot is nearly always among the newest, and
            # each entry may be megabytes.
            entries = self.client.xrevrange(key, max=newest, count=SNAPSHOT_PAGE)
            for entry_id, fields in entries:
                raw = fields.get(WIRE_FIELD.encode(), fields.get(WIRE_FIELD, b""))
                if wanted not in (raw.encode() if isinstance(raw, str) else raw):
                    continue  # not it: spare decoding megabytes of base64
                try:
                    snapshot = decode(fields, AttentionSnapshot)
                    if (isinstance(snapshot, AttentionSnapshot)
                            and snapshot.snapshot_id == report.snapshot_id):
                        return render_snapshot(snapshot, report)
                except MessageError as error:
                    log.warning("run %s: snapshot %s gives no picture: %s", run_id,
                                entry_id, error.reason)
            if len(entries) < SNAPSHOT_PAGE:
                break
            newest = f"({_text(entries[-1][0])}"  # exclusive: go on below the last one
        log.info("run %s: no picture for step %d, snapshot %s is gone", run_id, report.step,
                 report.snapshot_id)
        return None

    def _log_events(self, run_log: RunLog, events: list[tuple[str, Event]]) -> None:
        """Tags and run status first (setting them again is harmless), then the JSONL."""
        tags: dict[str, str] = {}
        status: tuple[str, Event] | None = None
        for _, event in events:
            tags.update(event_tags(event))
            if (new_status := event_status(event)) is not None:
                status = (new_status, event)
        if tags:
            self._log_batch(run_log, [], tags)
        if status is not None:
            name, event = status
            if name == "RUNNING":
                self.mlflow.update_run(run_log.mlflow_run_id, status=name)
            else:
                self.mlflow.set_terminated(run_log.mlflow_run_id, status=name,
                                           end_time=_timestamp_ms(event))
        self._append_jsonl(run_log, Stream.EVENTS, [
            (entry_id, jsonl_line(event_row(event, entry_id))) for entry_id, event in events])
        self.stats.events += len(events)

    def _append_jsonl(self, run_log: RunLog, stream: Stream,
                      rows: list[tuple[str, str]]) -> None:
        for path, text in run_log.jsonl[stream].append(rows).items():
            self.mlflow.log_text(run_log.mlflow_run_id, text, path)

    def _log_bytes(self, run_log: RunLog, path: str, data: bytes) -> None:
        directory, _, filename = path.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="smart-tuner-mlflow-") as tmp:
            local = Path(tmp) / filename
            local.write_bytes(data)
            self.mlflow.log_artifact(run_log.mlflow_run_id, str(local), directory or None)

    # ---- the MLflow run of a Smart Tuner run

    def experiment_id(self) -> str:
        """The experiment's id, created when missing (by this or a racing sink)."""
        if self._experiment_id is None:
            experiment = self.mlflow.get_experiment_by_name(self.experiment)
            if experiment is None:
                try:
                    self._experiment_id = self.mlflow.create_experiment(self.experiment)
                except self._mlflow_errors:
                    experiment = self.mlflow.get_experiment_by_name(self.experiment)
                    if experiment is None:
                        raise
                    self._experiment_id = experiment.experiment_id
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def mlflow_run_id(self, run_id: str) -> str:
        """The id of the MLflow run of ``run_id`` (found by its tag, else created)."""
        return self._run_log(run_id).mlflow_run_id

    def forget(self, run_id: str) -> None:
        """Drop the in-memory state of ``run_id`` (it left Redis; MLflow keeps its record)."""
        self._run_logs.pop(run_id, None)

    def _run_log(self, run_id: str) -> RunLog:
        cached = self._run_logs.get(run_id)
        if cached is not None:
            self._run_logs.move_to_end(run_id)
            return cached
        experiment_id = self.experiment_id()
        found = self.mlflow.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{validate_run_id(run_id)}'",
            max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            run = found[0]
            tags = run.data.tags
        else:
            run = self.mlflow.create_run(experiment_id, run_name=run_id,
                                         tags={TAG_RUN_ID: run_id})
            tags = {}
            log.info("run %s: created MLflow run %s in experiment %r", run_id,
                     run.info.run_id, self.experiment)
        picture_step = tags.get(TAG_PICTURE_STEP)
        run_log = RunLog(
            mlflow_run_id=run.info.run_id,
            cursors={s: tags.get(f"{TAG_CURSOR}{s.value}", NO_ENTRY) for s in CURSOR_STREAMS},
            last_picture_step=int(picture_step) if picture_step else None,
            jsonl={stream: self._load_jsonl(run.info.run_id, name) if found else JsonlLog(name)
                   for stream, name in JSONL_STREAMS.items()})
        self._run_logs[run_id] = run_log
        while len(self._run_logs) > MAX_CACHED_RUNS:
            self._run_logs.popitem(last=False)
        return run_log

    def _load_jsonl(self, mlflow_run_id: str, name: str) -> JsonlLog:
        """The newest part of a JSONL log as MLflow holds it (empty when there is none)."""
        parts = sorted(info.path for info in self.mlflow.list_artifacts(mlflow_run_id, name)
                       if not info.is_dir and info.path.endswith(".jsonl"))
        if not parts:
            return JsonlLog(name)
        newest = parts[-1]
        part = int(newest.rsplit("-", 1)[-1].removesuffix(".jsonl"))
        with tempfile.TemporaryDirectory(prefix="smart-tuner-mlflow-") as tmp:
            local = self.mlflow.download_artifacts(mlflow_run_id, newest, tmp)
            lines = Path(local).read_text(encoding="utf-8").splitlines()
        lines = [line for line in lines if line.strip()]
        last = json.loads(lines[-1])["entry_id"] if lines else NO_ENTRY
        return JsonlLog(name, part=part, lines=lines, last_entry_id=last)


def _is_permanent(error: BaseException) -> bool:
    return getattr(error, "error_code", None) in PERMANENT_ERROR_CODES


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _typed(deliveries: list[Delivery], schema: type[M]) -> list[tuple[str, M]]:
    """(entry id, message) pairs, checked to be of the stream's schema (the consumer decodes
    each stream with its own, so a mismatch is a bug here)."""
    pairs = []
    for delivery in deliveries:
        if not isinstance(delivery.message, schema):
            raise TypeError(f"{delivery.key} {delivery.entry_id}: expected {schema.__name__}, "
                            f"got {type(delivery.message).__name__}")
        pairs.append((delivery.entry_id, delivery.message))
    return pairs


# --------------------------------------------------------------------------- command


def mlflow_sink(
    experiment: Annotated[str | None, typer.Option(
        help=f"MLflow experiment (default: ${EXPERIMENT_ENV}, else {DEFAULT_EXPERIMENT!r})"
    )] = None,
    run: Annotated[list[str] | None, typer.Option(
        help="log only this run (repeatable); default: every known run")] = None,
    picture_every_steps: Annotated[int, typer.Option(
        min=1, help="at most one alignment picture per this many steps")
    ] = DEFAULT_PICTURE_EVERY_STEPS,
    consumer: Annotated[str, typer.Option(
        help="consumer name; keep it stable so a restart re-reads its pending entries")
    ] = DEFAULT_CONSUMER,
    once: Annotated[bool, typer.Option(
        "--once", help="log what the streams hold now, then exit")] = False,
) -> None:
    """Log runs' metrics, alignment, tuner actions and events to MLflow until Ctrl-C.

    Off unless MLFLOW_TRACKING_URI is set; needs SMART_TUNER_REDIS_URL.
    """
    from services.core.bus import connect
    from services.core.logging import setup_logging
    from services.core.settings import ConfigError, get_settings

    if not enabled():
        typer.echo(f"mlflow-sink: {TRACKING_URI_ENV} is not set, so the MLflow sink is off "
                   "(set it, e.g. http://127.0.0.1:5000, to log runs to MLflow)", err=True)
        raise typer.Exit(2)
    try:
        settings = get_settings()
        if settings.redis_url is None:
            raise ConfigError("the MLflow sink needs SMART_TUNER_REDIS_URL")
        sink = MlflowSink(connect(settings.redis_url), make_client(),
                          experiment=experiment or os.environ.get(EXPERIMENT_ENV)
                          or DEFAULT_EXPERIMENT,
                          runs=run, picture_every_steps=picture_every_steps, name=consumer)
    except (ConfigError, MlflowSinkError, ValueError) as error:
        typer.echo(f"mlflow-sink: {error}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level)
    try:
        sink.experiment_id()  # a refused experiment name fails here, not on every entry
    except sink_errors() as error:
        if _is_permanent(error):
            typer.echo(f"mlflow-sink: MLflow at {os.environ[TRACKING_URI_ENV]!r} refuses "
                       f"experiment {sink.experiment!r}: {error}", err=True)
            raise typer.Exit(2) from None
        log.warning("MLflow not reachable yet, the sink will keep trying: %s", error)
    if once:
        try:
            handled = sink.drain()
        except (MlflowUnavailableError, *CONNECTION_ERRORS) as error:
            typer.echo(f"mlflow-sink: stopped, nothing unlogged was acked: {error}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"mlflow-sink: {handled} entries handled, {sink.stats}")
        return
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    log.info("MLflow sink %s/%s started: experiment %r at %s", GROUP, consumer,
             sink.experiment, os.environ[TRACKING_URI_ENV])
    sink.run_forever(stop)
    log.info("MLflow sink stopped: %s", sink.stats)


def sink_errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises when it cannot take a request (MlflowException, network errors)."""
    return (_import_mlflow().exceptions.MlflowException, OSError)


def register(app: typer.Typer) -> None:
    """Attach the ``mlflow-sink`` command to the top-level CLI."""
    app.command("mlflow-sink")(mlflow_sink)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.observability.mlflow_sink``: the command, until SIGINT/SIGTERM."""
    app = typer.Typer(add_completion=False)
    register(app)
    app(args=list(argv) if argv is not None else None,
        prog_name="python -m services.observability.mlflow_sink")


if __name__ == "__main__":
    main()
