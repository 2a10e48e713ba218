"""The one consumer loop (``RunStreamReader``) against a real Redis: every page of its own
pending entries after a restart, stale entries of a dead consumer claimed, a deleted group
created again, back-off through a dropped connection, runs found in the runs set."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from services.core.bus import Delivery, connect
from services.core.consumer import Backoff, LoopSettings, RunStreamReader
from services.core.schemas import MetricsMessage, encode
from services.core.streams import DEAD_LETTER_STREAM, PREFIX, RUNS_KEY, Stream, stream_key
from services.launcher.redis_server import RedisProcess, free_port

PAGE = 200  # the default poll size: one page of pending entries
FAST = LoopSettings(block_ms=20, retry_initial_s=0.01, retry_max_s=0.04)


def metrics(run_id: str, step: int) -> MetricsMessage:
    """A valid metrics message of ``run_id`` at ``step``."""
    return MetricsMessage(run_id=run_id, step=step, loss=1.0, mel=0.4, mel_postnet=0.4,
                          gate=0.1, guided_attention=0.1, objective=0.9, grad_norm=1.0,
                          lr=1e-3, guided_attention_weight=1.0, clip_threshold=1.0,
                          step_seconds=0.5, finite=True, skipped_steps=0)


@pytest.fixture
def client(redis_url: str, run_id: str) -> Iterator[redis.Redis]:
    """A client; the run's keys are removed afterwards."""
    connection = connect(redis_url)
    yield connection
    keys = list(connection.scan_iter(match=f"{PREFIX}:{run_id}:*"))
    if keys:
        connection.delete(*keys)
    connection.close()


def publish(client: redis.Redis, run_id: str, steps: range) -> list[str]:
    """Metrics entries at ``steps``, in one round trip; their entry ids."""
    pipe = client.pipeline(transaction=False)
    for step in steps:
        pipe.xadd(stream_key(run_id, Stream.METRICS), encode(metrics(run_id, step)))
    return [entry_id.decode() for entry_id in pipe.execute()]


def reader(client: redis.Redis, run_id: str, name: str = "c1",
           settings: LoopSettings = FAST) -> RunStreamReader:
    """A reader of the run's metrics and events on a group of the test's own."""
    return RunStreamReader(client, f"g-{run_id}", name, (Stream.METRICS, Stream.EVENTS),
                           settings, runs=[run_id])


def read_unacked(client: redis.Redis, run_id: str, name: str, count: int) -> None:
    """``name`` reads ``count`` entries and dies before acking any of them."""
    dying = reader(client, run_id, name)
    dying.discover()
    got = dying.consumer.poll(None, count)
    assert len(got) == count


def drain(source: RunStreamReader) -> list[Delivery]:
    """Steps until the backlog is read and nothing new comes; nothing acked."""
    out: list[Delivery] = []
    while True:
        batch = source.step(block_ms=None)
        out.extend(batch)
        if not batch and not source.recovering:
            return out


def pending(client: redis.Redis, run_id: str) -> dict[str, int]:
    """Pending entries of the run's metrics stream in the test's group, by consumer."""
    summary = client.xpending(stream_key(run_id, Stream.METRICS), f"g-{run_id}")
    return {c["name"].decode(): c["pending"] for c in summary["consumers"]}


def test_every_page_of_own_pending_entries_comes_back_after_a_restart(
        client: redis.Redis, run_id: str) -> None:
    ids = publish(client, run_id, range(2 * PAGE + 50))
    read_unacked(client, run_id, "c1", len(ids))
    restarted = reader(client, run_id, "c1", replace(FAST, poll_count=PAGE))
    pages = []
    while True:
        batch = restarted.step(block_ms=None)
        if not batch:
            break
        pages.append(batch)
    # Three pages, in order, each entry once, though none was acked (paged by cursor).
    assert [len(page) for page in pages] == [PAGE, PAGE, 50]
    assert [d.entry_id for page in pages for d in page] == ids
    assert not restarted.recovering
    restarted.consumer.ack(*[d for page in pages for d in page])
    assert pending(client, run_id) == {}


def test_own_entries_deleted_while_pending_are_acked_not_handed_out(
        client: redis.Redis, run_id: str) -> None:
    ids = publish(client, run_id, range(5))
    read_unacked(client, run_id, "c1", 5)
    client.xdel(stream_key(run_id, Stream.METRICS), ids[1], ids[3])
    restarted = reader(client, run_id, "c1")
    got = drain(restarted)
    assert [d.entry_id for d in got] == [ids[0], ids[2], ids[4]]
    assert pending(client, run_id) == {"c1": 3}


def test_stale_entries_of_a_dead_consumer_are_claimed(client: redis.Redis,
                                                      run_id: str) -> None:
    ids = publish(client, run_id, range(PAGE + 30))
    read_unacked(client, run_id, "dead", len(ids))
    time.sleep(0.02)
    survivor = reader(client, run_id, "survivor", replace(FAST, claim_idle_ms=10))
    got = drain(survivor)
    assert sorted(d.entry_id for d in got) == sorted(ids)  # both pages of them
    assert pending(client, run_id) == {"survivor": len(ids)}
    survivor.consumer.ack(*got)
    assert pending(client, run_id) == {}


def test_claims_wait_for_the_idle_time_and_repeat_on_their_interval(
        client: redis.Redis, run_id: str) -> None:
    now = [0.0]
    settings = replace(FAST, claim_idle_ms=50, claim_every_s=10.0)
    survivor = RunStreamReader(client, f"g-{run_id}", "survivor", (Stream.METRICS,),
                               settings, runs=[run_id], clock=lambda: now[0])
    survivor.step(block_ms=None)  # start: nothing pending, nothing stale
    ids = publish(client, run_id, range(3))
    read_unacked(client, run_id, "dead", 3)
    assert drain(survivor) == []  # a live peer's entries are not taken before claim_idle_ms
    time.sleep(0.06)
    now[0] = 5.0
    assert drain(survivor) == []  # idle enough, but the next claim is not due yet
    now[0] = 10.0
    assert [d.entry_id for d in drain(survivor)] == ids


def test_a_deleted_group_is_created_again(client: redis.Redis, run_id: str) -> None:
    key = stream_key(run_id, Stream.METRICS)
    first = publish(client, run_id, range(3))
    seen: list[str] = []
    later: list[str] = []
    arrived = threading.Event()
    source = reader(client, run_id)

    def handle(deliveries: list[Delivery]) -> None:
        seen.extend(d.entry_id for d in deliveries)
        source.consumer.ack(*deliveries)
        if later and later[0] in seen:
            arrived.set()

    stop = threading.Event()
    worker = threading.Thread(target=source.run, args=(stop, handle))
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == first
        client.xgroup_destroy(key, f"g-{run_id}")
        later.extend(publish(client, run_id, range(3, 4)))
        assert arrived.wait(5)
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    # The new group starts at the stream's beginning: what was there is read again.
    assert seen == first + first + later


def test_a_deleted_stream_is_created_again(client: redis.Redis, run_id: str) -> None:
    source = reader(client, run_id)
    source.step(block_ms=None)
    client.delete(stream_key(run_id, Stream.METRICS))
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        source.step(block_ms=None)
    backoff = Backoff(0.01, 0.04, "test")
    assert source.failed(redis.ResponseError("NOGROUP no such key"), backoff) == 0.01
    ids = publish(client, run_id, range(2))
    assert [d.entry_id for d in drain(source)] == ids


def test_malformed_entries_are_dead_lettered(client: redis.Redis, run_id: str) -> None:
    key = stream_key(run_id, Stream.METRICS)
    bad = client.xadd(key, {"data": "{not json"}).decode()
    good = publish(client, run_id, range(1))
    source = reader(client, run_id)
    assert [d.entry_id for d in drain(source)] == good
    assert source.consumer.dead_lettered == 1
    dead = [f for _, f in client.xrevrange(DEAD_LETTER_STREAM, count=50)
            if f[b"id"].decode() == bad]
    assert len(dead) == 1 and dead[0][b"stream"].decode() == key


def test_back_off_is_bounded_and_exponential() -> None:
    backoff = Backoff(0.5, 4.0, "test")
    error = ConnectionError("down")
    assert [backoff.failed("Redis unreachable", error) for _ in range(6)] == [
        0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.succeeded()
    assert backoff.failed("Redis unreachable", error) == 0.5
    with pytest.raises(ValueError):
        LoopSettings(retry_initial_s=2.0, retry_max_s=1.0)


def test_a_closed_port_is_retried_with_back_off_and_logged_once(
        run_id: str, caplog: pytest.LogCaptureFixture) -> None:
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    source = reader(dead, run_id)
    stop = threading.Event()
    rounds: list[int] = []
    caplog.set_level(logging.DEBUG, logger="services.core.consumer")
    worker = threading.Thread(target=source.run,
                              args=(stop, lambda batch: rounds.append(len(batch))))
    worker.start()
    time.sleep(0.5)
    stop.set()
    worker.join(5)
    assert not worker.is_alive() and rounds == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    retries = [r for r in caplog.records if r.levelno == logging.DEBUG and "still" in
               r.getMessage()]
    assert len(warnings) == 1 and "Redis unreachable" in warnings[0].getMessage()
    assert len(retries) >= 3  # it kept trying, quietly


def test_a_dropped_connection_is_ridden_out_and_nothing_is_lost(
        tmp_path: Path, run_id: str, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisProcess(tmp_path).start()
    client = connect(server.url, timeout_s=0.3)
    seen: list[int] = []
    source = reader(client, run_id)

    def handle(deliveries: list[Delivery]) -> None:
        seen.extend(d.message.step for d in deliveries)  # type: ignore[attr-defined]
        source.consumer.ack(*deliveries)

    caplog.set_level(logging.INFO, logger="services.core.consumer")
    stop = threading.Event()
    worker = threading.Thread(target=source.run, args=(stop, handle))
    worker.start()
    try:
        publish(client, run_id, range(3))
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop()
        time.sleep(0.5)  # several failed rounds
        server.start()  # same port, empty data
        publish(client, run_id, range(3, 6))
        deadline = time.monotonic() + 10
        while len(seen) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        worker.join(5)
        server.stop()
    assert not worker.is_alive()
    assert seen == list(range(6))
    messages = [r.getMessage() for r in caplog.records if r.name == "services.core.consumer"]
    assert sum("Redis unreachable, retrying" in m for m in messages) == 1
    assert any("back after Redis unreachable" in m for m in messages)


def test_runs_are_found_in_the_runs_set_at_the_discovery_interval(
        tmp_path: Path, run_id: str) -> None:
    server = RedisProcess(tmp_path).start()  # a runs set of this test's own
    try:
        client = connect(server.url)
        now = [0.0]
        found: list[str] = []
        source = RunStreamReader(client, "g", "c1", (Stream.METRICS,),
                                 replace(FAST, discover_every_s=2.0), on_run=found.append,
                                 clock=lambda: now[0])
        client.sadd(RUNS_KEY, run_id, "bad id!")
        source.step(block_ms=None)
        assert found == source.runs == [run_id]
        client.sadd(RUNS_KEY, "later")
        publish(client, "later", range(1))
        now[0] = 1.0
        assert source.step(block_ms=None) == [] and found == [run_id]
        now[0] = 2.0
        assert [d.message.run_id for d in source.step(block_ms=None)] == ["later"]
        assert found == [run_id, "later"]
        assert source.sources[stream_key("later", Stream.METRICS)] == ("later", Stream.METRICS)
    finally:
        server.stop()


def test_the_async_loop_reads_and_stops(client: redis.Redis, run_id: str) -> None:
    ids = publish(client, run_id, range(4))
    source = reader(client, run_id)
    seen: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()

        async def handle(deliveries: list[Delivery]) -> None:
            seen.extend(d.entry_id for d in deliveries)
            await asyncio.to_thread(source.consumer.ack, *deliveries)
            if len(seen) >= len(ids):
                stop.set()

        await asyncio.wait_for(source.run_async(stop, handle), 5)

    asyncio.run(main())
    assert seen == ids
    assert pending(client, run_id) == {}
