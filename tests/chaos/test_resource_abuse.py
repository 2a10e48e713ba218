"""What a client or a long life can make the services spend: metric series, memory for
bodies, CPU for pictures, Redis for finished runs.

Injected: requests with invented methods and paths; unauthenticated 30 MiB POSTs (declared
and chunked); a flood of picture requests; finished runs weeks old. Must hold: the metric
series stay a bounded set; a stranger's body is never read; pictures are drawn once per
snapshot and at most the rate limit allows; an expired run leaves the runs set and every
key it had gets an expiry."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from services.core.retention import DAY_S, RetentionSweeper
from services.core.schemas import Event, encode
from services.core.streams import PREFIX, RUNS_KEY, Stream, stream_key
from services.tuner.api import KNOWN_METHODS, OTHER_LABEL, create_app
from services.tuner.limits import ApiLimits
from tests.fault_table import FaultRecord
from tests.test_api import TOKEN, add, register, serve, snapshot
from tests.test_api_limits import HUGE, raw_request, samples
from tests.test_tuner_service import step_metrics

Chaos = Callable[[str], FaultRecord]
FLOOD = 30
RENDERS_PER_CLIENT = 3


@pytest.fixture
def base_url(redis_url: str) -> Iterator[str]:
    app_client = redis.Redis.from_url(redis_url)
    limits = ApiLimits(renders_per_client=RENDERS_PER_CLIENT, renders_total=100,
                       render_window_s=3600.0)
    with serve(create_app(app_client, TOKEN, limits)) as url:
        yield url
    app_client.close()


def test_invented_methods_add_no_metric_series(chaos: Chaos, base_url: str) -> None:
    row = chaos("API: requests with invented methods and paths")
    with httpx.Client(base_url=base_url) as client:
        for _ in range(FLOOD):
            client.request(f"M{uuid.uuid4().hex[:6]}", f"/x/{uuid.uuid4().hex}")
            row.injected += 1
    series = samples(base_url, "smart_tuner_api_requests_total")
    bad = [labels for labels, _ in series
           if labels["method"] not in (*KNOWN_METHODS, OTHER_LABEL)
           or labels["route"].startswith("/x/")]
    other = sum(value for labels, value in series if labels["method"] == OTHER_LABEL)
    row.survived = int(other) if not bad else 0
    row.lost = len(bad)
    assert not bad
    assert other == FLOOD


def test_unauthenticated_huge_posts_are_never_read(chaos: Chaos, base_url: str,
                                                   rc: redis.Redis) -> None:
    row = chaos("API: unauthenticated 30 MiB POSTs (Content-Length and chunked)")
    run_id = register(rc, f"abuse-{uuid.uuid4().hex[:8]}")
    rc.made.append(run_id)  # type: ignore[attr-defined]
    head = (f"POST /runs/{run_id}/commands HTTP/1.1\r\nHost: t\r\n"
            "Content-Type: application/json\r\n")
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    answers = []
    for _ in range(3):
        answers.append(raw_request(base_url, head + f"Content-Length: {HUGE}\r\n\r\n"))
        answers.append(raw_request(base_url, head + "Transfer-Encoding: chunked\r\n\r\n",
                                   (chunk for _ in range(HUGE // len(chunk)))))
    row.injected = len(answers)
    refused_early = [status.split()[1:2] == [b"401"] and sent < HUGE // 4
                     for status, sent in answers]
    row.survived = sum(refused_early)
    row.lost = len(rc.xrange(stream_key(run_id, Stream.COMMANDS)))
    assert all(refused_early)
    assert row.lost == 0


def test_picture_flood_draws_once_per_snapshot_within_the_limit(
        chaos: Chaos, base_url: str, rc: redis.Redis) -> None:
    row = chaos("API: alignment.png flood over changing snapshots")
    run_id = register(rc, f"abuse-{uuid.uuid4().hex[:8]}")
    rc.made.append(run_id)  # type: ignore[attr-defined]
    statuses = []
    with httpx.Client(base_url=base_url) as client:
        for index in range(FLOOD):
            if index % 5 == 0:  # a new snapshot every 5 requests: 6 snapshots in all
                add(rc, snapshot(run_id, 40 + index, f"snap-{index}"))
            statuses.append(client.get(f"/runs/{run_id}/alignment.png").status_code)
    renders = sum(value for _, value in samples(base_url, "smart_tuner_api_png_renders_total"))
    row.injected = len(statuses)
    row.survived = sum(status in (200, 429) for status in statuses)
    row.lost = sum(status >= 500 for status in statuses)
    assert renders == RENDERS_PER_CLIENT  # 6 snapshots, 3 drawn, the rest 429 or cached
    assert statuses.count(429) > 0 and row.lost == 0


def test_finished_runs_leave_redis_after_the_retention(chaos: Chaos, rc: redis.Redis) -> None:
    row = chaos("Redis: finished runs weeks old (retention)")
    old_ms = int((time.time() - 30 * DAY_S) * 1000)
    runs = []
    for _ in range(5):
        run_id = f"abuse-old-{uuid.uuid4().hex[:8]}"
        rc.made.append(run_id)  # type: ignore[attr-defined]
        rc.sadd(RUNS_KEY, run_id)
        rc.xadd(stream_key(run_id, Stream.METRICS), encode(step_metrics(run_id, 1, 1.0)),
                id=f"{old_ms}-0")
        rc.xadd(stream_key(run_id, Stream.EVENTS), encode(Event(run_id=run_id,
                event="finished")), id=f"{old_ms + 1}-0")
        runs.append(run_id)
    row.injected = len(runs)
    RetentionSweeper(rc, 14 * DAY_S, grace_s=60).sweep()
    members = {member.decode() for member in rc.smembers(RUNS_KEY)}
    kept_forever = [key for run_id in runs
                    for key in rc.scan_iter(match=f"{PREFIX}:{run_id}:*") if rc.ttl(key) < 0]
    row.survived = sum(run_id not in members for run_id in runs)
    row.lost = len(kept_forever)
    assert row.survived == len(runs)
    assert kept_forever == []
