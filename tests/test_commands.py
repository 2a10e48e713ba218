"""The trainer obeys commands from its stream: checked, applied between steps, acked once."""

from __future__ import annotations

import time

import pytest

from services.core.bus import Publisher, connect
from services.core.schemas import Ack, Command, decode, encode
from services.core.streams import Stream, stream_key
from services.trainer.commands import CommandHandler
from services.trainer.faults import FaultInjector, FaultPlan
from services.trainer.training import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture
def rig(small_corpus, small_config, tmp_path, redis_url, run_id):
    """A small trainer wired to a real Redis commands stream."""
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", cache_dir=small_corpus /
                      ".features", progress=False, run_id=run_id)
    client = connect(redis_url)
    publisher = Publisher(client, run_id)
    handler = CommandHandler(client, run_id, publisher)
    trainer.controllers.append(handler)
    yield trainer, handler, client, publisher
    handler.close()
    publisher.close()


def _send(client, run_id, **fields) -> Command:
    command = Command(run_id=fields.pop("target", run_id), source="test", **fields)
    client.xadd(stream_key(run_id, Stream.COMMANDS), encode(command))
    return command


def _handle(handler, trainer) -> None:
    """Let the reader thread fetch everything sent so far, then apply it."""
    assert handler.sync()
    handler.before_step(trainer)


def _acks(client, run_id, publisher) -> dict[str, Ack]:
    assert publisher.flush(5)
    entries = client.xrange(stream_key(run_id, Stream.ACKS))
    return {a.command_id: a for a in (decode(f, Ack) for _, f in entries)}


def test_value_commands_are_applied_with_before_and_after(rig, run_id):
    trainer, handler, client, publisher = rig
    lr = _send(client, run_id, action="set_lr", value=2e-4)
    ga = _send(client, run_id, action="set_guided_attention_weight", value=3.0)
    clip = _send(client, run_id, action="set_grad_clip", value=5.0)
    _handle(handler, trainer)
    metrics = trainer.train_step(next(trainer._batches()))
    assert metrics.lr == pytest.approx(2e-4)
    assert metrics.guided_attention_weight == pytest.approx(3.0)
    assert metrics.clip_threshold == 5.0
    acks = _acks(client, run_id, publisher)
    assert acks[lr.command_id].status == "applied"
    # warm-up of 2 steps to 1e-3: step 0 runs at 1e-3 * 1/3 until the command
    assert acks[lr.command_id].before == pytest.approx(1e-3 / 3)
    assert acks[lr.command_id].after == pytest.approx(2e-4)
    assert (acks[ga.command_id].before, acks[ga.command_id].after) == (1.0, 3.0)
    assert (acks[clip.command_id].before, acks[clip.command_id].after) == (1.0, 5.0)
    assert [o["source"] for o in trainer.overrides] == ["test"] * 3


def test_the_gate_weight_knob_changes_the_loss_and_survives_a_rollback(rig, run_id):
    trainer, handler, client, publisher = rig
    too_heavy = _send(client, run_id, action="set_gate_positive_weight", value=500.0)
    gate = _send(client, run_id, action="set_gate_positive_weight", value=20.0)
    _handle(handler, trainer)
    acks = _acks(client, run_id, publisher)
    assert acks[too_heavy.command_id].status == "rejected"
    assert "outside" in acks[too_heavy.command_id].detail
    assert acks[gate.command_id].status == "applied"
    assert (acks[gate.command_id].before, acks[gate.command_id].after) == (5.0, 20.0)
    batch = next(trainer._batches())
    assert trainer.train_step(batch).gate_positive_weight == 20.0
    # The weight reaches the loss: the same batch's gate term is heavier than at 5.
    trainer.model.eval()
    heavy = trainer.engine.forward(batch, trainer.step)[1].gate
    trainer.gate_positive_weight = 5.0
    light = trainer.engine.forward(batch, trainer.step)[1].gate
    assert heavy.item() > light.item()
    trainer.gate_positive_weight = 20.0
    trainer.save_checkpoint()
    trainer.rollback("test")  # a rollback keeps the run-time settings
    assert trainer.gate_positive_weight == 20.0
    assert [o["kind"] for o in trainer.overrides] == ["set_gate_positive_weight", "rollback"]


def test_bad_commands_are_rejected_with_reasons_and_change_nothing(rig, run_id):
    trainer, handler, client, publisher = rig
    too_high = _send(client, run_id, action="set_lr", value=0.5)
    foreign = _send(client, run_id, action="set_lr", value=1e-4, target="someone-else")
    expired = _send(client, run_id, action="set_lr", value=1e-4, expires_at=time.time() - 5)
    no_checkpoint = _send(client, run_id, action="rollback")
    not_paused = _send(client, run_id, action="resume")
    lr_before = trainer.lr.value(trainer.step)
    _handle(handler, trainer)
    acks = _acks(client, run_id, publisher)
    assert acks[too_high.command_id].status == "rejected"
    assert "0.5" in acks[too_high.command_id].detail or "lr" in acks[too_high.command_id].detail
    assert acks[foreign.command_id].status == "rejected"
    assert "someone-else" in acks[foreign.command_id].detail
    assert acks[expired.command_id].status == "expired"
    assert acks[no_checkpoint.command_id].status == "rejected"
    assert "no healthy checkpoint" in acks[no_checkpoint.command_id].detail
    assert acks[not_paused.command_id].status == "rejected"
    assert trainer.lr.value(trainer.step) == lr_before and trainer.overrides == []


def test_each_command_is_acked_exactly_once(rig, run_id):
    trainer, handler, client, publisher = rig
    command = _send(client, run_id, action="set_grad_clip", value=2.0)
    _handle(handler, trainer)
    client.xadd(stream_key(run_id, Stream.COMMANDS), encode(command))  # sent again
    _handle(handler, trainer)
    _handle(handler, trainer)
    assert publisher.flush(5)
    statuses = [decode(f, Ack).status for _, f in
                client.xrange(stream_key(run_id, Stream.ACKS))]
    assert statuses == ["applied", "duplicate"]
    assert [o["kind"] for o in trainer.overrides] == ["set_grad_clip"]


def test_pause_resume_and_stop_drive_the_loop(rig, run_id, redis_url):
    trainer, handler, client, publisher = rig
    _send(client, run_id, action="pause")
    assert handler.sync()

    def resume_later() -> None:
        time.sleep(0.6)
        other = connect(redis_url)
        _send(other, run_id, action="resume")

    import threading

    thread = threading.Thread(target=resume_later)
    thread.start()
    started = time.monotonic()
    trainer._control()  # blocks while paused, polling the stream
    thread.join()
    assert time.monotonic() - started >= 0.5 and not trainer.paused
    _send(client, run_id, action="checkpoint_now")
    _send(client, run_id, action="stop")
    assert handler.sync()
    summary = trainer.train(max_steps=50)
    assert summary["stop_reason"] == "stop_requested" and summary["step"] == 0
    statuses = [(a.action, a.status) for a in _acks(client, run_id, publisher).values()]
    assert statuses == [("pause", "applied"), ("resume", "applied"),
                        ("checkpoint_now", "applied"), ("stop", "applied")]


def test_rollback_command_restores_the_last_good_checkpoint(rig, run_id):
    trainer, handler, client, publisher = rig
    trainer.train(max_steps=5)  # a healthy checkpoint at step 5
    trainer._stop_requested = False
    batches = trainer._batches()
    for _ in range(3):
        trainer.train_step(next(batches))
    command = _send(client, run_id, action="rollback")
    _handle(handler, trainer)
    ack = _acks(client, run_id, publisher)[command.command_id]
    assert ack.status == "applied" and (ack.before, ack.after) == (8.0, 5.0)
    assert trainer.step == 5


def test_redis_outage_never_stops_training(small_corpus, small_config, tmp_path, run_id):
    from services.launcher.redis_server import RedisProcess

    server = RedisProcess(tmp_path).start()
    client = connect(server.url, timeout_s=0.3)
    publisher = Publisher(client, run_id)
    handler = CommandHandler(client, run_id, publisher)
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", cache_dir=small_corpus /
                      ".features", progress=False, run_id=run_id, controllers=[handler])
    server.stop()
    summary = trainer.train(max_steps=4)
    assert summary["step"] == 4
    # the training thread never touches Redis: a poll costs at most its short wait
    started = time.monotonic()
    handler.before_step(trainer)
    assert time.monotonic() - started <= handler.wait_s(trainer) + 0.05
    handler.close()
    publisher.close(0.5)


def test_skip_failed_batches_is_acked_with_what_it_left_out(rig, run_id):
    trainer, handler, client, publisher = rig
    nothing = _send(client, run_id, action="skip_failed_batches", value=50.0)
    _handle(handler, trainer)
    trainer.engine.fault = FaultInjector(FaultPlan.parse(f"nan_loss:start={trainer.step}"))
    failed = next(trainer._batches())
    trainer.train_step(failed)
    skip = _send(client, run_id, action="skip_failed_batches", value=50.0)
    _handle(handler, trainer)
    acks = _acks(client, run_id, publisher)
    assert acks[nothing.command_id].status == "rejected"
    assert "nothing skipped" in acks[nothing.command_id].detail
    applied = acks[skip.command_id]
    # 10 training utterances, at most 10 % left out: one, and the ack says the cap held
    assert applied.status == "applied" and (applied.before, applied.after) == (0.0, 1.0)
    assert len(trainer.feed.excluded) == 1 and trainer.feed.excluded <= set(failed.ids)
    assert "skipping 1 utterances" in applied.detail and "non-finite" in applied.detail
    assert "cap" in applied.detail
