"""Retention: a run that ended (finished or stopped) and has written nothing for
``retention_days`` leaves Redis.

Expired, not archived: an archive inside Redis would grow just the same, and the lasting
record of a run is elsewhere (its run folder, and MLflow when the sink runs). What goes is
everything under ``smart-tuner:<run>:``: its streams, the tuner's keys, the stored picture.

How, so that no reader re-creates what is deleted: the run leaves the runs set first, and
its keys get an expiry of ``grace_s`` instead of being deleted at once. Every reader looks
at the runs set every few seconds (``consumer.DISCOVER_EVERY_S``) and lets go of a run that
left it, well within the grace; a reader still polling a deleted stream would otherwise
create it again, empty, with its consumer group, never to be swept. A run that comes back
within the grace (its trainer resumed it: the publisher adds it to the runs set again)
gets its keys' expiry removed by the next sweep.

``expired_runs`` is the pure rule; ``RetentionSweeper`` the Redis side. The tuner runs a
sweep every ``SWEEP_EVERY_S``; sweeps are idempotent, so a standby tuner sweeping too is
harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from services.core.bus import entry_order
from services.core.runstore import RunStore
from services.core.schemas import Event, MessageError, decode
from services.core.streams import PREFIX, RUNS_KEY, Stream, stream_key

log = logging.getLogger(__name__)

DAY_S = 24 * 3600.0
SWEEP_EVERY_S = 300.0
EXPIRE_GRACE_S = 3600  # far beyond a reader's discovery interval (seconds)
ENDED_EVENTS = frozenset({"finished", "stopped"})
# The streams whose newest entry says when a run last did anything. Not the attention
# stream: its entries are megabytes, and a snapshot never comes without metrics.
ACTIVITY_STREAMS = tuple(stream for stream in Stream if stream is not Stream.ATTENTION)
SCAN_COUNT = 500


@dataclass(frozen=True)
class RunActivity:
    """What retention needs to know of a run."""

    run_id: str
    last_entry_ms: int | None  # Redis time of its newest entry; None: it has none
    ended: bool  # its newest event is finished or stopped


def expired_runs(runs: Iterable[RunActivity], now_ms: int, retention_s: float) -> list[str]:
    """The runs that ended and have written nothing for ``retention_s``."""
    cutoff = now_ms - int(retention_s * 1000)
    return [run.run_id for run in runs
            if run.ended and run.last_entry_ms is not None and run.last_entry_ms < cutoff]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RetentionSweeper:
    """Expires ended runs past the retention (see the module docstring)."""

    def __init__(self, client: redis.Redis, retention_s: float,
                 grace_s: int = EXPIRE_GRACE_S, clock: Callable[[], float] = time.time):
        if retention_s <= 0 or grace_s < 1:
            raise ValueError("retention_s must be positive and grace_s at least 1")
        self.client = client
        self.retention_s = retention_s
        self.grace_s = grace_s
        self.clock = clock
        self.store = RunStore(client)
        # Runs whose keys were given an expiry: watched for a comeback until it is due.
        self.expiring: dict[str, float] = {}

    def activity(self, run_ids: list[str]) -> list[RunActivity]:
        """Each run's newest entry time and whether its newest event ended it (one round
        trip for all runs)."""
        pipe = self.client.pipeline(transaction=False)
        for run_id in run_ids:
            for stream in ACTIVITY_STREAMS:
                pipe.xrevrange(stream_key(run_id, stream), count=1)
        replies = pipe.execute()
        per_run = len(ACTIVITY_STREAMS)
        events_at = ACTIVITY_STREAMS.index(Stream.EVENTS)
        runs = []
        for index, run_id in enumerate(run_ids):
            newest = replies[index * per_run:(index + 1) * per_run]
            times = [entry_order(_text(reply[0][0]))[0] for reply in newest if reply]
            ended = False
            if newest[events_at]:
                try:
                    event = decode(newest[events_at][0][1], Event)
                    ended = isinstance(event, Event) and event.event in ENDED_EVENTS
                except MessageError:
                    ended = False  # unreadable: keep the run rather than guess
            runs.append(RunActivity(run_id, max(times) if times else None, ended))
        return runs

    def sweep(self) -> list[str]:
        """Expire the ended runs past the retention; returns their ids."""
        now = self.clock()
        run_ids = self.store.run_ids()
        self._keep_comebacks(set(run_ids), now)
        expired = expired_runs(self.activity(run_ids), int(now * 1000), self.retention_s)
        for run_id in expired:
            self.expire(run_id)
            self.expiring[run_id] = now + self.grace_s
        return expired

    def expire(self, run_id: str) -> int:
        """Take ``run_id`` out of the runs set, then let its keys expire in ``grace_s``;
        returns how many keys."""
        self.client.srem(RUNS_KEY, run_id)
        keys = list(self.client.scan_iter(match=f"{PREFIX}:{run_id}:*", count=SCAN_COUNT))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.expire(key, self.grace_s)
        pipe.execute()
        log.info("run %s ended over %.1f days ago: out of the runs set, its %d keys expire "
                 "in %ds", run_id, self.retention_s / DAY_S, len(keys), self.grace_s)
        return len(keys)

    def _keep_comebacks(self, known: set[str], now: float) -> None:
        """A run expiring that is back in the runs set keeps its keys (PERSIST)."""
        for run_id, due in list(self.expiring.items()):
            if due <= now:
                del self.expiring[run_id]
            elif run_id in known:
                del self.expiring[run_id]
                keys = list(self.client.scan_iter(match=f"{PREFIX}:{run_id}:*",
                                                  count=SCAN_COUNT))
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.persist(key)
                pipe.execute()
                log.warning("run %s came back while expiring: its %d keys are kept", run_id,
                            len(keys))
