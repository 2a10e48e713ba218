"""The notifier's reader of the run streams: messages in, reports out to every allowed chat.

A consumer group (``notifier``) over each run's metrics, diagnostics, actions and events
streams, so a restarted notifier goes on where it stopped and reports what came meanwhile.
Messages older than ``catch_up_s`` when first read only update the planner's memory: a
notifier started on a week-old run catches up silently instead of replaying a week of
reports. An entry is acked once its notices are queued in the outbox, which keeps retrying
them; the outbox counts what finally fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import redis

from services.core.bus import CONNECTION_ERRORS, Consumer, Delivery, entry_order
from services.core.metrics import DeadLetterCounter
from services.core.runstore import RunStore
from services.core.schemas import MessageError
from services.core.streams import Stream, stream_key
from services.diagnostics.plots import latest_alignment_png
from services.notifier.delivery import Outbox
from services.notifier.planner import Notice, ReportPlanner

log = logging.getLogger(__name__)

GROUP = "notifier"
INPUT_STREAMS = (Stream.METRICS, Stream.DIAGNOSTICS, Stream.ACTIONS, Stream.EVENTS)
DISCOVER_EVERY_S = 2.0
RETRY_MAX_S = 30.0
POLL_COUNT = 200


class ReportFeed:
    """Reads every run's streams, asks the planner, queues the notices for each chat."""

    def __init__(self, client: redis.Redis, planner: ReportPlanner, outbox: Outbox,
                 chat_ids: Sequence[int], catch_up_s: float = 300.0, name: str = "notifier-1",
                 block_ms: int = 1000, dead_letters: DeadLetterCounter | None = None):
        self.client = client
        self.store = RunStore(client)
        self.planner = planner
        self.outbox = outbox
        self.chat_ids = tuple(chat_ids)
        self.catch_up_s = catch_up_s
        self.block_ms = block_ms
        self.consumer = Consumer(client, {}, GROUP, name)
        self.dead_letters = dead_letters
        self.runs: set[str] = set()
        self.started_at = time.time()
        self.notices_sent = 0
        self.notices_suppressed = 0
        self._last_discovery = -float("inf")
        self._recovered = False

    def discover(self) -> list[str]:
        """Start reading runs not seen before; returns their ids."""
        added = [run_id for run_id in self.store.run_ids() if run_id not in self.runs]
        for run_id in added:
            for stream in INPUT_STREAMS:
                self.consumer.add_key(stream_key(run_id, stream), stream)
            self.runs.add(run_id)
            log.info("reporting on run %s", run_id)
        return added

    def read(self) -> list[Delivery]:
        """One blocking read: own pending entries first after a (re)start, then new ones."""
        now = time.monotonic()
        if now - self._last_discovery >= DISCOVER_EVERY_S:
            self.discover()
            self._last_discovery = now
        if not self._recovered:
            self._recovered = True
            pending = self.consumer.pending(POLL_COUNT)
            if pending:
                return pending
        return self.consumer.poll(self.block_ms, POLL_COUNT)

    async def handle(self, deliveries: list[Delivery]) -> int:
        """Plan and queue the notices of ``deliveries`` (in entry order), then ack them."""
        deliveries = sorted(deliveries, key=lambda delivery: entry_order(delivery.entry_id))
        sent = 0
        for delivery in deliveries:
            notices = self.planner.observe(delivery.message)
            if delivery.message.ts < self.started_at - self.catch_up_s:
                self.notices_suppressed += len(notices)
                notices = []
            for notice in notices:
                await self.send(notice)
                sent += 1
        if deliveries:  # their notices are queued: one round trip acks the batch
            await asyncio.to_thread(self.consumer.ack, *deliveries)
        for notice in self.planner.tick():
            await self.send(notice)
            sent += 1
        if self.dead_letters is not None:
            self.dead_letters.sync(self.consumer.dead_lettered)
        return sent

    async def send(self, notice: Notice) -> None:
        """Queue ``notice`` for every chat: the text, then the picture if it has one."""
        png = None
        if notice.picture:
            try:
                png = await asyncio.to_thread(latest_alignment_png, self.store, notice.run_id)
            except MessageError as error:
                log.warning("run %s: no picture, snapshot does not decode: %s",
                            notice.run_id, error.reason)
        for chat_id in self.chat_ids:
            self.outbox.send_text(chat_id, notice.text)
            if png is not None:
                self.outbox.send_photo(chat_id, png, filename=f"{notice.run_id}-alignment.png")
        self.notices_sent += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Read and report until ``stop`` is set; rides out Redis outages with back-off."""
        delay = 0.5
        while not stop.is_set():
            try:
                deliveries = await asyncio.to_thread(self.read)
                await self.handle(deliveries)
            except CONNECTION_ERRORS as error:
                log.warning("Redis unreachable, retrying in %.1fs: %s", delay, error)
                self._recovered = False  # what was read but not acked is still ours
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                # A run's stream was deleted under us: read the same keys with fresh groups.
                log.warning("a watched stream vanished, re-creating consumer groups: %s", error)
                self.consumer = self.consumer.renewed()
                continue
            delay = 0.5
