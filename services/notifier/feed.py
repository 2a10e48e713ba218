"""The notifier's reader of the run streams: messages in, reports out to every allowed chat.

A consumer group (``notifier``) over each run's metrics, diagnostics, actions and events
streams, read by the shared loop (``services.core.consumer``), so a restarted notifier goes
on where it stopped and reports what came meanwhile, every pending page of it.
Messages older than ``catch_up_s`` when first read only update the planner's memory: a
notifier started on a week-old run catches up silently instead of replaying a week of
reports. An entry is acked once its notices are queued in the outbox, which keeps retrying
them; the outbox counts what finally fails.

A supervised proposal goes out with Approve / Reject buttons; the buttons carry a short
token that RunStore maps back to the run and the action (see ``bot.on_approval_answer``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import redis

from services.core.bus import Consumer, Delivery, entry_order
from services.core.consumer import BLOCK_MS, LoopSettings, RunStreamReader
from services.core.metrics import DeadLetterCounter
from services.core.runstore import RunStore
from services.core.schemas import MessageError
from services.core.streams import Stream
from services.diagnostics.plots import latest_alignment_png
from services.notifier.bot import approval_markup
from services.notifier.delivery import Outbox
from services.notifier.planner import Notice, ReportPlanner

log = logging.getLogger(__name__)

GROUP = "notifier"
# How long an approval button's token is kept: well past any proposal's deadline, so a late
# press is told how the proposal ended instead of "unknown".
APPROVAL_TOKEN_TTL_S = 7 * 24 * 3600.0
INPUT_STREAMS = (Stream.METRICS, Stream.DIAGNOSTICS, Stream.ACTIONS, Stream.EVENTS,
                 Stream.VERDICT)


class ReportFeed:
    """Reads every run's streams, asks the planner, queues the notices for each chat."""

    def __init__(self, client: redis.Redis, planner: ReportPlanner, outbox: Outbox,
                 chat_ids: Sequence[int], catch_up_s: float = 300.0, name: str = "notifier-1",
                 block_ms: int = BLOCK_MS, dead_letters: DeadLetterCounter | None = None):
        self.client = client
        self.store = RunStore(client)
        self.planner = planner
        self.outbox = outbox
        self.chat_ids = tuple(chat_ids)
        self.catch_up_s = catch_up_s
        # A run retention expired leaves the planner too.
        self.reader = RunStreamReader(client, GROUP, name, INPUT_STREAMS,
                                      replace(LoopSettings(), block_ms=block_ms),
                                      on_drop=planner.forget)
        self.dead_letters = dead_letters
        self.started_at = time.time()
        self.notices_sent = 0
        self.notices_suppressed = 0

    @property
    def consumer(self) -> Consumer:
        """The reader's consumer (a fresh one after an outage or a deleted stream)."""
        return self.reader.consumer

    @property
    def runs(self) -> list[str]:
        """The runs reported on."""
        return self.reader.runs

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
        markup = None
        if notice.proposal is not None:
            token = await asyncio.to_thread(self.store.approval_token, notice.run_id,
                                            notice.proposal, APPROVAL_TOKEN_TTL_S)
            markup = approval_markup(self.planner.language, token)
        for chat_id in self.chat_ids:
            if markup is None:
                self.outbox.send_text(chat_id, notice.text)
            else:
                self.outbox.send_text(chat_id, notice.text, reply_markup=markup)
            if png is not None:
                self.outbox.send_photo(chat_id, png, filename=f"{notice.run_id}-alignment.png")
        self.notices_sent += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Read and report until ``stop`` is set; the reader rides out Redis outages."""
        await self.reader.run_async(stop, self.handle)
