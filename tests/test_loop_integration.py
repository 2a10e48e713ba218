"""The closed loop end to end: a real trainer, Redis, Celery worker and tuner.

A grad-norm red flag is injected into a short real training run (the loss is multiplied
for a few steps, so the pre-clip norm exceeds 100). The tuner must see it in the metrics
stream, command a lower learning rate, the trainer must apply and ack it between steps,
and the actions stream must show the whole trail with the measured effect. Meanwhile every
attention snapshot gets exactly one alignment report from the worker, and a malformed
message on the way is dead-lettered without stopping anyone. The notifier watches the same
run and must tell Telegram (a local stand-in of its Bot API) what the tuner really did.
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
from services.trainer.faults import FaultPlan
from services.trainer.link import attach
from services.trainer.training import Trainer
from services.tuner.config import TunerConfig
from services.tuner.service import TunerService
from tests.celery_worker import start_worker
from tests.notifier_harness import RunningNotifier, notifier_settings
from tests.telegram_stand_in import TelegramStandIn

pytestmark = pytest.mark.slow

SPIKE_START, SPIKE_STEPS, STEPS = 4, 4, 18
CHAT = 1001
REPORT_EVERY_STEPS = 6
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
        small_corpus, small_config, tmp_path, redis_url, run_id, worker,
        telegram: TelegramStandIn):
    client = connect(redis_url)
    notifier = RunningNotifier(notifier_settings(
        telegram, tmp_path, chat_ids=(CHAT,), language="en",
        report_every_steps=REPORT_EVERY_STEPS), redis_url, telegram).start()
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
        _check_telegram_reports(telegram, run_id)
    finally:
        stop.set()
        loop.join(10)
        notifier.close()

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
    # (once per consumer group that read it: the tuner's and the notifier's)
    assert sorted(f[b"group"].decode() for f in dead) == sorted([f"tuner-{run_id}", "notifier"])
    assert all(b"invalid MetricsMessage" in f[b"reason"] for f in dead)


def _check_telegram_reports(telegram: TelegramStandIn, run_id: str) -> None:
    """What the notifier told the chat about the run just trained (see the module doc)."""
    def texts() -> list[str]:
        return [str(c.params.get("text", "")) for c in telegram.calls("sendMessage", CHAT)
                if c.status == 200]

    def has(*needles: str) -> bool:
        return any(all(n in t for n in needles) for t in texts())

    # each stage of the tuner's decision, with its trigger, the change and the ack
    telegram.wait_for(lambda _: has("Tuner action", "trainer answered", "set_lr",
                                    "Trainer ack: applied", "e-04"), 60)
    telegram.wait_for(lambda _: has("Tuner action", "effect measured", "recovered"), 60)
    # the red flag, as critical
    telegram.wait_for(lambda _: has("🚨", "RED FLAG", run_id), 60)
    # a periodic progress report whose actions section lists the real decision
    # (an early one may show it still awaiting its ack; a later one must show the ack)
    telegram.wait_for(lambda _: has("Detailed report", "Actions taken",
                                    "grad_norm: grad_norm", "→ set_lr", "ack: applied"), 60)
    report = [t for t in texts() if "Detailed report" in t and "ack: applied" in t][-1]
    actions = report.split("Actions taken", 1)[1]
    assert "set_lr" in actions and "No actions taken" not in actions
    # and the run's lifecycle
    telegram.wait_for(lambda _: has("Training started", run_id) and
                      has("Training finished", run_id), 60)
