"""The scoring outbox: every attention snapshot the trainer publishes gets its report.

Celery over Redis is at-least-once only once a worker has a task in its unacked set: a
worker killed between popping a message off the queue and recording it as unacked (a
window in kombu's Redis transport) loses that message for good, and the broker never
learns of it. The sender is the one party that knows what should have been scored, so it
keeps what it sent until the report's marker (``diagnostics_done_key``, set atomically with
the report) shows up, and sends again what is still unscored once the broker could no
longer be holding it (visibility timeout plus the task time limit). Scoring is idempotent
per snapshot, so a resend that races a slow first delivery publishes nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from services.core.streams import diagnostics_done_key
from services.core.tasks import TASK_TIME_LIMIT_S, visibility_timeout

log = logging.getLogger(__name__)

# Past the broker's redelivery (visibility timeout) and the longest a task may run, plus
# time for the worker to pick the redelivered task up: by then an unscored snapshot is lost.
RESEND_MARGIN_S = 60.0
MAX_RESENDS = 3  # a snapshot still unscored after this many is dropped with a warning
MAX_PENDING = 10_000  # a run without any worker must not grow the outbox without bound

Send = Callable[[str, str], None]  # (run_id, entry_id): enqueue the scoring task
IsScored = Callable[[str, str], bool]  # (run_id, snapshot_id): has the report been published


@dataclass
class Pending:
    """One snapshot sent for scoring and not yet confirmed."""

    run_id: str
    entry_id: str
    snapshot_id: str
    sent_at: float
    resends: int = 0


@dataclass
class OutboxStats:
    """What the outbox has done so far (for logs and tests); ``pending`` as of reading."""

    sent: int = 0
    confirmed: int = 0
    resent: int = 0
    abandoned: int = 0
    send_errors: int = 0
    pending: int = 0


def default_resend_after_s() -> float:
    """How long an unscored snapshot waits before it is sent again (see the module doc)."""
    return visibility_timeout() + TASK_TIME_LIMIT_S + RESEND_MARGIN_S


@dataclass
class ScoringOutbox:
    """Sends scoring tasks and sends again those whose report never appeared.

    ``submit`` is called from the publisher's thread; ``reconcile`` from the outbox's own
    thread (``start``) or directly (tests). Both are safe to call concurrently.
    """

    send: Send
    is_scored: IsScored
    resend_after_s: float = field(default_factory=default_resend_after_s)
    max_resends: int = MAX_RESENDS
    clock: Callable[[], float] = time.monotonic
    _counts: OutboxStats = field(default_factory=OutboxStats, repr=False)
    _pending: dict[str, Pending] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def stats(self) -> OutboxStats:
        """The running totals and the snapshots still pending, as of now (a copy)."""
        with self._lock:
            return replace(self._counts, pending=len(self._pending))

    def submit(self, run_id: str, entry_id: str, snapshot_id: str) -> None:
        """Send the scoring task for a stored snapshot and remember it until it is scored.

        A failed send is remembered too: the next reconcile sends it again.
        """
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                oldest = min(self._pending.values(), key=lambda p: p.sent_at)
                del self._pending[oldest.snapshot_id]
                self._counts.abandoned += 1
                log.warning("scoring outbox full: gave up on snapshot %s", oldest.entry_id)
            pending = Pending(run_id, entry_id, snapshot_id, self.clock())
            self._pending[snapshot_id] = pending
            self._counts.sent += 1
        if not self._send(run_id, entry_id):
            with self._lock:  # overdue at once: the next reconcile sends it
                pending.sent_at -= self.resend_after_s

    def reconcile(self) -> OutboxStats:
        """Forget the scored, send again the overdue unscored; the running totals."""
        now = self.clock()
        with self._lock:
            overdue = [p for p in self._pending.values()
                       if now - p.sent_at >= self.resend_after_s]
        for pending in overdue:
            try:
                scored = self.is_scored(pending.run_id, pending.snapshot_id)
            except Exception as error:  # Redis down: ask again next time
                log.warning("could not check snapshot %s: %s", pending.entry_id, error)
                continue
            with self._lock:
                if scored:
                    self._pending.pop(pending.snapshot_id, None)
                    self._counts.confirmed += 1
                    continue
                if pending.resends >= self.max_resends:
                    self._pending.pop(pending.snapshot_id, None)
                    self._counts.abandoned += 1
                    log.warning("snapshot %s of run %s still unscored after %d resends: "
                                "giving up (is a diagnostics worker running?)",
                                pending.entry_id, pending.run_id, pending.resends)
                    continue
                pending.resends += 1
                pending.sent_at = now
                self._counts.resent += 1
            log.info("snapshot %s unscored after %.0f s: sent again (%d/%d)",
                     pending.entry_id, self.resend_after_s, pending.resends, self.max_resends)
            self._send(pending.run_id, pending.entry_id)
        return self.stats

    def start(self, interval_s: float | None = None) -> None:
        """Reconcile in a daemon thread every ``interval_s`` (a quarter of the resend delay)."""
        if self._thread is not None:
            return
        interval = interval_s or max(1.0, self.resend_after_s / 4)
        self._thread = threading.Thread(target=self._run, args=(interval,),
                                        name="scoring-outbox", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the reconcile thread; snapshots still unconfirmed are only logged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._lock:
            if self._pending:
                log.info("scoring outbox closed with %d snapshot(s) not yet confirmed",
                         len(self._pending))

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.reconcile()
            except Exception:  # the thread must outlive any one bad pass
                log.exception("scoring outbox reconcile failed")

    def _send(self, run_id: str, entry_id: str) -> bool:
        try:
            self.send(run_id, entry_id)
        except Exception as error:  # the broker is Redis too; it may be going down
            with self._lock:
                self._counts.send_errors += 1
            log.warning("could not enqueue scoring of %s: %s", entry_id, error)
            return False
        return True


def redis_outbox(redis_url: str, resend_after_s: float | None = None,
                 queue: str | None = None) -> ScoringOutbox:
    """An outbox sending ``SCORE_ALIGNMENT`` by name to the diagnostics queue (``queue`` or
    the configured one) of ``redis_url`` and checking the report markers in the same Redis."""
    from services.core.bus import connect
    from services.core.tasks import SCORE_ALIGNMENT, diagnostics_queue, make_client

    queue = queue or diagnostics_queue()
    app = make_client(redis_url, queue=queue)
    client = connect(redis_url)

    def send(run_id: str, entry_id: str) -> None:
        app.send_task(SCORE_ALIGNMENT, args=[run_id, entry_id], queue=queue)

    def is_scored(run_id: str, snapshot_id: str) -> bool:
        return bool(client.exists(diagnostics_done_key(run_id, snapshot_id)))

    return ScoringOutbox(send, is_scored, default_resend_after_s() if resend_after_s is None
                         else resend_after_s)
