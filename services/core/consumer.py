"""The one loop that reads every run's streams through a consumer group, for every service.

The tuner, the notifier feed and the MLflow sink differ only in what they do with a batch of
entries; how they find runs, recover and ride out outages is ``RunStreamReader``'s:

* runs: the ids in the runs set (``RUNS_KEY``), looked at every ``discover_every_s``, or a
  fixed list; each new run's streams join the read, with their consumer groups. A run that
  left the runs set (retention expired it, services.core.retention) leaves the read, and
  ``on_drop`` tells the service to forget it.
* recovery, at start and after every failure: first all of this consumer's own pending
  entries (paged by cursor through every page, not just the first), then the entries dead
  consumers of the group left pending longer than ``claim_idle_ms`` (XAUTOCLAIM), which are
  claimed again every ``claim_every_s``.
* new entries, ``poll_count`` at a time, waiting up to ``block_ms`` for them.
* a dropped connection (or an error the service names as passing): bounded exponential
  back-off, logged once when the outage starts and once when it ends; what was read but
  not acked is read again by the recovery that follows.
* a deleted stream or consumer group (NOGROUP): the groups are created again.
* entries that do not parse go to the dead-letter stream (``Consumer.dead_letter``).

``step`` is one read, for callers that drive the loop themselves (tests, ``--once``);
``run`` is the loop for a thread, ``run_async`` the same loop for an asyncio service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import redis

from services.core.bus import CONNECTION_ERRORS, Consumer, Delivery
from services.core.runstore import RunStore
from services.core.streams import Stream, stream_key, validate_run_id

log = logging.getLogger(__name__)

DISCOVER_EVERY_S = 2.0  # how soon a new run is read
BLOCK_MS = 1000  # a poll waits this long for new entries
POLL_COUNT = 200  # entries per stream per read
CLAIM_IDLE_MS = 30_000  # a peer's pending entry this old is taken to be a dead peer's
CLAIM_EVERY_S = 30.0
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
# Redis error texts that mean a watched stream or its group was deleted while we read it.
GROUP_GONE = ("NOGROUP", "UNBLOCKED")

Handler = Callable[[list[Delivery]], object]
AsyncHandler = Callable[[list[Delivery]], Awaitable[object]]


@dataclass(frozen=True)
class LoopSettings:
    """The loop's intervals and sizes; services override single ones with ``replace``."""

    discover_every_s: float = DISCOVER_EVERY_S
    block_ms: int = BLOCK_MS
    poll_count: int = POLL_COUNT
    claim_idle_ms: int = CLAIM_IDLE_MS
    claim_every_s: float = CLAIM_EVERY_S
    retry_initial_s: float = RETRY_INITIAL_S
    retry_max_s: float = RETRY_MAX_S

    def __post_init__(self) -> None:
        if self.poll_count < 1 or self.claim_idle_ms < 1 or self.block_ms < 0:
            raise ValueError(f"poll_count and claim_idle_ms must be at least 1, block_ms "
                             f"not negative: {self}")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError(f"need 0 < retry_initial_s <= retry_max_s: {self}")


class Backoff:
    """Bounded exponential waits through one outage, announced when it starts and ends."""

    def __init__(self, initial_s: float, max_s: float, who: str):
        self.initial_s = initial_s
        self.max_s = max_s
        self.who = who
        self.delay_s = initial_s
        self.failures = 0
        self._reason: str | None = None
        self._since = 0.0

    def failed(self, reason: str, error: BaseException) -> float:
        """Record a failure; returns how long to wait before the next try."""
        if self._reason != reason:  # a new outage, or a different one: say so, once
            log.warning("%s: %s, retrying with back-off (up to %.0fs): %s", self.who, reason,
                        self.max_s, error)
            if self.failures == 0:
                self._since = time.monotonic()
            self._reason = reason
        else:
            log.debug("%s: still %s: %s", self.who, reason, error)
        self.failures += 1
        delay, self.delay_s = self.delay_s, min(self.max_s, self.delay_s * 2)
        return delay

    def succeeded(self) -> None:
        """A round went through: end the outage (and say so) if there was one."""
        if self.failures:
            log.info("%s: back after %s (%d retries, %.1fs)", self.who, self._reason,
                     self.failures, time.monotonic() - self._since)
        self.delay_s = self.initial_s
        self.failures = 0
        self._reason = None


class RunStreamReader:
    """Reads ``streams`` of every run through consumer group ``group`` as consumer ``name``.

    ``sources`` maps each stream key read to its (run id, stream); ``on_run`` is called
    with each new run before its streams are read (a failure there leaves the run for the
    next discovery); ``on_drop`` with each run that left the runs set, after its streams
    left the read.
    """

    def __init__(self, client: redis.Redis, group: str, name: str, streams: Iterable[Stream],
                 settings: LoopSettings | None = None, runs: Iterable[str] | None = None,
                 on_run: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[str], None] | None = None):
        self.client = client
        self.settings = settings or LoopSettings()
        self.streams = tuple(streams)
        # None: the runs set decides; else only these (one-run services, tests).
        self.fixed_runs = [validate_run_id(r) for r in runs] if runs is not None else None
        self.on_run = on_run
        self.on_drop = on_drop
        self.clock = clock
        self.consumer = Consumer(client, {}, group, name,
                                 claim_idle_ms=self.settings.claim_idle_ms)
        self.runs: list[str] = []
        self.sources: dict[str, tuple[str, Stream]] = {}
        self._store = RunStore(client)
        self._last_discovery = -float("inf")
        self._last_claim = -float("inf")
        # Cursors of the backlog being read; None when not reading that part of it.
        self._own: dict[str, str] | None = {}  # own pending entries: at start, then on failure
        self._claims: dict[str, str] | None = None  # dead consumers' entries

    @property
    def recovering(self) -> bool:
        """Whether own pending or stale entries may be left before new ones are read."""
        return self._own is not None or self._claims is not None

    def discover(self) -> list[str]:
        """Start reading runs not seen before, stop reading runs that left the runs set;
        returns the ids of the new ones."""
        self._last_discovery = self.clock()
        known = self.fixed_runs if self.fixed_runs is not None else self._store.run_ids()
        if self.fixed_runs is None:
            for run_id in set(self.runs) - set(known):
                self.drop(run_id)
        added = []
        for run_id in known:
            if run_id in self.runs:
                continue
            if self.on_run is not None:
                self.on_run(run_id)
            for stream in self.streams:
                key = stream_key(run_id, stream)
                self.consumer.add_key(key, stream)
                self.sources[key] = (run_id, stream)
                if self._own is not None:  # recovering: its own pending entries too
                    self._own.setdefault(key, "0")
            self.runs.append(run_id)
            added.append(run_id)
            log.info("%s/%s: reading run %s", self.consumer.group, self.consumer.name, run_id)
        return added

    def drop(self, run_id: str) -> None:
        """Stop reading ``run_id``'s streams (its pending entries are left to expire with
        them) and tell the service (``on_drop``)."""
        for key in [key for key, (owner, _) in self.sources.items() if owner == run_id]:
            del self.sources[key]
            self.consumer.keys.pop(key, None)
            for cursors in (self._own, self._claims):
                if cursors is not None:
                    cursors.pop(key, None)
        self.runs.remove(run_id)
        log.info("%s/%s: run %s left the runs set, no longer read", self.consumer.group,
                 self.consumer.name, run_id)
        if self.on_drop is not None:
            self.on_drop(run_id)

    def recover(self) -> None:
        """Read own pending entries again, then stale ones, before new ones (after a failure
        what was read but not acked is still ours)."""
        self._own = dict.fromkeys(self.consumer.keys, "0")
        self._claims = None

    def renew(self) -> None:
        """A fresh consumer over the same keys, creating the groups again; then recover."""
        self.consumer = self.consumer.renewed()
        self.recover()

    def step(self, block_ms: int | None) -> list[Delivery]:
        """One read: the next page of the backlog while there is one, else new entries,
        waiting up to ``block_ms`` for them (None: not at all). Discovers runs when due."""
        now = self.clock()
        if now - self._last_discovery >= self.settings.discover_every_s:
            self.discover()
        if not self.recovering and now - self._last_claim >= self.settings.claim_every_s:
            self._claims = dict.fromkeys(self.consumer.keys, "0-0")
        backlog = self._backlog()
        if backlog:
            return backlog
        return self.consumer.poll(block_ms, self.settings.poll_count)

    def _backlog(self) -> list[Delivery]:
        """The next non-empty page of own pending entries, then of claimed stale ones."""
        count = self.settings.poll_count
        while self._own:
            page, self._own = self.consumer.pending_page(self._own, count)
            if page:
                return page
        if self._own is not None:  # own entries done: now those dead consumers left
            self._own = None
            self._claims = dict.fromkeys(self.consumer.keys, "0-0")
        while self._claims:
            page, self._claims = self.consumer.claim_page(self._claims, count)
            if page:
                return page
        if self._claims is not None:
            self._claims = None
            self._last_claim = self.clock()
        return []

    def failed(self, error: Exception, backoff: Backoff,
               retry_on: tuple[type[BaseException], ...] = ()) -> float:
        """Deal with a round's error: returns how long to wait, or raises it when it is not
        one the loop rides out (a bug)."""
        if isinstance(error, CONNECTION_ERRORS):
            # Renewed, not just recovering: a Redis restarted empty (or failed over) has lost
            # the groups, and creating them at once spares a NOGROUP round.
            self.renew()
            return backoff.failed("Redis unreachable", error)
        if isinstance(error, redis.ResponseError) and any(
                mark in str(error) for mark in GROUP_GONE):
            self.renew()
            return backoff.failed("a watched stream or its group was deleted, creating the "
                                  "groups again", error)
        if retry_on and isinstance(error, retry_on):
            self.recover()
            return backoff.failed(type(error).__name__, error)
        raise error

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_initial_s, self.settings.retry_max_s,
                       f"{self.consumer.group}/{self.consumer.name}")

    def run(self, stop: threading.Event, handle: Handler,
            retry_on: tuple[type[BaseException], ...] = ()) -> None:
        """Read and ``handle`` batches until ``stop`` is set; ``handle`` gets every round's
        batch, empty ones too, and acks what it handled. ``retry_on``: errors of the
        handler to back off on and retry, like a dropped connection."""
        backoff = self._backoff()
        while not stop.is_set():
            try:
                handle(self.step(self.settings.block_ms))
            except Exception as error:
                stop.wait(self.failed(error, backoff, retry_on))
                continue
            backoff.succeeded()

    async def run_async(self, stop: asyncio.Event, handle: AsyncHandler,
                        retry_on: tuple[type[BaseException], ...] = ()) -> None:
        """``run`` for an asyncio service: reads in a worker thread, awaits ``handle``."""
        backoff = self._backoff()
        while not stop.is_set():
            try:
                deliveries = await asyncio.to_thread(self.step, self.settings.block_ms)
                await handle(deliveries)
            except Exception as error:
                delay = self.failed(error, backoff, retry_on)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            backoff.succeeded()
