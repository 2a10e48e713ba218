"""Schemas on the wire, the buffered publisher and consumer groups, against real Redis."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
import redis

from services.core.bus import Consumer, Publisher, connect
from services.core.schemas import (
    MAX_ATTENTION_CELLS,
    AttentionSample,
    Command,
    Event,
    MessageError,
    MetricsMessage,
    decode,
    encode,
)
from services.core.streams import (
    DEAD_LETTER_STREAM,
    RUNS_KEY,
    Stream,
    maxlen_for,
    stream_key,
    validate_run_id,
)
from services.launcher.redis_server import RedisProcess


def _metrics(run_id: str, step: int, grad_norm: float = 1.0) -> MetricsMessage:
    return MetricsMessage(run_id=run_id, step=step, loss=1.0, mel=0.4, mel_postnet=0.4,
                          gate=0.1, guided_attention=0.1, objective=0.9, grad_norm=grad_norm,
                          lr=1e-3, guided_attention_weight=1.0, clip_threshold=1.0,
                          step_seconds=0.5, finite=math.isfinite(grad_norm), skipped_steps=0)


# ------------------------------------------------------------------ schemas


def test_metrics_round_trip_keeps_non_finite_norms():
    message = _metrics("run1", 3, grad_norm=float("nan"))
    back = decode(encode(message), MetricsMessage)
    assert back.step == 3 and math.isnan(back.grad_norm) and back.finite is False


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda d: d.replace('"v":1', '"v":2'), "v"),
    (lambda d: d.replace('"step":3', '"step":"three"'), "step"),
    (lambda d: d.replace('"run_id":"run1"', '"run_id":"bad id!"'), "run_id"),
    (lambda d: d[:-5], "invalid"),
    (lambda d: d.replace('"kind":"metrics"', '"kind":"event"'), "kind"),
])
def test_bad_messages_raise_with_a_reason(mutate, reason):
    wire = encode(_metrics("run1", 3))["data"]
    with pytest.raises(MessageError) as caught:
        decode({"data": mutate(wire)}, MetricsMessage)
    assert reason in caught.value.reason


def test_entry_without_data_field():
    with pytest.raises(MessageError, match="no 'data' field"):
        decode({b"other": b"x"}, MetricsMessage)


def test_attention_sample_round_trip_and_hostile_payloads():
    matrix = np.random.default_rng(0).random((7, 5)).astype(np.float32)
    sample = AttentionSample.from_array(matrix, input_length=5, output_length=6)
    np.testing.assert_allclose(sample.to_array(), matrix, atol=1e-3)
    with pytest.raises(MessageError, match="undecodable"):
        sample.model_copy(update={"data": "!!!not base64!!!"}).to_array()
    bigger = AttentionSample.from_array(np.zeros((70, 50)), 5, 6).data
    with pytest.raises(MessageError, match="bytes"):
        sample.model_copy(update={"data": bigger}).to_array()
    with pytest.raises(ValueError, match="out of bounds"):
        AttentionSample(shape=(MAX_ATTENTION_CELLS, 2), input_length=1, output_length=1,
                        data="")
    with pytest.raises(ValueError, match="exceed"):
        AttentionSample(shape=(3, 3), input_length=4, output_length=1, data="")


def test_command_values_are_required_exactly_where_they_belong():
    assert Command(run_id="r", action="set_lr", value=1e-4, source="api").value == 1e-4
    with pytest.raises(ValueError, match="needs a value"):
        Command(run_id="r", action="set_lr", source="api")
    with pytest.raises(ValueError, match="takes no value"):
        Command(run_id="r", action="pause", value=1.0, source="api")
    with pytest.raises(ValueError):
        Command(run_id="r", action="format_disk", source="api")


def test_stream_names_are_validated():
    assert stream_key("run-1", Stream.METRICS) == "smart-tuner:run-1:metrics"
    assert maxlen_for(stream_key("run-1", Stream.ATTENTION)) < maxlen_for(
        stream_key("run-1", Stream.METRICS))
    for bad in ("", "a:b", "../x", "-x", "x" * 65, "run 1"):
        with pytest.raises(ValueError):
            validate_run_id(bad)


# ------------------------------------------------------------------ publisher


def test_publisher_delivers_in_order_and_registers_the_run(redis_url, run_id):
    client = connect(redis_url)
    sent = []
    publisher = Publisher(client, run_id, on_send=lambda s, m, e: sent.append((s, e)))
    for step in range(50):
        publisher.publish(Stream.METRICS, _metrics(run_id, step))
    publisher.publish(Stream.EVENTS, Event(run_id=run_id, event="run_started"))
    assert publisher.close()
    entries = client.xrange(stream_key(run_id, Stream.METRICS))
    assert [decode(f, MetricsMessage).step for _, f in entries] == list(range(50))
    assert client.sismember(RUNS_KEY, run_id)
    assert publisher.stats.sent == 51 and publisher.stats.dropped == 0
    # the callback sees the real entry ids, in order
    assert [e for s, e in sent if s is Stream.METRICS] == [i.decode() for i, _ in entries]


def test_publisher_survives_an_outage_and_reports_overflow_exactly(tmp_path, run_id):
    server = RedisProcess(tmp_path).start()
    client = connect(server.url, timeout_s=0.5)
    publisher = Publisher(client, run_id, buffer_size=20)
    publisher.publish(Stream.METRICS, _metrics(run_id, 0))
    assert publisher.flush(5)
    server.stop()
    started = time.monotonic()
    for step in range(1, 51):  # 50 messages into a buffer of 20 while Redis is down
        publisher.publish(Stream.METRICS, _metrics(run_id, step))
    # publishing never waited for the dead server (a connect attempt alone takes 0.5 s)
    assert time.monotonic() - started < 0.5
    assert not publisher.flush(1.0)
    assert publisher.stats.dropped == 30 and publisher.stats.buffered == 20
    server.start()  # same port, empty data
    assert publisher.flush(15)
    steps = [decode(f, MetricsMessage).step for _, f in
             client.xrange(stream_key(run_id, Stream.METRICS))]
    assert steps == list(range(31, 51))  # the newest 20 survived, in order
    events = [decode(f, Event) for _, f in client.xrange(stream_key(run_id, Stream.EVENTS))]
    # the outage is announced (what failed, how long), then the loss, exactly
    assert [e.event for e in events] == ["recovered", "events_dropped"]
    assert events[0].data["error_kind"] == "connection" and events[0].data["outage_s"] > 0
    assert events[1].data["dropped"] == 30
    publisher.close()
    server.stop()


# ------------------------------------------------------------------ consumers


def _consumer(client: redis.Redis, run_id: str, name: str, idle_ms: int = 30_000) -> Consumer:
    return Consumer(client, {stream_key(run_id, Stream.METRICS): Stream.METRICS}, "tests",
                    name, claim_idle_ms=idle_ms)


def test_malformed_entries_go_to_the_dead_letter_stream(redis_url, run_id):
    client = connect(redis_url)
    key = stream_key(run_id, Stream.METRICS)
    consumer = _consumer(client, run_id, "c1")
    consumer.poll(block_ms=None)  # creates the group
    client.xadd(key, encode(_metrics(run_id, 1)))
    bad_id = client.xadd(key, {"data": '{"v": 1, "kind": "metrics"'}).decode()
    client.xadd(key, {"unexpected": "field"})
    client.xadd(key, encode(_metrics(run_id, 2)))
    deliveries = consumer.poll(block_ms=100)
    assert [d.message.step for d in deliveries] == [1, 2]
    for delivery in deliveries:
        consumer.ack(delivery)
    assert consumer.dead_lettered == 2
    dead = [f for _, f in client.xrevrange(DEAD_LETTER_STREAM, count=50)
            if f[b"stream"].decode() == key]
    assert len(dead) == 2
    by_id = {f[b"id"].decode(): f[b"reason"].decode() for f in dead}
    assert "invalid MetricsMessage" in by_id[bad_id]
    # dead-lettered entries are acked: nothing of them stays pending
    assert client.xpending(key, "tests")["pending"] == 0


def test_stale_entries_are_claimed_and_own_pending_reread(redis_url, run_id):
    client = connect(redis_url)
    key = stream_key(run_id, Stream.METRICS)
    first = _consumer(client, run_id, "dies")
    first.poll(block_ms=None)
    for step in range(3):
        client.xadd(key, encode(_metrics(run_id, step)))
    assert len(first.poll(block_ms=100)) == 3  # read, never acked: the consumer "dies"
    again = _consumer(client, run_id, "dies")  # the same consumer after a restart
    assert [d.message.step for d in again.pending()] == [0, 1, 2]
    other = _consumer(client, run_id, "survivor", idle_ms=0)
    claimed = other.claim_stale()
    assert [d.message.step for d in claimed] == [0, 1, 2]
    for delivery in claimed:
        other.ack(delivery)
    assert client.xpending(key, "tests")["pending"] == 0


def test_attention_is_compressed_only_when_it_pays():
    steps, tokens = np.arange(60)[:, None] / 60, np.arange(20)[None, :] / 20
    sharp = np.exp(-((tokens - steps) ** 2) / 0.002)
    sharp /= sharp.sum(1, keepdims=True)
    diffuse = np.random.default_rng(1).random((60, 20))
    packed_sharp = AttentionSample.from_array(sharp, 20, 60)
    packed_diffuse = AttentionSample.from_array(diffuse, 20, 60)
    assert packed_sharp.encoding == "f16-zlib-b64"
    assert packed_diffuse.encoding == "f16-b64"
    np.testing.assert_allclose(packed_sharp.to_array(), sharp, atol=1e-3)
    np.testing.assert_allclose(packed_diffuse.to_array(), diffuse, atol=1e-3)
    # a raw payload of the wrong size is refused, like a compressed one
    short = packed_diffuse.model_copy(update={"data": packed_diffuse.data[:-8]})
    with pytest.raises(MessageError):
        short.to_array()


# ------------------------------------------------------------------ Redis refusing writes

OUTAGE_ERRORS = 3  # failed attempts to wait for: retried, yet logged once


def _refuse_writes(client: redis.Redis, how: str, dead_port: int) -> None:
    """Make a live Redis answer every write with an error reply: OOM or READONLY."""
    if how == "OOM":
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
    else:  # a replica of a master that is not there: it keeps its data, refuses writes
        client.replicaof("127.0.0.1", dead_port)


def _take_writes(client: redis.Redis, how: str) -> None:
    if how == "OOM":
        client.config_set("maxmemory", 0)
    else:
        client.replicaof("NO", "ONE")


def _wait_for(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("how", ["OOM", "READONLY"])
def test_publisher_keeps_buffering_while_redis_refuses_writes(tmp_path, run_id, how, caplog):
    from services.launcher.redis_server import free_port

    server = RedisProcess(tmp_path).start()
    try:
        client = connect(server.url)
        publisher = Publisher(connect(server.url), run_id)
        publisher.publish(Stream.METRICS, _metrics(run_id, 0))
        assert publisher.flush(5)
        _refuse_writes(client, how, free_port())
        with caplog.at_level(logging.WARNING, logger="services.core.bus"):
            for step in range(1, 21):
                publisher.publish(Stream.METRICS, _metrics(run_id, step))
            # it retries (several failed attempts), and the thread lives through them all
            assert _wait_for(lambda: publisher.stats.errors_by_kind.get(how, 0)
                             >= OUTAGE_ERRORS)
            assert publisher.running()
            assert not publisher.stats.connected and publisher.stats.buffered == 20
            refusals = [r for r in caplog.records if how in r.getMessage()]
            assert len(refusals) == 1, [r.getMessage() for r in caplog.records]  # once
        _take_writes(client, how)
        assert publisher.flush(15)
        steps = [decode(f, MetricsMessage).step for _, f in
                 client.xrange(stream_key(run_id, Stream.METRICS))]
        assert steps == list(range(21))  # nothing buffered was lost, nothing twice
        events = [decode(f, Event) for _, f in
                  client.xrange(stream_key(run_id, Stream.EVENTS))]
        assert [e.event for e in events] == ["recovered"]  # once Redis takes writes again
        assert events[0].data["error_kind"] == how and how in events[0].data["error"]
        assert events[0].data["outage_s"] > 0 and events[0].severity == "warning"
        assert publisher.stats.outages == 1 and publisher.stats.connected
        assert publisher.stats.dropped == 0
        publisher.close()
    finally:
        server.stop()


def test_a_dead_publisher_thread_is_noticed_and_restarted(redis_url, run_id, caplog):
    client = connect(redis_url)
    calls = []

    def dies_once(stream, message, entry_id):  # whatever ends the thread, not an Exception
        calls.append(entry_id)
        if len(calls) == 1:
            raise SystemExit("publisher thread killed")

    publisher = Publisher(client, run_id, on_send=dies_once)
    publisher.publish(Stream.METRICS, _metrics(run_id, 0))
    assert _wait_for(lambda: not publisher.running())  # today: dead, and nothing says so
    with caplog.at_level(logging.ERROR, logger="services.core.bus"):
        for step in range(1, 6):
            publisher.publish(Stream.METRICS, _metrics(run_id, step))
    assert publisher.running() and publisher.stats.thread_restarts == 1
    assert any("publisher thread" in r.getMessage() for r in caplog.records)
    assert publisher.close()
    steps = [decode(f, MetricsMessage).step for _, f in
             client.xrange(stream_key(run_id, Stream.METRICS))]
    assert steps == list(range(6))
