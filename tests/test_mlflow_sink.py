"""The MLflow sink against a local file-store tracking URI and the real Redis."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import typer
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from typer.testing import CliRunner

from services.core.consumer import LoopSettings
from services.core.runstore import PNG_SIGNATURE
from services.core.schemas import (
    Ack,
    ActionRecord,
    AttentionSample,
    AttentionSnapshot,
    Command,
    Effect,
    Event,
    Message,
    MetricsMessage,
    Trigger,
    encode,
)
from services.core.settings import get_settings
from services.core.streams import (
    DEAD_LETTER_STREAM,
    PREFIX,
    RUNS_KEY,
    Stream,
    alignment_png_key,
    alignment_png_meta_key,
    stream_key,
)
from services.diagnostics.plots import render_alignment_png
from services.diagnostics.reports import build_report
from services.observability import mlflow_sink
from services.observability.mlflow_sink import (
    GROUP,
    INPUT_STREAMS,
    MAX_ENTITIES_PER_BATCH,
    JsonlLog,
    MetricPoint,
    MlflowSink,
    MlflowUnavailableError,
    chunk_points,
    enabled,
    metrics_points,
)

STEPS = 20
NONFINITE_STEP = 7
BAD_AFTER_STEP = 10  # the malformed metrics entries go in after this step
PICTURE_EVERY = 10
FAST_LOOP = LoopSettings(block_ms=50)  # short polls: the tests step the sink themselves
REPORT_STEPS = (10, 20, 25)  # 25 is within PICTURE_EVERY of 20: no picture
STORED_PICTURE_STEP = 20  # the diagnostics worker's stored picture shows this one
ACK_STEP, MEASURE_STEPS = 12, 5


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """A local file-store tracking URI, set the way an operator sets it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants the opt-in
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return MlflowClient()


@pytest.fixture
def rclient(redis_url: str, run_id: str) -> Iterator[redis.Redis]:
    """A client of the test Redis; the run's keys are removed afterwards."""
    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(f"{PREFIX}:{run_id}:*"))
    if keys:
        client.delete(*keys)
    client.srem(RUNS_KEY, run_id)
    client.close()


def publish(client: redis.Redis, stream: Stream, message: Message) -> str:
    """XADD ``message`` to its run's stream as a publisher does; returns the entry id."""
    client.sadd(RUNS_KEY, message.run_id)
    return client.xadd(stream_key(message.run_id, stream), encode(message)).decode()


def metrics_at(run_id: str, step: int) -> MetricsMessage:
    """A plausible trainer step; non-finite at NONFINITE_STEP."""
    finite = step != NONFINITE_STEP
    return MetricsMessage(
        run_id=run_id, step=step, loss=2.0 - 0.05 * step if finite else math.nan,
        mel=1.0 - 0.02 * step, mel_postnet=0.9 - 0.02 * step, gate=0.3, guided_attention=0.05,
        objective=2.1 - 0.05 * step, grad_norm=3.0 + step if finite else math.inf,
        lr=1e-3, guided_attention_weight=1.0, clip_threshold=1.0, step_seconds=0.25,
        finite=finite, skipped_steps=0 if step < NONFINITE_STEP else 1)


def snapshot_at(run_id: str, step: int) -> AttentionSnapshot:
    """A near-diagonal attention of 2 samples, as the trainer sends it."""
    rows, cols = 60, 20
    matrix = np.zeros((rows, cols), dtype=np.float32)
    for t in range(rows):
        matrix[t, min(cols - 1, t * cols // rows)] = 0.9
        matrix[t, min(cols - 1, t * cols // rows + 1)] = 0.1
    sample = AttentionSample.from_array(matrix, input_length=cols, output_length=rows)
    return AttentionSnapshot(run_id=run_id, snapshot_id=f"snap-{step}", step=step,
                             samples=[sample, sample])


def action_records(run_id: str) -> list[ActionRecord]:
    """One tuner decision through its three stages."""
    trigger = Trigger(rule="grad_explosion", metric="grad_norm", value=30.0, threshold=10.0,
                      window=5)
    command = Command(run_id=run_id, action="set_lr", value=5e-4, source="tuner",
                      reason=trigger, note="gradient norm above 10")
    ack = Ack(run_id=run_id, command_id=command.command_id, action="set_lr", status="applied",
              step=ACK_STEP, before=1e-3, after=5e-4)
    effect = Effect(metric="grad_norm", before=30.0, after=5.0, steps=MEASURE_STEPS,
                    recovered=True)
    common = {"run_id": run_id, "action_id": "a1", "trigger": trigger, "command": command}
    return [ActionRecord(stage="issued", **common),
            ActionRecord(stage="acked", ack=ack, **common),
            ActionRecord(stage="measured", ack=ack, effect=effect, **common)]


@dataclass
class Published:
    """What a realistic run put on its streams, for the assertions."""

    metrics: dict[int, MetricsMessage] = field(default_factory=dict)
    reports: dict[int, Any] = field(default_factory=dict)
    action_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    bad_ids: list[str] = field(default_factory=list)
    stored_png: bytes = b""

    @property
    def entries(self) -> int:
        """Entries the sink reads (its four input streams, malformed ones included)."""
        return (len(self.metrics) + len(self.reports) + len(self.action_ids)
                + len(self.event_ids) + len(self.bad_ids))


def publish_run(client: redis.Redis, run_id: str) -> Published:
    """Metrics, alignment, actions and lifecycle events of a short run, with two bad entries."""
    out = Published()
    out.event_ids.append(publish(client, Stream.EVENTS, Event(
        run_id=run_id, event="run_started", step=0, detail="step 0, restarts 0",
        data={"step": 0, "restarts": 0, "consecutive": 0, "restarted": False})))
    records = iter(action_records(run_id))
    for step in range(1, STEPS + 1):
        out.metrics[step] = metrics_at(run_id, step)
        publish(client, Stream.METRICS, out.metrics[step])
        if step == BAD_AFTER_STEP:
            key = stream_key(run_id, Stream.METRICS)
            out.bad_ids.append(client.xadd(key, {"data": "{not json"}).decode())
            out.bad_ids.append(client.xadd(key, {"data": json.dumps(
                {"v": 1, "kind": "metrics", "run_id": run_id, "step": -1})}).decode())
        if step in (BAD_AFTER_STEP, ACK_STEP, ACK_STEP + MEASURE_STEPS):
            out.action_ids.append(publish(client, Stream.ACTIONS, next(records)))
    for step in REPORT_STEPS:
        snapshot = snapshot_at(run_id, step)
        publish(client, Stream.ATTENTION, snapshot)
        out.reports[step] = build_report(snapshot, worker="test")
        publish(client, Stream.DIAGNOSTICS, out.reports[step])
    # The diagnostics worker's own rendering of the step-20 snapshot, stored as it stores it.
    out.stored_png = render_alignment_png(np.eye(8), title="stored by the worker")
    client.set(alignment_png_key(run_id), out.stored_png)
    client.set(alignment_png_meta_key(run_id), json.dumps(
        {"snapshot_id": f"snap-{STORED_PICTURE_STEP}", "step": STORED_PICTURE_STEP}))
    out.event_ids.append(publish(client, Stream.EVENTS, Event(
        run_id=run_id, event="finished", step=STEPS, detail="max_steps",
        data={"all_indicators_met": False, "stop_reason": "max_steps", "step": STEPS})))
    return out


def make_sink(rclient: redis.Redis, run_id: str, **kwargs: Any) -> MlflowSink:
    """A sink over just this test's run (the test Redis holds other tests' runs too)."""
    kwargs.setdefault("picture_every_steps", PICTURE_EVERY)
    kwargs.setdefault("settings", FAST_LOOP)
    return MlflowSink(rclient, runs=[run_id], **kwargs)


def history(client: MlflowClient, mlflow_run_id: str, name: str) -> list[tuple[int, Any]]:
    """(step, value) of a metric, by step; NaN as the string "nan", so lists compare."""
    return sorted((m.step, "nan" if math.isnan(m.value) else m.value)
                  for m in client.get_metric_history(mlflow_run_id, name))


def artifact_text(client: MlflowClient, mlflow_run_id: str, path: str, tmp: Path) -> str:
    """The text of one artifact."""
    return Path(client.download_artifacts(mlflow_run_id, path, str(tmp))).read_text()


def jsonl_rows(client: MlflowClient, mlflow_run_id: str, name: str, tmp: Path
               ) -> list[dict[str, Any]]:
    """Every row of a JSONL log, parts in order."""
    parts = sorted(f.path for f in client.list_artifacts(mlflow_run_id, name))
    return [json.loads(line) for part in parts
            for line in artifact_text(client, mlflow_run_id, part, tmp).splitlines()]


def pending(client: redis.Redis, run_id: str) -> int:
    """Entries of the run read by the sink's group but not acked."""
    total = 0
    for stream in INPUT_STREAMS:
        with contextlib.suppress(redis.ResponseError):  # no group yet
            total += client.xpending(stream_key(run_id, stream), GROUP)["pending"]
    return total


class FlakyClient:
    """An MlflowClient whose ``log_batch`` fails as told, the rest passing through."""

    def __init__(self, inner: MlflowClient, fail: Any):
        self.inner = inner
        self.fail = fail  # (metrics) -> MlflowException | None
        self.calls = 0

    def log_batch(self, run_id: str, metrics: Any = (), **kwargs: Any) -> None:
        """Raise what ``fail`` says for this call, else log."""
        self.calls += 1
        error = self.fail(metrics)
        if error is not None:
            raise error
        self.inner.log_batch(run_id, metrics=metrics, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --------------------------------------------------------------------------- pure mapping


def test_metrics_mapping_logs_non_finite_values_as_nan_and_flags_the_step() -> None:
    good = {p.name: p for p in metrics_points(metrics_at("r1", 3))}
    bad = {p.name: p for p in metrics_points(metrics_at("r1", NONFINITE_STEP))}
    assert good["loss/total"].value == pytest.approx(1.85)
    assert good["train/grad_norm_preclip"].value == 6.0
    assert good["train/nonfinite_step"].value == 0.0
    assert {p.step for p in good.values()} == {3}
    assert math.isnan(bad["loss/total"].value)
    assert math.isnan(bad["train/grad_norm_preclip"].value)  # inf, logged as NaN
    assert bad["train/nonfinite_step"].value == 1.0
    # No name is also a prefix of another (MLflow's file store keeps each as a file).
    names = set(good)
    assert not any(other.startswith(f"{name}/") for name in names for other in names)


def test_chunks_respect_mlflow_batch_limits_and_never_split_an_entry() -> None:
    items = [(f"{i}-0", [MetricPoint(f"m{j}", 1.0, i, 0) for j in range(13)])
             for i in range(200)]
    chunks = chunk_points(items, reserved=2)
    assert len(chunks) == 3
    assert all(sum(len(p) for _, p in chunk) <= MAX_ENTITIES_PER_BATCH - 2 for chunk in chunks)
    assert [entry for chunk in chunks for entry in chunk] == items


def test_jsonl_log_rolls_over_into_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlflow_sink, "JSONL_PART_LINES", 3)
    log = JsonlLog("events")
    first = log.append([(f"{i}-0", f"line{i}") for i in range(2)])
    assert first == {"events/events-00000.jsonl": "line0\nline1\n"}
    second = log.append([(f"{i}-0", f"line{i}") for i in range(2, 5)])
    assert second == {"events/events-00000.jsonl": "line0\nline1\nline2\n",
                      "events/events-00001.jsonl": "line3\nline4\n"}
    assert log.last_entry_id == "4-0"


# --------------------------------------------------------------------------- the sink


def test_sink_logs_a_run_to_mlflow_once(tracking: MlflowClient, rclient: redis.Redis,
                                        run_id: str, tmp_path: Path) -> None:
    published = publish_run(rclient, run_id)
    sink = make_sink(rclient, run_id)
    assert sink.drain() == published.entries
    assert pending(rclient, run_id) == 0

    # One MLflow run, found by the Smart Tuner run id, finished by the finished event.
    experiment = tracking.get_experiment_by_name("smart-tuner")
    runs = tracking.search_runs([experiment.experiment_id],
                                f"tags.`smart_tuner.run_id` = '{run_id}'")
    assert len(runs) == 1
    run = runs[0]
    mlflow_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["smart_tuner.stop_reason"] == "max_steps"
    assert run.data.tags["smart_tuner.restarts"] == "0"

    # Every step once, at its step, the bad entries skipped but not what followed them.
    loss = history(tracking, mlflow_id, "loss/total")
    assert [step for step, _ in loss] == list(range(1, STEPS + 1))
    for step, value in loss:
        expected = published.metrics[step].loss
        assert value == "nan" if step == NONFINITE_STEP else value == pytest.approx(expected)
    nonfinite = dict(history(tracking, mlflow_id, "train/nonfinite_step"))
    assert [step for step, flag in nonfinite.items() if flag == 1.0] == [NONFINITE_STEP]
    assert dict(history(tracking, mlflow_id, "train/lr")) == dict.fromkeys(
        range(1, STEPS + 1), 1e-3)

    # Alignment scores at the reports' steps, and the tuner action's measured effect.
    diagonality = history(tracking, mlflow_id, "alignment/diagonality")
    assert diagonality == [(step, pytest.approx(published.reports[step].scores.diagonality))
                           for step in REPORT_STEPS]
    assert history(tracking, mlflow_id, "effect/set_lr/grad_norm/after") == [
        (ACK_STEP + MEASURE_STEPS, 5.0)]

    # Pictures: one per PICTURE_EVERY steps; the worker's stored one where it is this report's.
    pictures = sorted(f.path for f in tracking.list_artifacts(mlflow_id, "alignment"))
    assert pictures == ["alignment/step_00000010.png", "alignment/step_00000020.png"]
    drawn = Path(tracking.download_artifacts(mlflow_id, pictures[0], str(tmp_path))).read_bytes()
    stored = Path(tracking.download_artifacts(mlflow_id, pictures[1], str(tmp_path))).read_bytes()
    assert drawn.startswith(PNG_SIGNATURE) and len(drawn) > 1000
    assert stored == published.stored_png

    actions = jsonl_rows(tracking, mlflow_id, "actions", tmp_path)
    assert [(r["entry_id"], r["stage"], r["action"]) for r in actions] == [
        (entry_id, stage, "set_lr")
        for entry_id, stage in zip(published.action_ids, ("issued", "acked", "measured"),
                                   strict=True)]
    assert actions[-1]["recovered"] is True and actions[1]["ack_step"] == ACK_STEP
    events = jsonl_rows(tracking, mlflow_id, "events", tmp_path)
    assert [(r["entry_id"], r["event"]) for r in events] == list(
        zip(published.event_ids, ("run_started", "finished"), strict=True))

    # The malformed entries are dead-lettered with their reason.
    key = stream_key(run_id, Stream.METRICS)
    dead = {fields[b"id"].decode(): fields[b"reason"].decode()
            for _, fields in rclient.xrevrange(DEAD_LETTER_STREAM, count=200)
            if fields[b"stream"].decode() == key}
    assert set(dead) == set(published.bad_ids)
    assert all("MetricsMessage" in reason for reason in dead.values())

    # A second pass finds nothing; a fresh consumer group (acks lost) logs nothing twice.
    assert make_sink(rclient, run_id).drain() == 0
    for stream in INPUT_STREAMS:
        rclient.xgroup_destroy(stream_key(run_id, stream), GROUP)
    again = make_sink(rclient, run_id)
    assert again.drain() == published.entries
    assert again.stats.duplicates == published.entries - len(published.bad_ids)
    assert history(tracking, mlflow_id, "loss/total") == loss
    assert len(history(tracking, mlflow_id, "alignment/diagonality")) == len(REPORT_STEPS)
    assert jsonl_rows(tracking, mlflow_id, "actions", tmp_path) == actions
    assert jsonl_rows(tracking, mlflow_id, "events", tmp_path) == events


def test_mlflow_outage_acks_nothing_and_is_ridden_out(
        tracking: MlflowClient, rclient: redis.Redis, run_id: str) -> None:
    for step in range(1, STEPS + 1):
        publish(rclient, Stream.METRICS, metrics_at(run_id, step))
    outage = {"left": 3}

    def fail(metrics: Any) -> MlflowException | None:
        if metrics and outage["left"] > 0:
            outage["left"] -= 1
            return MlflowException("service unavailable", error_code=TEMPORARILY_UNAVAILABLE)
        return None

    flaky = FlakyClient(tracking, fail)
    sink = make_sink(rclient, run_id, mlflow_client=flaky,
                     settings=replace(FAST_LOOP, retry_initial_s=0.05))
    with pytest.raises(MlflowUnavailableError):
        sink.run_once(wait=False)
    assert pending(rclient, run_id) == STEPS  # read, not logged, so not acked
    mlflow_id = sink.mlflow_run_id(run_id)
    assert history(tracking, mlflow_id, "loss/total") == []

    stop = threading.Event()
    worker = threading.Thread(target=sink.run_forever, args=(stop,))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while pending(rclient, run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(5)
    assert outage["left"] == 0 and not worker.is_alive()
    assert pending(rclient, run_id) == 0
    assert [step for step, _ in history(tracking, mlflow_id, "loss/total")] == list(
        range(1, STEPS + 1))


def test_an_entry_mlflow_refuses_is_dead_lettered_and_the_rest_logged(
        tracking: MlflowClient, rclient: redis.Redis, run_id: str) -> None:
    refused_step = 5

    def fail(metrics: Any) -> MlflowException | None:
        if any(m.step == refused_step for m in metrics):
            return MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
        return None

    ids = {step: publish(rclient, Stream.METRICS, metrics_at(run_id, step))
           for step in range(1, 9)}
    sink = make_sink(rclient, run_id, mlflow_client=FlakyClient(tracking, fail))
    sink.drain()
    assert sink.stats.refused == 1 and pending(rclient, run_id) == 0
    steps = [step for step, _ in history(tracking, sink.mlflow_run_id(run_id), "loss/total")]
    assert steps == [step for step in ids if step != refused_step]
    dead = [fields for _, fields in rclient.xrevrange(DEAD_LETTER_STREAM, count=200)
            if fields[b"id"].decode() == ids[refused_step]]
    assert len(dead) == 1 and b"MLflow refused it" in dead[0][b"reason"]


# --------------------------------------------------------------------------- the command


def _cli() -> typer.Typer:
    """The real top-level CLI, with every command registered."""
    from services.cli import app

    return app


def test_command_refuses_without_a_tracking_uri(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not enabled()
    result = CliRunner().invoke(_cli(), ["mlflow-sink", "--once"])
    assert result.exit_code == 2
    assert "MLFLOW_TRACKING_URI is not set" in result.output
    with pytest.raises(SystemExit) as exited:
        mlflow_sink.main(["--once"])
    assert exited.value.code == 2
    assert list(tmp_path.iterdir()) == []  # no ./mlruns, nor anything else


def test_command_logs_a_run_once(tracking: MlflowClient, rclient: redis.Redis, run_id: str,
                                 redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMART_TUNER_REDIS_URL", redis_url)
    get_settings.cache_clear()
    try:
        publish(rclient, Stream.METRICS, metrics_at(run_id, 1))
        result = CliRunner().invoke(_cli(), ["mlflow-sink", "--once", "--run", run_id,
                                             "--experiment", "cli-test"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    experiment = tracking.get_experiment_by_name("cli-test")
    (run,) = tracking.search_runs([experiment.experiment_id],
                                  f"tags.`smart_tuner.run_id` = '{run_id}'")
    assert history(tracking, run.info.run_id, "loss/total") == [(1, pytest.approx(1.95))]
