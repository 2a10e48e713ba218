"""The tuner service against a real Redis: commands, the actions trail, restarts, dead letters."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from services.core.schemas import (
    Ack,
    ActionRecord,
    Command,
    Event,
    Message,
    MetricsMessage,
    decode,
    encode,
)
from services.core.streams import (
    DEAD_LETTER_STREAM,
    RUNS_KEY,
    Stream,
    stream_key,
    tuner_key,
)
from services.tuner.config import TunerConfig
from services.tuner.service import MEMORY_KEY, TunerService

ROOT = Path(__file__).resolve().parent.parent

# Small windows so a handful of messages exercise every stage; the rules are the real ones.
CONFIG = TunerConfig.model_validate({
    "grad_norm": {"window": 5, "min_above": 3, "cooldown_steps": 50, "recover_window": 10},
    "service": {"metrics_window": 60, "measure_after_steps": 5},
})


def service(client: redis.Redis, run_id: str, consumer: str = "tuner-1",
            config: TunerConfig = CONFIG, discover: bool = False) -> TunerService:
    """A tuner on its own group (so tests never share pending entries)."""
    return TunerService(client, config, group=f"tuner-{run_id}", consumer=consumer,
                        runs=None if discover else [run_id])


def publish(client: redis.Redis, run_id: str, stream: Stream, message: Message) -> None:
    client.xadd(stream_key(run_id, stream), encode(message))


def step_metrics(run_id: str, step: int, grad: float, lr: float = 1e-3) -> MetricsMessage:
    return MetricsMessage(run_id=run_id, step=step, loss=2.0, mel=1.0, mel_postnet=1.0,
                          gate=0.1, guided_attention=0.1, objective=2.0 - step * 0.01,
                          grad_norm=grad, lr=lr, guided_attention_weight=1.0,
                          clip_threshold=1.0, step_seconds=1.0, finite=True, skipped_steps=0)


def read(client: redis.Redis, run_id: str, stream: Stream, schema: type[Message]) -> list:
    return [decode(fields, schema) for _, fields in client.xrange(stream_key(run_id, stream))]


def drive(tuner: TunerService, rounds: int = 3) -> None:
    for _ in range(rounds):
        tuner.run_once(block_ms=10)


def explode(client: redis.Redis, run_id: str, steps: range) -> None:
    for step in steps:
        publish(client, run_id, Stream.METRICS, step_metrics(run_id, step, grad=500.0))


def test_command_then_ack_then_measured_effect(client: redis.Redis, run_id: str) -> None:
    explode(client, run_id, range(10))
    tuner = service(client, run_id)
    before = time.time()
    drive(tuner)

    commands = read(client, run_id, Stream.COMMANDS, Command)
    assert len(commands) == 1
    command = commands[0]
    assert command.action == "set_lr" and command.value == pytest.approx(5e-4)
    assert command.source == "tuner" and command.reason.rule == "grad_norm"
    assert command.note.startswith("grad_norm: grad_norm 500 vs threshold 100")
    assert command.reason.value > command.reason.threshold == 100.0
    assert command.expires_at == pytest.approx(before + CONFIG.service.command_ttl_s, abs=30)
    records = read(client, run_id, Stream.ACTIONS, ActionRecord)
    assert [(r.stage, r.action_id) for r in records] == [("issued", command.command_id)]
    flags = [e for e in read(client, run_id, Stream.EVENTS, Event) if e.event == "red_flag"]
    assert len(flags) == 1 and flags[0].severity == "critical"
    assert tuner.commands_issued == 1 and tuner.decisions_by_rule["grad_norm"] >= 1

    publish(client, run_id, Stream.ACKS, Ack(run_id=run_id, command_id=command.command_id,
                                             action="set_lr", status="applied", step=9,
                                             before=1e-3, after=5e-4))
    drive(tuner, 1)
    stages = [r.stage for r in read(client, run_id, Stream.ACTIONS, ActionRecord)]
    assert stages == ["issued", "acked"]

    for step in range(10, 10 + CONFIG.service.measure_after_steps):
        publish(client, run_id, Stream.METRICS, step_metrics(run_id, step, grad=2.0, lr=5e-4))
    drive(tuner, 2)
    records = read(client, run_id, Stream.ACTIONS, ActionRecord)
    assert [r.stage for r in records] == ["issued", "acked", "measured"]
    measured = records[-1]
    assert measured.ack is not None and measured.ack.status == "applied"
    assert measured.effect.metric == "grad_norm" and measured.effect.recovered
    assert measured.effect.before == 500.0 and measured.effect.after == 2.0
    assert measured.effect.steps == CONFIG.service.measure_after_steps
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1  # cooldown holds
    assert client.hlen(tuner_key(run_id, "pending-actions")) == 0


def test_rejected_command_is_acked_not_measured(client: redis.Redis, run_id: str) -> None:
    explode(client, run_id, range(5))
    tuner = service(client, run_id)
    drive(tuner)
    command = read(client, run_id, Stream.COMMANDS, Command)[0]
    publish(client, run_id, Stream.ACKS, Ack(run_id=run_id, command_id=command.command_id,
                                             action="set_lr", status="rejected", step=4,
                                             detail="out of bounds"))
    for step in range(5, 20):
        publish(client, run_id, Stream.METRICS, step_metrics(run_id, step, grad=2.0))
    drive(tuner, 2)
    assert [r.stage for r in read(client, run_id, Stream.ACTIONS, ActionRecord)] == [
        "issued", "acked"]


def test_runs_are_discovered_from_the_runs_set(client: redis.Redis, run_id: str) -> None:
    client.sadd(RUNS_KEY, run_id)
    explode(client, run_id, range(5))
    tuner = service(client, run_id, discover=True)
    drive(tuner)
    assert run_id in tuner.windows
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the service catches it."""


def kill_after_first_command(tuner: TunerService) -> None:
    """Make ``tuner`` die right after it publishes, before it acks what it read."""
    handle = tuner._handle

    def dying(run_id: str, message: Message) -> None:
        handle(run_id, message)
        if tuner.commands_issued:
            raise Killed

    tuner._handle = dying  # type: ignore[method-assign]


@pytest.mark.parametrize("memory_lost", [False, True])
def test_restart_does_not_repeat_a_command(client: redis.Redis, run_id: str,
                                           memory_lost: bool) -> None:
    explode(client, run_id, range(10))
    first = service(client, run_id)
    kill_after_first_command(first)
    with pytest.raises(Killed):
        first.run_once(block_ms=10)
    group = f"tuner-{run_id}"
    metrics_key = stream_key(run_id, Stream.METRICS)
    assert client.xpending(metrics_key, group)["pending"] == 10  # nothing was acked
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1
    if memory_lost:
        # Only the idempotency keys are left: the same trigger step must still be caught.
        client.delete(tuner_key(run_id, MEMORY_KEY))

    second = service(client, run_id)
    drive(second)
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1
    assert [r.stage for r in read(client, run_id, Stream.ACTIONS, ActionRecord)] == ["issued"]
    assert len([e for e in read(client, run_id, Stream.EVENTS, Event)
                if e.event == "red_flag"]) == 1
    assert second.commands_issued == 0
    assert second.duplicates_suppressed == (2 if memory_lost else 0)
    assert client.xpending(metrics_key, group)["pending"] == 0
    # The restarted tuner still completes the audit trail of its predecessor's command.
    command = read(client, run_id, Stream.COMMANDS, Command)[0]
    publish(client, run_id, Stream.ACKS, Ack(run_id=run_id, command_id=command.command_id,
                                             action="set_lr", status="applied", step=9))
    drive(second, 1)
    assert [r.stage for r in read(client, run_id, Stream.ACTIONS, ActionRecord)] == [
        "issued", "acked"]


def test_standby_claims_what_a_dead_tuner_left(client: redis.Redis, run_id: str) -> None:
    explode(client, run_id, range(10))
    first = service(client, run_id)
    kill_after_first_command(first)
    with pytest.raises(Killed):
        first.run_once(block_ms=10)
    eager = CONFIG.model_copy(update={
        "service": CONFIG.service.model_copy(update={"claim_idle_ms": 1})})
    time.sleep(0.01)
    standby = service(client, run_id, consumer="tuner-2", config=eager)
    drive(standby)
    assert client.xpending(stream_key(run_id, Stream.METRICS), f"tuner-{run_id}")[
        "pending"] == 0
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1


def test_malformed_entries_are_dead_lettered_and_the_service_goes_on(
        client: redis.Redis, run_id: str) -> None:
    key = stream_key(run_id, Stream.METRICS)
    client.xadd(key, {"data": "{not json"})
    client.xadd(key, {"payload": "no data field"})
    client.xadd(key, {"data": '{"v": 1, "kind": "metrics", "run_id": "' + run_id + '"}'})
    wrong_run = step_metrics("someone-else", 0, grad=500.0)
    client.xadd(key, encode(wrong_run))
    explode(client, run_id, range(5))
    tuner = service(client, run_id)
    drive(tuner)
    dead = [fields for _, fields in client.xrange(DEAD_LETTER_STREAM)
            if fields[b"stream"] == key.encode()]
    assert len(dead) == 4
    assert any(b"handler error" in fields[b"reason"] for fields in dead)
    assert tuner.dead_lettered == 4
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1
    assert client.xpending(key, f"tuner-{run_id}")["pending"] == 0


def test_old_history_updates_the_window_but_triggers_nothing(client: redis.Redis,
                                                             run_id: str) -> None:
    for step in range(10):
        message = step_metrics(run_id, step, grad=500.0).model_copy(update={"ts": 1.0})
        publish(client, run_id, Stream.METRICS, message)
    tuner = service(client, run_id)
    drive(tuner)
    assert tuner.windows[run_id].step == 9
    assert read(client, run_id, Stream.COMMANDS, Command) == []


def test_non_finite_steps_skip_the_failed_batches_first(client: redis.Redis,
                                                         run_id: str) -> None:
    for step in range(5):
        finite = step < 2
        message = step_metrics(run_id, step, grad=2.0 if finite else float("nan")).model_copy(
            update={"finite": finite})
        publish(client, run_id, Stream.METRICS, message)
    drive(service(client, run_id))
    commands = read(client, run_id, Stream.COMMANDS, Command)
    assert [(c.action, c.value) for c in commands] == [("skip_failed_batches", 50.0)]
    records = read(client, run_id, Stream.ACTIONS, ActionRecord)
    assert [(r.command.action, r.trigger.rule) for r in records] == [
        ("skip_failed_batches", "bad_batches")]


def test_non_finite_steps_roll_back_then_lower_lr(client: redis.Redis, run_id: str) -> None:
    """With the skip switched off (``skip_lookback = 0``), as the rule was before it."""
    for step in range(5):
        finite = step < 2
        message = step_metrics(run_id, step, grad=2.0 if finite else float("nan")).model_copy(
            update={"finite": finite})
        publish(client, run_id, Stream.METRICS, message)
    no_skip = CONFIG.model_copy(update={"non_finite": CONFIG.non_finite.model_copy(
        update={"skip_lookback": 0})})
    drive(service(client, run_id, config=no_skip))
    commands = read(client, run_id, Stream.COMMANDS, Command)
    assert [(c.action, c.value) for c in commands] == [("rollback", None), ("set_lr", 5e-4)]
    assert len({c.command_id for c in commands}) == 2
    records = read(client, run_id, Stream.ACTIONS, ActionRecord)
    assert [r.command.action for r in records] == ["rollback", "set_lr"]


def test_consecutive_restarts_stop_the_run(client: redis.Redis, run_id: str) -> None:
    publish(client, run_id, Stream.EVENTS, Event(run_id=run_id, event="restart",
                                                 data={"consecutive": 4}))
    tuner = service(client, run_id)
    drive(tuner)
    assert [c.action for c in read(client, run_id, Stream.COMMANDS, Command)] == ["stop"]
    critical = [e for e in read(client, run_id, Stream.EVENTS, Event)
                if e.event == "red_flag" and e.data.get("rule") == "restarts"]
    assert len(critical) == 1 and critical[0].severity == "critical"


def test_main_reports_a_bad_config_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "SMART_TUNER_REDIS_URL": "redis://127.0.0.1:1/0",
           "SMART_TUNER_TUNER_CONFIG": str(tmp_path / "missing.toml")}
    result = subprocess.run([sys.executable, "-m", "services.tuner.service"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "missing.toml" in result.stderr and "not found" in result.stderr


def test_restart_handles_every_page_of_its_pending_entries(client: redis.Redis,
                                                           run_id: str) -> None:
    """More entries left pending than one poll's worth: a restarted tuner handles them all."""
    from services.core.bus import Consumer

    explode(client, run_id, range(10))
    small_pages = CONFIG.model_copy(update={
        "service": CONFIG.service.model_copy(update={"poll_count": 3})})
    key = stream_key(run_id, Stream.METRICS)
    died = Consumer(client, {key: Stream.METRICS}, f"tuner-{run_id}", "tuner-1")
    assert len(died.poll(None, 10)) == 10  # read by a tuner killed before it acked
    tuner = service(client, run_id, config=small_pages)
    handled = [tuner.run_once(block_ms=10) for _ in range(5)]
    assert handled[:4] == [3, 3, 3, 1]  # then its own red flag, in the events stream
    assert client.xpending(key, f"tuner-{run_id}")["pending"] == 0
    assert tuner.windows[run_id].step == 9
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1
