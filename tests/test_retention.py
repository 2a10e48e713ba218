"""Retention: a finished run leaves Redis after SMART_TUNER_RETENTION_DAYS, and every
service drops what it kept in memory about it; in-memory per-run state is bounded besides.
Real Redis; the old run's entries carry explicit ids from weeks ago (Redis entry ids are
the writer's time), so no clock is faked."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from services.core.consumer import RunStreamReader
from services.core.retention import (
    DAY_S,
    RetentionSweeper,
    RunActivity,
    expired_runs,
)
from services.core.schemas import Event, encode
from services.core.settings import load_settings
from services.core.streams import PREFIX, RUNS_KEY, Stream, stream_key, tuner_key
from services.notifier.planner import MAX_RUNS, ReportPlanner
from services.tuner.config import TunerConfig
from services.tuner.service import TunerService
from tests.test_tuner_service import CONFIG, publish, step_metrics

RETENTION_S = 14 * DAY_S
GRACE_S = 120


def new_run(rc: redis.Redis, prefix: str) -> str:
    run_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rc.made.append(run_id)  # type: ignore[attr-defined]
    rc.sadd(RUNS_KEY, run_id)
    return run_id


def seed(rc: redis.Redis, run_id: str, days_ago: float, last_event: str | None) -> None:
    """Metrics (and a last event) written ``days_ago`` days ago, plus a tuner key."""
    ms = int((time.time() - days_ago * DAY_S) * 1000)
    rc.xadd(stream_key(run_id, Stream.METRICS), encode(step_metrics(run_id, 1, 1.0)),
            id=f"{ms}-0")
    if last_event is not None:
        rc.xadd(stream_key(run_id, Stream.EVENTS),
                encode(Event(run_id=run_id, event=last_event, step=1)), id=f"{ms + 1}-0")
    rc.set(tuner_key(run_id, "memory"), "{}")


def test_expired_runs_are_the_ended_ones_quiet_for_the_retention() -> None:
    now_ms = int(100 * DAY_S * 1000)
    old, recent = now_ms - int(20 * DAY_S * 1000), now_ms - int(DAY_S * 1000)
    runs = [RunActivity("done-old", old, True), RunActivity("done-new", recent, True),
            RunActivity("live-old", old, False), RunActivity("empty", None, True)]
    assert expired_runs(runs, now_ms, RETENTION_S) == ["done-old"]


def test_retention_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMART_TUNER_RETENTION_DAYS", "3")
    assert load_settings().retention_days == 3


def test_sweep_expires_finished_runs_only(rc: redis.Redis) -> None:
    done = new_run(rc, "ret-done")
    stopped = new_run(rc, "ret-stopped")
    fresh = new_run(rc, "ret-fresh")
    live = new_run(rc, "ret-live")
    seed(rc, done, 20, "finished")
    seed(rc, stopped, 20, "stopped")
    seed(rc, fresh, 1, "finished")
    seed(rc, live, 20, "paused")
    sweeper = RetentionSweeper(rc, RETENTION_S, grace_s=GRACE_S)
    swept = sweeper.sweep()
    assert set(swept) >= {done, stopped}
    assert not set(swept) & {fresh, live}
    members = {m.decode() for m in rc.smembers(RUNS_KEY)}
    assert done not in members and stopped not in members
    assert fresh in members and live in members
    for run_id in (done, stopped):
        keys = list(rc.scan_iter(match=f"{PREFIX}:{run_id}:*"))
        assert len(keys) == 3  # metrics, events, tuner memory: going, not gone yet
        assert all(0 < rc.ttl(key) <= GRACE_S for key in keys)  # readers let go first
    for run_id in (fresh, live):
        assert all(rc.ttl(key) == -1 for key in rc.scan_iter(match=f"{PREFIX}:{run_id}:*"))


def test_a_run_that_comes_back_keeps_its_streams(rc: redis.Redis) -> None:
    run_id = new_run(rc, "ret-back")
    seed(rc, run_id, 20, "finished")
    sweeper = RetentionSweeper(rc, RETENTION_S, grace_s=GRACE_S)
    assert run_id in sweeper.sweep()
    # The trainer resumed it: its publisher adds it to the runs set again and writes on.
    rc.sadd(RUNS_KEY, run_id)
    rc.xadd(stream_key(run_id, Stream.EVENTS), encode(Event(run_id=run_id, event="resumed")))
    assert run_id not in sweeper.sweep()
    assert all(rc.ttl(key) == -1 for key in rc.scan_iter(match=f"{PREFIX}:{run_id}:*"))


def test_reader_lets_go_of_a_run_that_left_the_runs_set(rc: redis.Redis) -> None:
    run_id = new_run(rc, "ret-reader")
    seed(rc, run_id, 0, None)
    dropped: list[str] = []
    reader = RunStreamReader(rc, f"g-{run_id}", "c1", (Stream.METRICS, Stream.EVENTS),
                             on_drop=dropped.append)
    reader.discover()
    assert run_id in reader.runs
    rc.srem(RUNS_KEY, run_id)
    reader.discover()
    assert run_id not in reader.runs and dropped == [run_id]
    assert not any(key.startswith(f"{PREFIX}:{run_id}:") for key in reader.consumer.keys)
    assert not any(key.startswith(f"{PREFIX}:{run_id}:") for key in reader.sources)


def test_tuner_drops_an_expired_run_and_bounds_the_runs_it_keeps(rc: redis.Redis) -> None:
    config = TunerConfig.model_validate(
        CONFIG.model_dump() | {"service": CONFIG.service.model_dump() | {"max_runs": 2}})
    runs = [new_run(rc, "ret-tuner") for _ in range(3)]
    tuner = TunerService(rc, config, group=f"tuner-{runs[0]}", consumer="t1", runs=None)
    tuner.discover_runs()
    for run_id in runs:
        publish(rc, run_id, Stream.METRICS, step_metrics(run_id, 1, 1.0))
    for _ in range(3):
        tuner.run_once(block_ms=10)
    assert len(tuner.windows) <= 2 and len(tuner.pending) <= 2
    rc.srem(RUNS_KEY, runs[2])
    tuner.discover_runs()
    assert runs[2] not in tuner.windows and runs[2] not in tuner.pending
    # An evicted run's window comes back from its stored memory when it speaks again.
    publish(rc, runs[0], Stream.METRICS, step_metrics(runs[0], 2, 1.0))
    for _ in range(2):
        tuner.run_once(block_ms=10)
    assert tuner.windows[runs[0]].step == 2


def test_planner_forgets_runs_and_keeps_at_most_max_runs() -> None:
    planner = ReportPlanner("en", every_steps=10, every_s=3600.0)
    for index in range(MAX_RUNS + 20):
        planner.observe(step_metrics(f"plan-{index}", 1, 1.0))
    assert len(planner._runs) <= MAX_RUNS
    planner.observe(step_metrics("plan-last", 1, 1.0))
    planner.forget("plan-last")
    assert "plan-last" not in planner._runs
    assert planner.progress("never-seen") is None
    assert "never-seen" not in planner._runs  # reading creates nothing


def test_sweeper_refuses_a_retention_of_nothing() -> None:
    with pytest.raises(ValueError):
        RetentionSweeper(redis.Redis(), retention_s=0.0)
