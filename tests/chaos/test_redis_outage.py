"""Redis stopped for 12 s in the middle of a training run, then started again.

12 s is six times the longest wait of the trainer's side of the bus (a 2 s socket timeout,
reconnects backing off to at most 2 s, the command reader retrying every 2 s): every one of
them runs out several times over during the outage, as in a longer one. (It was 30 s; the
extra 18 s tested nothing more.) On a busy machine the outage lasts until the trainer has
stepped 10 times in it, as the test requires of it, up to 60 s.

Must hold: the trainer never stops stepping; the telemetry buffered meanwhile arrives
afterwards, none lost while the buffer bound holds; and when the bound is exceeded, the
loss is reported exactly (an ``events_dropped`` event with the precise count).
"""

from __future__ import annotations

import threading
import time

from services.core.bus import Publisher, connect
from services.core.schemas import Event, MetricsMessage, decode
from services.core.streams import Stream, stream_key
from services.launcher.redis_server import RedisProcess
from services.trainer.link import attach
from services.trainer.training import Trainer

OUTAGE_S = 12.0
OUTAGE_MAX_S = 60.0
SMALL_BUFFER = 20  # a publisher whose bound the outage exceeds
OVERFLOW_MESSAGES = 75


def _metrics_steps(client, run_id: str) -> list[int]:
    return [decode(f, MetricsMessage).step
            for _, f in client.xrange(stream_key(run_id, Stream.METRICS))]


def test_redis_down_mid_run(small_corpus, small_config, tmp_path, run_id, chaos) -> None:
    trainer_row = chaos(f"Redis down {OUTAGE_S:.0f} s (trainer, buffer 10,000)")
    small_row = chaos(f"Redis down {OUTAGE_S:.0f} s (publisher, buffer {SMALL_BUFFER}; "
                      "loss reported)")
    (tmp_path / "redis").mkdir()
    redis = RedisProcess(tmp_path / "redis").start()
    try:
        trainer = Trainer(small_config, small_corpus, tmp_path / "run", progress=False,
                          cache_dir=small_corpus / ".features", run_id=run_id)
        link = attach(trainer, redis.url, enqueue_scoring=False)
        small = Publisher(connect(redis.url), f"{run_id}-small", buffer_size=SMALL_BUFFER)
        training = threading.Thread(
            target=lambda: trainer.train(max_steps=100_000), daemon=True)
        training.start()
        while trainer.step < 5:
            time.sleep(0.1)
        redis.stop()
        trainer_row.injected = small_row.injected = 1
        down_at, step_at_outage = time.monotonic(), trainer.step
        for i in range(OVERFLOW_MESSAGES):  # more than the small buffer holds
            small.publish(Stream.EVENTS, Event(run_id=f"{run_id}-small", event="paused",
                                               detail=f"message {i}"))
        steps_during: list[int] = []
        # At least OUTAGE_S, and on a busy machine until the trainer has stepped the 10
        # steps the test asks of it (at most OUTAGE_MAX_S: past that the assertion fails).
        while (time.monotonic() - down_at < OUTAGE_S
               or (trainer.step <= step_at_outage + 10
                   and time.monotonic() - down_at < OUTAGE_MAX_S)):
            time.sleep(1.0)
            steps_during.append(trainer.step)
        redis.start()
        outage = time.monotonic() - down_at
        trainer_row.fault = trainer_row.fault.replace(f"{OUTAGE_S:.0f} s", f"{outage:.0f} s")
        small_row.fault = small_row.fault.replace(f"{OUTAGE_S:.0f} s", f"{outage:.0f} s")
        step_at_recovery = trainer.step
        time.sleep(3.0)  # a few steps with Redis back
        trainer.request_stop()
        training.join(60)
        flushed = link.publisher.flush(30) and small.flush(30)
        link.close()
        small.close()

        # Measured first, asserted after, so a failing run shows its loss in the table.
        client = connect(redis.url)  # a fresh Redis: only what was sent after the restart
        steps = _metrics_steps(client, run_id)
        after = [s for s in steps if s >= step_at_outage]
        # every step since the outage must have its metrics message
        trainer_row.lost = len(set(range(step_at_outage, trainer.step)) - set(steps))
        kept_stepping = step_at_recovery > step_at_outage + 10 and all(
            b > a for a, b in zip(steps_during[::5], steps_during[5::5], strict=False))
        trainer_row.survived = int(kept_stepping and trainer_row.lost == 0)
        events = [decode(f, Event) for _, f in
                  client.xrange(stream_key(f"{run_id}-small", Stream.EVENTS))]
        dropped = [e for e in events if e.event == "events_dropped"]
        kept = [e for e in events if e.event == "paused"]
        expected_loss = OVERFLOW_MESSAGES - SMALL_BUFFER
        small_row.lost = OVERFLOW_MESSAGES - len(kept)
        # survived: the loss was reported exactly once, with the exact count
        small_row.survived = int(len(dropped) == 1 and
                                 dropped[0].data["dropped"] == small_row.lost)

        assert flushed
        # the trainer never stopped stepping while Redis was down
        assert step_at_recovery > step_at_outage + 10, (step_at_outage, step_at_recovery)
        assert all(b > a for a, b in zip(steps_during[::5], steps_during[5::5], strict=False))
        # everything it published arrived: one metrics message per step, none lost
        assert after == list(range(after[0], trainer.step)), "a step's metrics went missing"
        assert after[0] <= step_at_outage  # the buffer held everything since the outage
        assert link.publisher.stats.dropped == 0
        # the small publisher lost exactly what overflowed, and said so exactly once
        assert len(dropped) == 1 and dropped[0].data["dropped"] == expected_loss
        assert len(kept) == SMALL_BUFFER
        assert [e.detail for e in kept] == [f"message {i}" for i in
                                            range(expected_loss, OVERFLOW_MESSAGES)]
    finally:
        redis.stop()
