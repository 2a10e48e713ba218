"""Redis up, but answering every write with an error reply, in the middle of a training run:
OOM (``maxmemory`` reached under ``noeviction``), then READONLY (the server turned into a
replica, as after a failover), each for 8 s and until the trainer has stepped 10 times through it.

Must hold: the trainer keeps stepping; the publisher thread lives through both (before, the
first error reply ended it for good); every step's metrics message arrives once writes go
through again, none lost, none twice; and each refusal is announced once, with its kind and
length, in a ``recovered`` event.
"""

from __future__ import annotations

import threading
import time

from services.core.bus import connect
from services.core.schemas import Event, MetricsMessage, decode
from services.core.streams import Stream, stream_key
from services.launcher.redis_server import RedisProcess, free_port
from services.trainer.link import attach
from services.trainer.training import Trainer

STEPS_THROUGH = 10  # steps the trainer must take while Redis refuses writes
# and at least this long: the publisher's back-off reaches its 2 s ceiling and retries at it
REFUSAL_MIN_S = 8.0
REFUSAL_MAX_S = 60.0  # past this the trainer is not stepping: the assertions fail
MIN_ERRORS = 3  # failed writes per refusal: the publisher retried, not gave up


def _refuse(client, how: str) -> None:
    if how == "OOM":
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
    else:
        client.replicaof("127.0.0.1", free_port())  # a master that is not there


def _release(client, how: str) -> None:
    if how == "OOM":
        client.config_set("maxmemory", 0)
    else:
        client.replicaof("NO", "ONE")


def test_redis_refusing_writes_mid_run(small_corpus, small_config, tmp_path, run_id,
                                       chaos) -> None:
    rows = {how: chaos(f"Redis answers {how} to every write (trainer, {STEPS_THROUGH} steps)")
            for how in ("OOM", "READONLY")}
    (tmp_path / "redis").mkdir()
    server = RedisProcess(tmp_path / "redis").start()
    try:
        admin = connect(server.url)
        trainer = Trainer(small_config, small_corpus, tmp_path / "run", progress=False,
                          cache_dir=small_corpus / ".features", run_id=run_id)
        link = attach(trainer, server.url, enqueue_scoring=False)
        publisher = link.publisher
        training = threading.Thread(target=lambda: trainer.train(max_steps=100_000),
                                    daemon=True)
        training.start()
        while trainer.step < 5:
            time.sleep(0.1)
        windows: dict[str, tuple[int, int, float]] = {}
        flushed_after: dict[str, bool] = {}
        for how, row in rows.items():
            errors_before = publisher.stats.errors_by_kind.get(how, 0)
            _refuse(admin, how)
            row.injected = 1
            started, step_at = time.monotonic(), trainer.step
            while (time.monotonic() - started < REFUSAL_MAX_S and (
                    time.monotonic() - started < REFUSAL_MIN_S or
                    trainer.step < step_at + STEPS_THROUGH or
                    publisher.stats.errors_by_kind.get(how, 0) - errors_before < MIN_ERRORS)):
                time.sleep(0.2)
            _release(admin, how)
            seconds = time.monotonic() - started
            row.fault = f"Redis answers {how} to every write for {seconds:.0f} s (trainer)"
            windows[how] = (step_at, trainer.step, seconds)
            flushed_after[how] = publisher.flush(30)
        time.sleep(1.0)  # a few steps with Redis writable
        trainer.request_stop()
        training.join(60)
        flushed = link.close()

        # Measured first, asserted after, so a failing run shows its loss in the table.
        steps = [decode(f, MetricsMessage).step
                 for _, f in admin.xrange(stream_key(run_id, Stream.METRICS))]
        events = [decode(f, Event) for _, f in admin.xrange(stream_key(run_id, Stream.EVENTS))]
        recoveries = [e for e in events if e.event == "recovered"]
        for how, row in rows.items():
            first, last, _ = windows[how]
            row.lost = len(set(range(first, last)) - set(steps))
            announced = [e for e in recoveries if e.data.get("error_kind") == how]
            row.survived = int(row.lost == 0 and last >= first + STEPS_THROUGH
                               and len(announced) == 1 and publisher.stats.thread_restarts == 0)

        assert flushed_after == {"OOM": True, "READONLY": True}, "buffered telemetry not sent"
        assert flushed
        assert steps == list(range(steps[0], trainer.step)), "a step's metrics went missing"
        assert len(steps) == len(set(steps))  # and none was written twice
        for how in rows:
            first, last, _ = windows[how]
            assert last >= first + STEPS_THROUGH, (how, first, last)  # it kept stepping
            assert publisher.stats.errors_by_kind.get(how, 0) >= MIN_ERRORS
        assert sorted(e.data["error_kind"] for e in recoveries) == ["OOM", "READONLY"]
        assert all(e.data["outage_s"] > 0 for e in recoveries)
        assert publisher.stats.thread_restarts == 0  # it never died: it waited
        assert publisher.stats.dropped == 0
    finally:
        server.stop()
