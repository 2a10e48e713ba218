"""The Redis Streams event bus: a publisher that never blocks, consumers that never die.

``Publisher.publish`` only appends to a bounded in-process buffer; a background thread
writes to Redis in pipelined batches. While Redis is down, or up but refusing writes (an
error reply: OOM at maxmemory, MISCONF with a full disk, READONLY after a failover), the
buffer holds the newest ``buffer_size`` messages and the thread retries with back-off; what
the bound pushes out is counted (``dropped``) and reported once Redis is back, never
silently lost. Each outage is logged once when it starts, counted by kind
(``PublisherStats.errors_by_kind``, exported by the trainer) and announced with a
``recovered`` event, the error and its length, once Redis takes writes again. The thread
itself is watched: ``publish`` restarts it if anything ever ended it.

``Consumer`` reads with a consumer group (at-least-once), acks after handling, pages
through its own pending entries and those a dead consumer left (XAUTOCLAIM), and moves
anything that does not parse to the dead-letter stream with the reason, then acks it so it
is not redelivered. The loop that drives consumers for services is
``services.core.consumer``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from services.core.schemas import SCHEMAS, Event, Message, MessageError, decode, encode
from services.core.streams import DEAD_LETTER_STREAM, RUNS_KEY, Stream, maxlen_for, stream_key

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 10_000
BATCH_SIZE = 500
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 2.0
DEAD_LETTER_RAW_CHARS = 65_536  # of the offending payload: enough to see what was wrong
# Redis errors that mean "not reachable now"; anything else is a bug and is raised.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# What the publisher outlives: Redis unreachable, or reachable and refusing the write (an
# error reply). Buffered telemetry waits for either to pass; neither may end the thread.
PUBLISH_ERRORS = (redis.RedisError, OSError)
# Error replies redis-py has no class for keep their code as the first word of the message.
RESPONSE_CODES = ("MISCONF", "MASTERDOWN", "NOREPLICAS", "BUSY", "LOADING", "NOAUTH",
                  "WRONGPASS", "NOPERM", "READONLY", "OOM")
# The bounded set of ``error_kind`` values (and metric labels): a code above, or these.
ERROR_KIND_CONNECTION = "connection"
ERROR_KIND_TIMEOUT = "timeout"
ERROR_KIND_AUTH = "AUTH"
ERROR_KIND_OTHER = "other"
ERROR_KINDS = (*RESPONSE_CODES, ERROR_KIND_CONNECTION, ERROR_KIND_TIMEOUT, ERROR_KIND_AUTH,
               ERROR_KIND_OTHER)
ERROR_TEXT_CHARS = 300  # of an error in events and stats: the reply, not a novel


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A client with short timeouts, so an outage is noticed in seconds, not minutes."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=10)


def error_kind(error: BaseException) -> str:
    """One of ``ERROR_KINDS`` for a failed write: the Redis error code of an error reply
    (``OOM``, ``READONLY``, ``MISCONF`` ...), else ``connection``, ``timeout`` or ``AUTH``."""
    if isinstance(error, redis.OutOfMemoryError):
        return "OOM"
    if isinstance(error, redis.ReadOnlyError):
        return "READONLY"
    if isinstance(error, redis.BusyLoadingError):
        return "LOADING"
    if isinstance(error, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return ERROR_KIND_AUTH
    if isinstance(error, redis.exceptions.NoPermissionError):
        return "NOPERM"
    if isinstance(error, redis.TimeoutError):
        return ERROR_KIND_TIMEOUT
    if isinstance(error, CONNECTION_ERRORS):
        return ERROR_KIND_CONNECTION
    if isinstance(error, redis.ResponseError):
        # The pipeline prefixes "Command # n (...) of pipeline caused error: "; the code
        # is the first word of what Redis said.
        reply = str(error).rpartition("caused error: ")[2]
        code = reply.split(" ", 1)[0]
        if code in RESPONSE_CODES:
            return code
    return ERROR_KIND_OTHER


def error_text(error: BaseException) -> str:
    """``KIND: message``, short: what the reply said, for logs, events and stats."""
    return f"{error_kind(error)}: {error}"[:ERROR_TEXT_CHARS]


@dataclass
class PublisherStats:
    """Counters of a publisher since it started."""

    published: int = 0  # accepted into the buffer
    sent: int = 0  # written to Redis
    dropped: int = 0  # pushed out of the full buffer, never sent
    reported_dropped: int = 0  # already announced in an events_dropped event
    connected: bool = False
    buffered: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=5))  # latest only
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # failed writes, by kind
    outages: int = 0  # times writes started failing (each logged once)
    outage_since: float | None = None  # time.time() the current one began; None: none
    last_outage_s: float = 0.0  # length of the latest outage that ended
    thread_restarts: int = 0  # times publish() found the thread dead and started it again
    alive: bool = True  # the sending thread is running


@dataclass
class _Outage:
    """Writes failing since ``started`` (monotonic), for the recovery event."""

    started: float
    wall_started: float
    first_error: str
    kind: str


class Publisher:
    """Non-blocking, buffered XADD to a run's streams from a background thread."""

    def __init__(self, client: redis.Redis, run_id: str, buffer_size: int = DEFAULT_BUFFER,
                 on_send: Callable[[Stream, Message, str], None] | None = None):
        self.client = client
        self.run_id = run_id
        self.buffer_size = buffer_size
        self.on_send = on_send
        self.stats = PublisherStats()
        # Each message with its sequence number: a batch is committed by number, so messages
        # the bound pushed out while the batch was in flight are never confused with others.
        self._buffer: deque[tuple[int, Stream, Message]] = deque()
        self._next_seq = 0
        self._inflight: set[int] = set()
        self._dropped_inflight: set[int] = set()
        self._outage: _Outage | None = None
        self._recovery: Event | None = None  # to announce once Redis takes writes again
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = self._start_thread()

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._run_guarded, name=f"publisher-{self.run_id}",
                                  daemon=True)
        thread.start()
        self.stats.alive = True
        return thread

    def running(self) -> bool:
        """Whether the sending thread is alive."""
        return self._thread.is_alive()

    def ensure_running(self) -> bool:
        """Start the sending thread again if something ended it; True if it had to.

        ``publish`` calls this every time, so a dead thread is noticed at the next message
        (each training step), logged and counted (``stats.thread_restarts``), instead of
        the buffer silently filling up.
        """
        if self._thread.is_alive() or self._stop.is_set():
            return False
        with self._lock:
            if self._thread.is_alive():  # another caller already restarted it
                return False
            self.stats.alive = False
            self.stats.thread_restarts += 1
            self._inflight.clear()  # the dead thread's batch was never committed: resend
            log.error("the telemetry publisher thread of run %s had died (restart %d); "
                      "started it again, %d messages buffered", self.run_id,
                      self.stats.thread_restarts, len(self._buffer))
            self._thread = self._start_thread()
        return True

    def publish(self, stream: Stream, message: Message) -> None:
        """Queue ``message`` for ``stream``; returns at once, whatever Redis is doing."""
        with self._lock:
            if len(self._buffer) >= self.buffer_size:
                seq = self._buffer.popleft()[0]
                if seq in self._inflight:  # may still reach Redis: counted back if it does
                    self._dropped_inflight.add(seq)
                self.stats.dropped += 1
            self._buffer.append((self._next_seq, stream, message))
            self._next_seq += 1
            self.stats.published += 1
            self.stats.buffered = len(self._buffer)
            self._idle.clear()
        self.ensure_running()
        self._wake.set()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the buffer is empty (True) or the timeout passes (False)."""
        self.ensure_running()
        self._wake.set()
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flush what can be flushed within the timeout, then stop the thread."""
        flushed = self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        return flushed

    def _take_batch(self) -> list[tuple[int, Stream, Message]]:
        with self._lock:
            batch = [self._buffer[i] for i in range(min(BATCH_SIZE, len(self._buffer)))]
            self._inflight = {seq for seq, _, _ in batch}
            return batch

    def _commit(self, sent: set[int]) -> None:
        """Take the messages numbered ``sent`` out of the buffer: they are in Redis."""
        with self._lock:
            pending = set(sent)
            while self._buffer and self._buffer[0][0] in pending:
                pending.discard(self._buffer.popleft()[0])
            if pending & {seq for seq, _, _ in self._buffer}:  # a gap: some failed before
                self._buffer = deque(item for item in self._buffer if item[0] not in pending)
            # Pushed out by the bound while in flight, yet written: not lost after all.
            self.stats.dropped -= len(self._dropped_inflight & sent)
            self._dropped_inflight.clear()
            self._inflight.clear()
            self.stats.sent += len(sent)
            self.stats.buffered = len(self._buffer)

    def _settle(self) -> None:
        """Flushed: nothing buffered, and nothing left to announce."""
        with self._lock:
            if not self._buffer and self._recovery is None and \
                    self.stats.dropped <= self.stats.reported_dropped:
                self._idle.set()

    def _send(self, batch: list[tuple[int, Stream, Message]]
              ) -> tuple[list[tuple[int, Stream, Message, str]], BaseException | None]:
        """Write a batch in one round trip; returns what was written, with the new entry
        ids, and the first error reply (None: all written).

        A reply error fails only its own command: with a full memory, or a failover in the
        middle of the batch, the messages before it are in Redis and must not be sent twice.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(RUNS_KEY, self.run_id)
        for _, stream, message in batch:
            key = stream_key(self.run_id, stream)
            pipe.xadd(key, encode(message), maxlen=maxlen_for(key), approximate=True)
        replies = pipe.execute(raise_on_error=False)
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        written = [(seq, stream, message, _decoded(reply))
                   for (seq, stream, message), reply in zip(batch, replies[1:], strict=True)
                   if not isinstance(reply, Exception)]
        return written, failed

    def _report_drops(self) -> None:
        """After an overflow, say how many were lost as soon as Redis is reachable."""
        with self._lock:
            lost = self.stats.dropped - self.stats.reported_dropped
        if lost <= 0:
            return
        event = Event(run_id=self.run_id, event="events_dropped", severity="warning",
                      detail=f"{lost} telemetry messages were dropped: the publisher buffer "
                             f"({self.buffer_size}) overflowed while Redis was unreachable",
                      data={"dropped": lost, "dropped_total": self.stats.dropped})
        key = stream_key(self.run_id, Stream.EVENTS)
        self.client.xadd(key, encode(event), maxlen=maxlen_for(key), approximate=True)
        with self._lock:
            self.stats.reported_dropped += lost
        log.warning("%s", event.detail)

    def _failed(self, error: BaseException) -> None:
        """Count a failed write; log the first of an outage (not every retry)."""
        kind, text = error_kind(error), error_text(error)
        self.stats.connected = False
        self.stats.errors.append(text)
        self.stats.errors_by_kind[kind] = self.stats.errors_by_kind.get(kind, 0) + 1
        if self._outage is None:
            self._outage = _Outage(time.monotonic(), time.time(), text, kind)
            self.stats.outages += 1
            self.stats.outage_since = self._outage.wall_started
            log.warning("Redis does not take telemetry of run %s (%s); buffering (%d "
                        "messages) and retrying with back-off", self.run_id, text,
                        self.stats.buffered)

    def _recovered(self) -> None:
        """A write went through: end the outage, and queue the event that says it was."""
        self.stats.connected = True
        outage, self._outage = self._outage, None
        if outage is None:
            return
        seconds = round(time.monotonic() - outage.started, 3)
        self.stats.outage_since = None
        self.stats.last_outage_s = seconds
        detail = (f"the telemetry bus refused or missed writes for {seconds:.1f} s "
                  f"({outage.first_error}); the publisher buffered and has sent them now")
        self._recovery = Event(
            run_id=self.run_id, event="recovered", severity="warning", detail=detail,
            data={"source": "publisher", "error": outage.first_error,
                  "error_kind": outage.kind, "outage_s": seconds,
                  "since": outage.wall_started, "dropped_total": self.stats.dropped})
        log.info("Redis takes telemetry of run %s again after %.1f s (%s)", self.run_id,
                 seconds, outage.kind)

    def _announce(self) -> None:
        """Send the recovery event, if one is due; an error leaves it due for next time."""
        if self._recovery is None:
            return
        key = stream_key(self.run_id, Stream.EVENTS)
        self.client.xadd(key, encode(self._recovery), maxlen=maxlen_for(key),
                         approximate=True)
        self._recovery = None

    def _run_guarded(self) -> None:
        """The thread: ``_run``, with a last word if anything ends it unexpectedly."""
        try:
            self._run()
        except BaseException:  # logged; publish() restarts the thread
            log.exception("the telemetry publisher thread of run %s died", self.run_id)
        finally:
            self.stats.alive = False

    def _run(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            batch = self._take_batch()
            if not batch and self._recovery is None:
                if self._stop.is_set():
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            written: list[tuple[int, Stream, Message, str]] = []
            try:
                if batch:
                    written, failed = self._send(batch)
                    self._commit({seq for seq, _, _, _ in written})
                    if failed is not None:
                        raise failed
                self._recovered()
                self._announce()
                self._report_drops()
            except PUBLISH_ERRORS as error:
                self._failed(error)
                self._callbacks(written)
                if self._stop.wait(delay):
                    return
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            except Exception:  # a bug, not Redis: keep the telemetry, say so, go on
                log.exception("publisher of run %s: unexpected error; retrying",
                              self.run_id)
                self._callbacks(written)
                if self._stop.wait(RETRY_MAX_S):
                    return
                continue
            delay = RETRY_INITIAL_S
            self._settle()
            self._callbacks(written)

    def _callbacks(self, written: list[tuple[int, Stream, Message, str]]) -> None:
        if self.on_send is None:
            return
        for _, stream, message, entry_id in written:
            try:
                self.on_send(stream, message, entry_id)
            except Exception:  # a callback bug must not kill the publisher
                log.exception("publisher callback failed for %s", stream.value)


@dataclass
class Delivery:
    """One message handed to a consumer; ack it when handled."""

    key: str
    entry_id: str
    message: Message


def dead_letter_record(stream: str, entry_id: str, group: str, reason: str,
                       fields: dict[Any, Any]) -> dict[str, Any]:
    """The dead-letter stream entry for an unusable message: where, who, why, and the raw."""
    raw = fields.get(b"data", fields.get("data", b""))
    raw = raw if isinstance(raw, bytes | str) else repr(raw)
    return {"stream": stream, "id": entry_id, "group": group, "reason": reason,
            "raw": raw[:DEAD_LETTER_RAW_CHARS], "ts": str(time.time())}


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable (milliseconds, sequence) pair: ids of different streams
    compare by the Redis time they were written at."""
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


def _decoded(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Consumer:
    """A consumer-group reader over one or more stream keys."""

    def __init__(self, client: redis.Redis, keys: dict[str, Stream], group: str, name: str,
                 claim_idle_ms: int = 30_000):
        self.client = client
        self.keys = keys  # stream key -> which schema it carries
        self.group = group
        self.name = name
        self.claim_idle_ms = claim_idle_ms
        self.dead_lettered = 0
        self._ensured: set[str] = set()

    def renewed(self) -> Consumer:
        """A fresh consumer over the same keys, group and name, keeping the dead-letter count;
        it creates the groups again on first use (after a stream was deleted under us)."""
        fresh = Consumer(self.client, dict(self.keys), self.group, self.name,
                         claim_idle_ms=self.claim_idle_ms)
        fresh.dead_lettered = self.dead_lettered
        return fresh

    def add_key(self, key: str, stream: Stream) -> None:
        """Also read ``key`` from now on (e.g. a run that appeared after start)."""
        self.keys[key] = stream

    def _ensure_groups(self) -> None:
        for key in self.keys:
            if key in self._ensured:
                continue
            try:
                self.client.xgroup_create(key, self.group, id="0", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
            self._ensured.add(key)

    def _parse(self, key: str, entry_id: str, fields: dict) -> Delivery | None:
        try:
            message = decode(fields, SCHEMAS[self.keys[key]])
        except MessageError as error:
            self.dead_letter(key, entry_id, fields, error.reason)
            return None
        return Delivery(key, entry_id, message)

    def dead_letter(self, key: str, entry_id: str, fields: dict, reason: str) -> None:
        """Move an entry to the dead-letter stream with ``reason`` and ack it."""
        record = dead_letter_record(key, entry_id, self.group, reason, fields)
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(DEAD_LETTER_STREAM, record, maxlen=maxlen_for(DEAD_LETTER_STREAM),
                  approximate=True)
        pipe.xack(key, self.group, entry_id)
        pipe.execute()
        self.dead_lettered += 1
        log.warning("dead-lettered %s %s: %s", key, entry_id, reason)

    def poll(self, block_ms: int | None = 1000, count: int = 100) -> list[Delivery]:
        """New entries for this consumer, parsed; waits up to ``block_ms`` (None: no wait)."""
        self._ensure_groups()
        if not self.keys:
            time.sleep((block_ms or 0) / 1000)
            return []
        response = self.client.xreadgroup(self.group, self.name, dict.fromkeys(self.keys, ">"),
                                          count=count, block=block_ms)
        deliveries = []
        for key, entries in response or []:
            key = _decoded(key)
            for entry_id, fields in entries:
                delivery = self._parse(key, _decoded(entry_id), fields)
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    def claim_page(self, after: dict[str, str], count: int = 100,
                   ) -> tuple[list[Delivery], dict[str, str]]:
        """One page of entries other consumers of the group read but never acked (they died),
        idle for at least ``claim_idle_ms``, now claimed by this one.

        ``after`` maps each stream key to the XAUTOCLAIM cursor to go on from (``"0-0"`` to
        start); returns the page and the cursors of the next one, without the keys whose
        pending list was scanned to the end: an empty dict means there is nothing more.
        """
        self._ensure_groups()
        deliveries: list[Delivery] = []
        cursors: dict[str, str] = {}
        for key, start in after.items():
            if key not in self.keys:
                continue
            # Entries deleted while pending come back in the third element; Redis has already
            # dropped them from the pending list, so they need nothing from us.
            next_start, entries, *_ = self.client.xautoclaim(
                key, self.group, self.name, self.claim_idle_ms, start_id=start, count=count)
            for entry_id, fields in entries:
                if fields is None:  # Redis before 7 returns deleted entries like this
                    continue
                delivery = self._parse(key, _decoded(entry_id), fields)
                if delivery is not None:
                    deliveries.append(delivery)
            if _decoded(next_start) != "0-0":
                cursors[key] = _decoded(next_start)
        return deliveries, cursors

    def claim_stale(self, count: int = 100) -> list[Delivery]:
        """Every entry another consumer of the group read but never acked (it died)."""
        deliveries: list[Delivery] = []
        cursors = dict.fromkeys(self.keys, "0-0")
        while cursors:
            page, cursors = self.claim_page(cursors, count)
            deliveries.extend(page)
        return deliveries

    def pending_page(self, after: dict[str, str], count: int = 100,
                     ) -> tuple[list[Delivery], dict[str, str]]:
        """One page of this consumer's own delivered-but-unacked entries (after its restart).

        ``after`` maps each stream key to the last entry id already seen (``"0"`` to start);
        returns the page and the cursors of the next one, without the keys whose pending
        entries were all read: an empty dict means there is nothing more. Paging by cursor,
        not by acking, so a page whose entries stay pending (a handler that failed) is not
        read again and again, and every page after the first is reached.
        """
        self._ensure_groups()
        keys = {key: start for key, start in after.items() if key in self.keys}
        if not keys:
            return [], {}
        response = self.client.xreadgroup(self.group, self.name, keys, count=count)
        deliveries: list[Delivery] = []
        cursors: dict[str, str] = {}
        gone: dict[str, list[str]] = {}
        for key, entries in response or []:
            key = _decoded(key)
            for entry_id, fields in entries:
                entry_id = _decoded(entry_id)
                if not fields:  # deleted (trimmed) while pending: nothing left to hand out
                    gone.setdefault(key, []).append(entry_id)
                    continue
                delivery = self._parse(key, entry_id, fields)
                if delivery is not None:
                    deliveries.append(delivery)
            if len(entries) >= count:  # a full page: there may be more after its last entry
                cursors[key] = _decoded(entries[-1][0])
        if gone:
            pipe = self.client.pipeline(transaction=False)
            for key, ids in gone.items():
                pipe.xack(key, self.group, *ids)
            pipe.execute()
        return deliveries, cursors

    def pending(self, count: int = 100) -> list[Delivery]:
        """The first page of this consumer's own delivered-but-unacked entries."""
        return self.pending_page(dict.fromkeys(self.keys, "0"), count)[0]

    def ack(self, *deliveries: Delivery) -> None:
        """Mark ``deliveries`` handled: one XACK per stream, in one round trip."""
        by_key: dict[str, list[str]] = {}
        for delivery in deliveries:
            by_key.setdefault(delivery.key, []).append(delivery.entry_id)
        pipe = self.client.pipeline(transaction=False)
        for key, ids in by_key.items():
            pipe.xack(key, self.group, *ids)
        pipe.execute()
