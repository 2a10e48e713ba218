"""The scoring outbox: what it sends again, when, and when it gives up.

Pure logic against a hand-driven clock; the real thing against a real worker is in
tests/chaos/test_worker_kill.py (a worker SIGKILLed with tasks in flight).
"""

from __future__ import annotations

import pytest

from services.core.tasks import TASK_TIME_LIMIT_S, VISIBILITY_TIMEOUT_ENV
from services.trainer.scoring import (
    MAX_PENDING,
    RESEND_MARGIN_S,
    ScoringOutbox,
    default_resend_after_s,
    redis_outbox,
)


class Broker:
    """Records sends; ``scored`` is what the worker has published; ``down`` fails sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.scored: set[str] = set()
        self.down = False

    def send(self, run_id: str, entry_id: str) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append((run_id, entry_id))

    def is_scored(self, run_id: str, snapshot_id: str) -> bool:
        return snapshot_id in self.scored


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> tuple[ScoringOutbox, Broker, Clock]:
    broker, clock = Broker(), Clock()
    return ScoringOutbox(broker.send, broker.is_scored, resend_after_s=100, max_resends=2,
                         clock=clock), broker, clock


def test_a_scored_snapshot_is_forgotten_and_a_lost_one_sent_again(setup) -> None:
    outbox, broker, clock = setup
    outbox.submit("run", "1-0", "snap-a")
    outbox.submit("run", "2-0", "snap-b")
    assert broker.sent == [("run", "1-0"), ("run", "2-0")]
    broker.scored.add("snap-a")
    clock.now += 99  # not yet overdue: the broker may still redeliver it
    assert outbox.reconcile().resent == 0 and len(broker.sent) == 2
    clock.now += 1
    stats = outbox.reconcile()
    assert broker.sent[2:] == [("run", "2-0")]  # only the unscored one
    assert (stats.confirmed, stats.resent, stats.pending) == (1, 1, 1)
    broker.scored.add("snap-b")
    clock.now += 100
    stats = outbox.reconcile()
    assert (stats.confirmed, stats.resent, stats.pending) == (2, 1, 0)
    assert len(broker.sent) == 3


def test_a_snapshot_nobody_scores_is_given_up_after_the_last_resend(setup) -> None:
    outbox, broker, clock = setup
    outbox.submit("run", "1-0", "snap-a")
    for _ in range(4):
        clock.now += 100
        stats = outbox.reconcile()
    assert broker.sent == [("run", "1-0")] * 3  # the send and max_resends=2 more
    assert (stats.abandoned, stats.pending) == (1, 0)


def test_a_failed_send_is_retried_at_the_next_pass(setup) -> None:
    outbox, broker, clock = setup
    broker.down = True
    outbox.submit("run", "1-0", "snap-a")  # does not raise: the trainer must not stop
    assert outbox.stats.send_errors == 1 and broker.sent == []
    broker.down = False
    clock.now += 1
    outbox.reconcile()
    assert broker.sent == [("run", "1-0")]


def test_a_failed_check_asks_again_rather_than_resending(setup) -> None:
    outbox, broker, clock = setup
    outbox.submit("run", "1-0", "snap-a")

    def down(run_id: str, snapshot_id: str) -> bool:
        raise ConnectionError("redis down")

    outbox.is_scored = down
    clock.now += 100
    assert outbox.reconcile().resent == 0 and len(broker.sent) == 1
    outbox.is_scored = broker.is_scored
    assert outbox.reconcile().resent == 1


def test_the_outbox_is_bounded(setup) -> None:
    outbox, _broker, clock = setup
    for i in range(MAX_PENDING + 5):
        clock.now += 0.001
        outbox.submit("run", f"{i}-0", f"snap-{i}")
    assert outbox.reconcile().pending == MAX_PENDING
    assert outbox.stats.abandoned == 5


def test_the_resend_delay_follows_the_brokers_visibility_timeout(monkeypatch) -> None:
    monkeypatch.setenv(VISIBILITY_TIMEOUT_ENV, "300")
    assert default_resend_after_s() == 300 + TASK_TIME_LIMIT_S + RESEND_MARGIN_S
    monkeypatch.setenv(VISIBILITY_TIMEOUT_ENV, "soon")
    with pytest.raises(Exception, match=VISIBILITY_TIMEOUT_ENV):
        default_resend_after_s()


def test_the_redis_outbox_checks_the_report_marker(redis_url, run_id) -> None:
    from services.core.bus import connect
    from services.core.streams import diagnostics_done_key

    sent: list[tuple[str, str]] = []
    outbox = redis_outbox(redis_url, resend_after_s=0)
    outbox.send = lambda run, entry: sent.append((run, entry))
    outbox.submit(run_id, "1-0", "snap-a")
    outbox.submit(run_id, "2-0", "snap-b")
    connect(redis_url).set(diagnostics_done_key(run_id, "snap-a"), "1-0", ex=60)
    stats = outbox.reconcile()
    assert sent[2:] == [(run_id, "2-0")] and stats.confirmed == 1
