"""The spike guard (issue 12): a step whose pre-clip grad norm is a spike for this run is not
applied, is counted, stays out of the grad norm indicator, and the factor is a run-time
setting every sender (tuner, API, bot) sets through the same bounded, acked command."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from services.core import bounds, indicators
from services.core.bounds import check_command, check_value
from services.core.bus import Publisher, connect
from services.core.schemas import VALUE_ACTIONS, Ack, Command, MetricsMessage, decode, encode
from services.core.streams import RUNS_KEY, Stream, stream_key
from services.notifier import bot
from services.notifier.reports import MESSAGES, help_text, progress_report
from services.trainer.commands import CommandHandler
from services.trainer.config import OptimConfig, TrainConfig
from services.trainer.engine import EvalResult
from services.trainer.faults import FaultPlan
from services.trainer.gradients import SPIKE_GUARD_HISTORY, SPIKE_GUARD_MIN_HISTORY, SpikeGuard
from services.trainer.lockstep import SetterCall, replay
from services.trainer.training import METRICS_FILE, Trainer
from services.trainer.verdicts import training_checks

GUARD = 10.0
SPIKE = FaultPlan(kind="grad_spike", start=30, steps=1, every=25, factor=1000.0)


def _trainer(cfg: TrainConfig, corpus: Path, run_dir: Path, **kwargs: Any) -> Trainer:
    return Trainer(cfg, corpus, run_dir, cache_dir=corpus / ".features", progress=False,
                   **kwargs)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights and buffers (BatchNorm running statistics included)."""
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ---------------------------------------------------------------------- the guard alone


def test_the_guard_judges_against_the_recent_median() -> None:
    guard = SpikeGuard(GUARD)
    for _ in range(SPIKE_GUARD_MIN_HISTORY - 1):
        assert guard.admit(1.0)
    assert guard.admit(1000.0)  # too little history: nothing is a spike yet
    guard = SpikeGuard(GUARD)
    for _ in range(SPIKE_GUARD_MIN_HISTORY):
        guard.admit(1.0)
    assert guard.admit(9.9) and not guard.admit(10.1) and not guard.admit(1000.0)
    assert len(guard.history) == SPIKE_GUARD_MIN_HISTORY + 3  # withheld norms count too
    # a lasting change of level becomes the new normal instead of blocking every step
    admitted = [guard.admit(100.0) for _ in range(SPIKE_GUARD_HISTORY)]
    assert not admitted[0] and admitted[-1]


def test_off_admits_everything_yet_keeps_history() -> None:
    guard = SpikeGuard(bounds.SPIKE_GUARD_OFF)
    assert not guard.enabled
    assert all(guard.admit(n) for n in [1.0] * 20 + [1e6])
    guard.set_factor(GUARD)  # switched on mid-run: it judges at once
    assert not guard.admit(1e6)
    restored = SpikeGuard(0.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.factor == GUARD and list(restored.history) == list(guard.history)


@pytest.mark.parametrize("value", [-1.0, 0.5, 2.999, bounds.SPIKE_GUARD_MAX + 1, math.nan])
def test_values_between_off_and_the_bounds_are_refused_everywhere(value: float) -> None:
    with pytest.raises(ValueError, match="set_spike_guard"):
        SpikeGuard(value)
    with pytest.raises(ValueError, match="spike_guard"):
        OptimConfig(spike_guard=value)
    assert check_value("set_spike_guard", value) is not None


def test_bounds_are_one_interval_and_off() -> None:
    assert "set_spike_guard" in VALUE_ACTIONS and "set_spike_guard" in bounds.VALUE_BOUNDS
    for value in (0.0, bounds.SPIKE_GUARD_MIN, GUARD, bounds.SPIKE_GUARD_MAX):
        assert check_command(Command(run_id="r", action="set_spike_guard", value=value,
                                     source="test")) is None
    assert check_value("set_spike_guard", 2.0) == \
        "set_spike_guard value 2 is outside [3, 1000] or 0 (off)"
    # the other bounds say what they said
    assert check_value("set_lr", 1.0) == "set_lr value 1 is outside [1e-06, 0.01]"


# ---------------------------------------------------------------------- the verdict's words


def _eval(**fields: Any) -> EvalResult:
    scores = {"diagonality": 0.5, "quality": 50.0}
    return EvalResult(step=50, losses={"objective": 1.0}, scores=scores,
                      attention=None, input_lengths=None, decoder_lengths=None,  # type: ignore[arg-type]
                      **fields)


def test_indicator_words_are_unchanged_while_the_guard_is_off() -> None:
    [grad] = [c for c in training_checks(_eval(window_grad_norm=2.0, window_steps=25), 0)
              if c.name == indicators.GRAD_NORM]
    assert grad.measured == "largest pre-clip grad norm of the last 25 finite steps to step 50"
    [grad] = [c for c in training_checks(_eval(window_grad_norm=2.0, window_steps=24,
                                                spike_guard=GUARD, window_guarded=1), 0)
              if c.name == indicators.GRAD_NORM]
    assert grad.measured == ("largest pre-clip grad norm of the last 24 applied steps to step "
                             "50; 1 step withheld by the spike guard not counted")
    assert grad.met


# ---------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_a_guarded_step_is_withheld_counted_and_left_out(small_corpus: Path,
                                                         small_config: TrainConfig,
                                                         tmp_path: Path) -> None:
    small_config.run.eval_every = 25
    trainer = _trainer(small_config, small_corpus, tmp_path / "run", fault=SPIKE)
    assert trainer.set_spike_guard(GUARD, "test") == (0.0, GUARD)
    batches = trainer._batches()
    while trainer.step < SPIKE.start:
        assert not trainer.train_step(next(batches)).guarded
    before = _state(trainer)
    spiked = trainer.train_step(next(batches))
    assert spiked.guarded and spiked.finite and spiked.grad_norm > 100
    assert (spiked.guarded_steps, spiked.skipped_steps, spiked.spike_guard) == (1, 0, GUARD)
    after = _state(trainer)
    for name in before:  # no update, and BatchNorm's running statistics put back
        torch.testing.assert_close(before[name], after[name], rtol=0, atol=0, msg=name)
    # training goes on: the next step is applied
    healthy = trainer.train_step(next(batches))
    assert not healthy.guarded and healthy.guarded_steps == 1
    assert any(not torch.equal(after[k], v) for k, v in _state(trainer).items())
    # the spike is in neither the indicator's window nor the health rule
    assert spiked.grad_norm not in trainer.recent_norms
    result = trainer.evaluate()
    assert result.window_grad_norm < spiked.grad_norm and result.window_guarded == 1
    [grad] = [c for c in trainer.verdict().indicators if c.name == indicators.GRAD_NORM]
    assert "applied steps" in grad.measured and "1 step withheld" in grad.measured
    assert trainer.save_checkpoint().healthy
    # the metrics message carries it, and old readers' fields are unchanged
    message = MetricsMessage(run_id="r", **spiked.__dict__)
    assert (message.guarded, message.guarded_steps, message.spike_guard) == (True, 1, GUARD)


@pytest.mark.slow
def test_the_setting_survives_resume_and_rollback(small_corpus: Path,
                                                  small_config: TrainConfig,
                                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = _trainer(small_config, small_corpus, run)
    batches = trainer._batches()
    for _ in range(3):
        trainer.train_step(next(batches))
    trainer.save_checkpoint()  # guard off in this one
    trainer.set_spike_guard(GUARD, "test")
    trainer.guarded_steps = 2
    trainer.train_step(next(batches))
    assert trainer.rollback("test") is not None
    assert trainer.engine.spike_guard.factor == GUARD  # a rollback keeps the settings
    assert trainer.guarded_steps == 2  # ... and the history
    assert [o["kind"] for o in trainer.overrides] == ["set_spike_guard", "rollback"]
    trainer.save_checkpoint()
    history = list(trainer.engine.spike_guard.history)
    resumed = _trainer(small_config, small_corpus, run, resume=True)
    assert resumed.engine.spike_guard.factor == GUARD
    assert list(resumed.engine.spike_guard.history) == history
    assert resumed.guarded_steps == 2
    # the other ranks of a distributed run replay rank 0's setter call
    replay(resumed, SetterCall("set_spike_guard", 0.0, "test"))
    assert not resumed.engine.spike_guard.enabled


@pytest.mark.slow
def test_commands_are_acked_with_before_and_after_and_bounded(
        small_corpus: Path, small_config: TrainConfig, tmp_path: Path, redis_url: str,
        run_id: str) -> None:
    trainer = _trainer(small_config, small_corpus, tmp_path / "run", run_id=run_id)
    client = connect(redis_url)
    publisher = Publisher(client, run_id)
    handler = CommandHandler(client, run_id, publisher)
    try:
        sent = [Command(run_id=run_id, source="test", action="set_spike_guard", value=value)
                for value in (GUARD, 2.0, 0.0)]
        for command in sent:
            client.xadd(stream_key(run_id, Stream.COMMANDS), encode(command))
        assert handler.sync()
        handler.before_step(trainer)
        assert publisher.flush(5)
        acks = {a.command_id: a for a in (decode(f, Ack) for _, f in
                                          client.xrange(stream_key(run_id, Stream.ACKS)))}
        on, refused, off = (acks[c.command_id] for c in sent)
        assert (on.status, on.before, on.after) == ("applied", 0.0, GUARD)
        assert refused.status == "rejected" and "outside [3, 1000] or 0 (off)" in refused.detail
        assert (off.status, off.before, off.after) == ("applied", GUARD, 0.0)
        assert off.detail == "spike guard switched off"
        assert not trainer.engine.spike_guard.enabled
    finally:
        handler.close()
        publisher.close()


@pytest.mark.slow
def test_a_periodic_spike_run_meets_the_grad_norm_indicator_with_the_guard(
        small_corpus: Path, small_config: TrainConfig, tmp_path: Path) -> None:
    """The rescue recipe in small: one 1000x step in every 25, evaluated every 25."""
    small_config.run.eval_every = small_config.run.checkpoint_every = 25
    steps = 80
    summaries = {}
    for guard in (0.0, GUARD):
        small_config.optim.spike_guard = guard
        run = tmp_path / f"guard-{guard:g}"
        summaries[guard] = _trainer(small_config, small_corpus, run, fault=SPIKE).train(
            max_steps=steps)
        records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
        guarded = [r["step"] for r in records if r["kind"] == "step" and r["guarded"]]
        assert guarded == ([] if not guard else [s for s in range(steps) if SPIKE.active(s)])
    off, on = (next(i for i in summaries[g]["indicators"] if i["name"] == indicators.GRAD_NORM)
               for g in (0.0, GUARD))
    assert not off["met"] and off["value"] > 100  # every window holds a spike
    spikes = sum(1 for s in range(steps) if SPIKE.active(s))  # steps 30 and 55
    assert summaries[GUARD]["guarded_steps"] == spikes and summaries[0.0]["guarded_steps"] == 0
    assert on["met"] and on["value"] < indicators.GRAD_NORM_OK, on
    assert "withheld by the spike guard" in on["measured"]


# ---------------------------------------------------------------------- API and bot


@pytest.mark.slow
def test_the_api_checks_the_bounds_before_writing(redis_url: str, run_id: str) -> None:
    import httpx
    import redis

    from services.tuner.api import create_app
    from tests.test_api import AUTH, TOKEN, register, serve

    store = redis.Redis.from_url(redis_url)
    register(store, run_id)
    app_client = redis.Redis.from_url(redis_url)
    try:
        with serve(create_app(app_client, TOKEN)) as base, httpx.Client(base_url=base) as http:
            url = f"/runs/{run_id}/commands"
            refused = http.post(url, json={"action": "set_spike_guard", "value": 2},
                                headers=AUTH)
            assert refused.status_code == 422
            assert "or 0 (off)" in refused.text
            accepted = http.post(url, json={"action": "set_spike_guard", "value": 10},
                                 headers=AUTH)
            assert accepted.status_code == 202
        commands = [decode(f, Command) for _, f in
                    store.xrange(stream_key(run_id, Stream.COMMANDS))]
        assert [(c.action, c.value) for c in commands] == [("set_spike_guard", 10.0)]
    finally:
        keys = list(store.scan_iter(match=f"smart-tuner:{run_id}:*"))
        if keys:
            store.delete(*keys)
        store.srem(RUNS_KEY, run_id)
        app_client.close()
        store.close()


class _Refusing:
    """A run store that must not be written to."""

    def submit(self, *args: Any) -> None:
        raise AssertionError("an out-of-bounds command was sent")


def test_the_bot_refuses_out_of_bounds_before_sending() -> None:
    replies: list[str] = []
    ctx = SimpleNamespace(metrics=bot.BotMetrics(), words=MESSAGES["en"], store=_Refusing(),
                          reply=lambda chat_id, text, markup=None: replies.append(text),
                          settings=SimpleNamespace(language="en", ack_wait_s=1.0))
    message = SimpleNamespace(chat=SimpleNamespace(id=1),
                              from_user=SimpleNamespace(id=1, username="admin"))
    asyncio.run(bot.submit(ctx, message, "spikeguard", "run-1", 2.0))  # type: ignore[arg-type]
    assert replies and "Not sent" in replies[0] and "or 0 (off)" in replies[0]
    assert bot.MUTATING["spikeguard"] == "set_spike_guard"
    assert "spikeguard" in [c.command for c in bot.bot_commands("en")]
    for language in ("en", "ru"):
        assert "/spikeguard" in help_text(language, True)
        assert "/spikeguard" in MESSAGES[language]["usage_spikeguard"]


def test_the_progress_report_shows_the_guard() -> None:
    base = dict(run_id="r", step=60, loss=1.0, mel=0.4, mel_postnet=0.4, gate=0.1,
                guided_attention=0.1, objective=0.9, grad_norm=0.8, lr=1e-3,
                guided_attention_weight=1.0, clip_threshold=1.0, step_seconds=0.2,
                finite=True, skipped_steps=0)
    for language in ("en", "ru"):
        old = progress_report("r", MetricsMessage(**base), None, None, [], None, language)
        assert "🛡️" not in old  # a trainer that does not report it, or never used it
        on = progress_report("r", MetricsMessage(**base, spike_guard=GUARD, guarded_steps=2),
                             None, None, [], None, language)
        assert "🛡️" in on and "×10" in on and ": 2" in on
