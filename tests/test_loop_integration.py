"""The closed loop end to end: a real trainer, Redis, Celery worker and tuner.

A grad-norm red flag is injected into a short real training run (the loss is multiplied
for a few steps, so the pre-clip norm exceeds 100). The tuner must see it in the metrics
stream, command a lower learning rate, the trainer must apply and ack it between steps,
and the actions stream must show the whole trail with the measured effect. Meanwhile every
attention snapshot gets exactly one alignment report from the worker, and a malformed
message on the way is dead-lettered without stopping anyone.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import redis

from services.core.bus import connect
from services.core.indicators import GRAD_NORM_RED_FLAG
from services.core.schemas import (
    Ack,
    ActionRecord,
    AlignmentReport,
    AttentionSnapshot,
    Command,
    Event,
    MessageError,
    MetricsMessage,
    decode,
)
from services.core.streams import DEAD_LETTER_STREAM, Stream, stream_key
from services.launcher.celery_worker import start_worker
from services.trainer.faults import FaultPlan
from services.trainer.link import attach
from services.trainer.training import Trainer
from services.tuner.config import TunerConfig
from services.tuner.service import TunerService

pytestmark = pytest.mark.slow

SPIKE_START, SPIKE_STEPS, STEPS = 4, 4, 18
# The real rules with windows sized for an 18-step run; alignment rules wait past its end.
CONFIG = TunerConfig.model_validate({
    "warmup_steps": 1000,
    "grad_norm": {"window": 4, "min_above": 2, "cooldown_steps": 50, "recover_window": 4,
                  "recover_below": 50.0},
    "service": {"metrics_window": 60, "measure_after_steps": 4},
})


def _read(client: redis.Redis, run_id: str, stream: Stream, schema):
    """The stream's valid messages (the test itself plants one malformed entry)."""
    messages = []
    for _, fields in client.xrange(stream_key(run_id, stream)):
        with contextlib.suppress(MessageError):
            messages.append(decode(fields, schema))
    return messages


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


@pytest.fixture
def worker(redis_url, tmp_path, monkeypatch):
    with start_worker(redis_url, tmp_path / "worker", concurrency=1) as handle:
        # the trainer enqueues on the worker's queue
        monkeypatch.setenv("SMART_TUNER_DIAGNOSTICS_QUEUE", handle.app.conf.task_default_queue)
        yield handle


def test_red_flag_to_corrective_command_and_measured_effect(
        small_corpus, small_config, tmp_path, redis_url, run_id, worker):
    client = connect(redis_url)
    small_config.run.eval_every = 5
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", progress=False,
                      cache_dir=small_corpus / ".features", run_id=run_id,
                      fault=FaultPlan(kind="grad_spike", start=SPIKE_START, steps=SPIKE_STEPS,
                                      factor=1e4))
    link = attach(trainer, redis_url)
    tuner = TunerService(connect(redis_url), CONFIG, group=f"tuner-{run_id}", runs=[run_id])
    stop = threading.Event()
    loop = threading.Thread(target=tuner.run_forever, args=(stop, 100), daemon=True)
    loop.start()
    # a malformed message in the middle of the run must not hurt anyone
    client.xadd(stream_key(run_id, Stream.METRICS), {"data": '{"v": 1, "kind": "metrics"}'})
    try:
        trainer.train(max_steps=STEPS)
        assert link.close()
        _wait_for(lambda: any(r.stage == "measured" for r in
                              _read(client, run_id, Stream.ACTIONS, ActionRecord)))
    finally:
        stop.set()
        loop.join(10)

    metrics = _read(client, run_id, Stream.METRICS, MetricsMessage)
    assert [m.step for m in metrics] == list(range(STEPS))
    spiked = [m.step for m in metrics if m.grad_norm > GRAD_NORM_RED_FLAG]
    assert spiked == list(range(SPIKE_START, SPIKE_START + SPIKE_STEPS))

    # the tuner commanded a lower LR because of the red flag, with the trigger on record
    commands = [c for c in _read(client, run_id, Stream.COMMANDS, Command)
                if c.source == "tuner"]
    set_lr = [c for c in commands if c.action == "set_lr"]
    assert len(set_lr) == 1, commands
    command = set_lr[0]
    assert command.reason.rule == "grad_norm" and command.reason.value > GRAD_NORM_RED_FLAG
    assert command.reason.threshold == GRAD_NORM_RED_FLAG

    # the trainer applied it between steps, while the spike was still on, and acked it once
    acks = [a for a in _read(client, run_id, Stream.ACKS, Ack)
            if a.command_id == command.command_id]
    assert len(acks) == 1 and acks[0].status == "applied"
    assert acks[0].after == pytest.approx(acks[0].before * CONFIG.grad_norm.lr_factor)
    assert SPIKE_START < acks[0].step <= SPIKE_START + SPIKE_STEPS
    applied_at = acks[0].step
    assert all(m.lr == pytest.approx(command.value) for m in metrics if m.step >= applied_at)
    assert any(o["kind"] == "set_lr" and o["source"].startswith("tuner")
               for o in trainer.overrides)

    # the audit trail: issued -> acked -> measured, with the effect
    trail = [r for r in _read(client, run_id, Stream.ACTIONS, ActionRecord)
             if r.command.command_id == command.command_id]
    assert [r.stage for r in trail] == ["issued", "acked", "measured"]
    effect = trail[-1].effect
    assert effect.metric == "grad_norm" and effect.before > GRAD_NORM_RED_FLAG
    assert effect.recovered and effect.after < GRAD_NORM_RED_FLAG

    events = _read(client, run_id, Stream.EVENTS, Event)
    kinds = [e.event for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "finished"
    assert any(e.event == "red_flag" and e.severity == "critical" for e in events)

    # every snapshot was scored exactly once by the worker
    snapshots = _read(client, run_id, Stream.ATTENTION, AttentionSnapshot)
    assert len(snapshots) >= 3
    _wait_for(lambda: len(_read(client, run_id, Stream.DIAGNOSTICS, AlignmentReport))
              >= len(snapshots))
    time.sleep(1.0)  # a duplicate, if any, would arrive now
    reports = _read(client, run_id, Stream.DIAGNOSTICS, AlignmentReport)
    assert sorted(r.snapshot_id for r in reports) == sorted(s.snapshot_id for s in snapshots)

    # and the malformed message went to the dead-letter stream with its reason
    dead = [f for _, f in client.xrevrange(DEAD_LETTER_STREAM, count=200)
            if f[b"stream"].decode() == stream_key(run_id, Stream.METRICS)]
    assert len(dead) == 1 and b"invalid MetricsMessage" in dead[0][b"reason"]
