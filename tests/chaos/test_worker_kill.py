"""The diagnostics worker killed with SIGKILL (main process and pool) while tasks are in
flight. Must hold: once a new worker starts, every snapshot has exactly one report.

The killed worker's unacknowledged tasks come back after the broker's visibility timeout
(``SMART_TUNER_DIAGNOSTICS_VISIBILITY_TIMEOUT_S``, short here); the report is published
idempotently, so a task that had already published before the kill publishes nothing more.
A task the worker had popped off the queue but not yet recorded as unacked is gone from the
broker (kombu's Redis transport has that window; CI once lost 1 of 40 in it): the tasks are
sent as the trainer sends them, through its scoring outbox, which sends such a one again.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter

from services.core.bus import connect
from services.core.schemas import AlignmentReport, decode
from services.core.streams import Stream, stream_key
from services.trainer.scoring import redis_outbox
from tests.celery_worker import start_worker
from tests.test_diagnostics_worker import add_snapshot, diagonal, sample, snapshot

SNAPSHOTS = 40
VISIBILITY_S = "5"
RESEND_AFTER_S = 15.0  # past the visibility timeout and a task's run time here
LOST_SEND = 7


def _reports(client, run_id: str) -> list[AlignmentReport]:
    return [decode(f, AlignmentReport)
            for _, f in client.xrange(stream_key(run_id, Stream.DIAGNOSTICS))]


def test_worker_sigkill_with_tasks_in_flight(redis_url, run_id, tmp_path, chaos) -> None:
    row = chaos("diagnostics worker SIGKILL (tasks in flight) + 1 task dropped")
    client = connect(redis_url)
    # big matrices: each task takes long enough to be caught mid-flight
    snaps = [snapshot(run_id, [sample(diagonal(600, 120)) for _ in range(4)], step=i)
             for i in range(SNAPSHOTS)]
    entries = [add_snapshot(client, s) for s in snaps]
    queue = f"chaos-{uuid.uuid4().hex[:8]}"
    env = {"SMART_TUNER_DIAGNOSTICS_VISIBILITY_TIMEOUT_S": VISIBILITY_S}
    # nested: leaving start_worker deletes the queue, which the second worker still needs
    with start_worker(redis_url, tmp_path / "w1", concurrency=2, queue=queue,
                      extra_env=env) as first:
        outbox = redis_outbox(redis_url, resend_after_s=RESEND_AFTER_S, queue=queue)
        # And one message lost in that window for sure, whatever the kill's timing.
        sends, send = [0], outbox.send

        def losing_one(run: str, entry: str) -> None:
            sends[0] += 1
            if sends[0] != LOST_SEND:
                send(run, entry)
            else:
                row.injected += 1

        outbox.send = losing_one
        for entry, snap in zip(entries, snaps, strict=True):
            outbox.submit(run_id, entry, snap.snapshot_id)
        deadline = time.monotonic() + 60
        while len(_reports(client, run_id)) < 5:
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.05)
        os.killpg(first.process.pid, signal.SIGKILL)  # the worker's session: pool included
        row.injected += 1
        first.process.wait(10)
        at_kill = len(_reports(client, run_id))
        assert at_kill < SNAPSHOTS, "every task finished before the kill: none in flight"
        with start_worker(redis_url, tmp_path / "w2", concurrency=2, queue=queue,
                          extra_env=env) as second:
            # wait for recovery without asserting yet: the counts go into the table first
            deadline = time.monotonic() + 120
            while (len(_reports(client, run_id)) < SNAPSHOTS
                   and time.monotonic() < deadline):
                outbox.reconcile()
                time.sleep(0.2)
            recovered = len(_reports(client, run_id)) >= SNAPSHOTS
            if recovered:
                time.sleep(float(VISIBILITY_S) + 3)  # a redelivered duplicate would show now
            waited = (len(_reports(client, run_id)), outbox.stats, second.log_tail())
    counts = Counter(r.snapshot_id for r in _reports(client, run_id))
    # measured: snapshots that never got a report; both faults survived only if every
    # snapshot has exactly one report
    row.lost = len({s.snapshot_id for s in snaps} - set(counts))
    exactly_once = row.lost == 0 and max(counts.values(), default=0) == 1
    row.survived = row.injected if exactly_once else 0
    assert recovered, waited
    assert set(counts) == {s.snapshot_id for s in snaps}
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    assert outbox.stats.resent >= 1  # the lost one, and any the kill took for good
