"""The diagnostics worker: pure report building, then a real Celery worker on a real Redis.

The worker runs as a subprocess exactly as in production (prefork pool of two processes,
multiprocess Prometheus metrics served over HTTP); tasks are sent by name, as the trainer
sends them, on a queue of this module's own.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from services.core.schemas import (
    AlignmentReport,
    AttentionSample,
    AttentionSnapshot,
    MessageError,
    decode,
    encode,
)
from services.core.streams import (
    DEAD_LETTER_STREAM,
    PREFIX,
    Stream,
    alignment_png_key,
    alignment_png_meta_key,
    diagnostics_done_key,
    stream_key,
)
from services.core.tasks import RENDER_ALIGNMENT, SCORE_ALIGNMENT
from services.diagnostics.reports import build_report, score_samples, stack_samples
from tests.celery_worker import TASK_TIMEOUT_S, Worker, start_worker

PNG_MAGIC = b"\x89PNG"


def diagonal(steps: int, tokens: int, width: float = 0.8) -> np.ndarray:
    """A clean alignment: each decoder step attends around its share of the text."""
    centre = np.arange(steps)[:, None] * (tokens - 1) / (steps - 1)
    weights = np.exp(-0.5 * ((np.arange(tokens)[None, :] - centre) / width) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def uniform(steps: int, tokens: int) -> np.ndarray:
    """A failed alignment: every step attends to all of the text alike."""
    return np.full((steps, tokens), 1.0 / tokens)


def sample(matrix: np.ndarray, input_length: int | None = None,
           output_length: int | None = None) -> AttentionSample:
    """An AttentionSample of ``matrix``, valid in full unless lengths say otherwise."""
    return AttentionSample.from_array(matrix, input_length or matrix.shape[1],
                                      output_length or matrix.shape[0])


def snapshot(run_id: str, samples: list[AttentionSample], step: int = 100,
             snapshot_id: str | None = None) -> AttentionSnapshot:
    return AttentionSnapshot(run_id=run_id, snapshot_id=snapshot_id or uuid.uuid4().hex,
                             step=step, samples=samples)


# ---------------------------------------------------------------------------------------
# reports.py: pure, no Redis, no Celery


def test_report_of_diagonal_and_uniform_snapshots() -> None:
    good = build_report(snapshot("r1", [sample(diagonal(200, 80))] * 2), worker="w/1")
    bad = build_report(snapshot("r1", [sample(uniform(200, 80))]))
    assert good.scores.diagonality > 0.9 and good.scores.quality > 80
    assert bad.scores.diagonality < 0.1 and bad.scores.quality < 10
    assert len(good.per_sample) == 2 and len(bad.per_sample) == 1
    assert good.worker == "w/1" and good.run_id == "r1" and good.step == 100


def test_mixed_shapes_score_as_each_sample_alone() -> None:
    # Garbage beyond a sample's lengths must not matter, nor the other samples' shapes.
    padded = np.random.default_rng(0).random((150, 70))
    padded[:120, :50] = diagonal(120, 50)
    samples = [sample(diagonal(200, 80)), sample(padded, input_length=50, output_length=120),
               sample(uniform(60, 30))]
    means, rows = score_samples(samples)
    for one, row in zip(samples, rows, strict=True):
        _, (alone,) = score_samples([one])
        assert row.model_dump() == pytest.approx(alone.model_dump(), abs=1e-9)
    for key, value in means.model_dump().items():
        assert value == pytest.approx(np.mean([getattr(r, key) for r in rows]))
    batch, input_lengths, output_lengths = stack_samples(samples)
    assert batch.shape == (3, 200, 80)
    assert input_lengths.tolist() == [80, 50, 30] and output_lengths.tolist() == [200, 120, 60]


def test_unscorable_attention_raises_message_error() -> None:
    broken = diagonal(40, 20)
    broken[3, 4] = np.nan
    with pytest.raises(MessageError, match="not scorable"):
        score_samples([sample(broken)])
    corrupt = sample(diagonal(40, 20)).model_copy(update={"data": "AAAA"})
    with pytest.raises(MessageError, match="attention payload"):
        score_samples([corrupt])


def test_report_round_trips_through_the_wire() -> None:
    report = build_report(snapshot("r2", [sample(diagonal(50, 20))], step=7))
    assert decode(encode(report), AlignmentReport) == report


# ---------------------------------------------------------------------------------------
# Idempotent publishing against Redis, without Celery


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def run(run_id: str, client: redis.Redis) -> Iterator[str]:
    """A fresh run id whose keys are deleted afterwards."""
    yield run_id
    keys = list(client.scan_iter(match=f"{PREFIX}:{run_id}:*", count=1000))
    if keys:
        client.delete(*keys)


def test_publish_report_is_idempotent_by_snapshot(client: redis.Redis, run: str) -> None:
    from services.diagnostics.tasks import publish_report

    report = build_report(snapshot(run, [sample(diagonal(50, 20))]))
    first = publish_report(client, report)
    again = publish_report(client, report.model_copy(update={"worker": "other/2"}))
    assert first[0] is True and again == (False, first[1])
    assert client.xlen(stream_key(run, Stream.DIAGNOSTICS)) == 1
    assert client.ttl(diagnostics_done_key(run, report.snapshot_id)) > 0
    other = build_report(snapshot(run, [sample(diagonal(50, 20))]))  # a new snapshot id
    assert publish_report(client, other)[0] is True
    assert client.xlen(stream_key(run, Stream.DIAGNOSTICS)) == 2


def test_failed_append_leaves_no_marker(client: redis.Redis, run: str) -> None:
    from services.diagnostics.tasks import publish_report

    report = build_report(snapshot(run, [sample(diagonal(50, 20))]))
    client.set(stream_key(run, Stream.DIAGNOSTICS), "not a stream")  # XADD fails: WRONGTYPE
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publish_report(client, report)
    assert not client.exists(diagnostics_done_key(run, report.snapshot_id))
    client.delete(stream_key(run, Stream.DIAGNOSTICS))
    assert publish_report(client, report)[0] is True  # the retry publishes


# ---------------------------------------------------------------------------------------
# A real worker


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A prefork worker with two pool processes on a queue of its own."""
    with start_worker(redis_url, tmp_path_factory.mktemp("diagnostics-worker"),
                      concurrency=2) as handle:
        yield handle


def add_snapshot(client: redis.Redis, snap: AttentionSnapshot) -> str:
    """XADD a snapshot to its run's attention stream, as the trainer does; its entry id."""
    return client.xadd(stream_key(snap.run_id, Stream.ATTENTION), encode(snap)).decode()


def reports_of(client: redis.Redis, run_id: str) -> list[AlignmentReport]:
    entries = client.xrange(stream_key(run_id, Stream.DIAGNOSTICS))
    return [decode(fields, AlignmentReport) for _, fields in entries]


def test_worker_publishes_one_report_per_snapshot(worker: Worker, client: redis.Redis,
                                                  run: str) -> None:
    good = snapshot(run, [sample(diagonal(200, 80)), sample(diagonal(120, 50))], step=10)
    bad = snapshot(run, [sample(uniform(200, 80))], step=20)
    good_id, bad_id = add_snapshot(client, good), add_snapshot(client, bad)

    results = [worker.call(SCORE_ALIGNMENT, run, entry) for entry in (good_id, bad_id)]
    assert [r["status"] for r in results] == ["published", "published"]

    reports = {r.snapshot_id: r for r in reports_of(client, run)}
    assert set(reports) == {good.snapshot_id, bad.snapshot_id}
    assert reports[good.snapshot_id].scores.diagonality > 0.9
    assert reports[bad.snapshot_id].scores.diagonality < 0.1
    assert len(reports[good.snapshot_id].per_sample) == 2
    assert reports[good.snapshot_id].step == 10
    assert reports[good.snapshot_id].worker == results[0]["worker"]
    assert results[0]["scores"] == reports[good.snapshot_id].scores.model_dump()


def test_same_task_twice_publishes_once(worker: Worker, client: redis.Redis, run: str) -> None:
    entry = add_snapshot(client, snapshot(run, [sample(diagonal(100, 40))]))
    first = worker.call(SCORE_ALIGNMENT, run, entry)
    second = worker.call(SCORE_ALIGNMENT, run, entry)
    assert (first["status"], second["status"]) == ("published", "duplicate")
    assert second["report_id"] == first["report_id"]
    # Both in flight at once, likely on both pool processes: still one report.
    racing = add_snapshot(client, snapshot(run, [sample(diagonal(100, 40))]))
    pending = [worker.app.send_task(SCORE_ALIGNMENT, args=[run, racing]) for _ in range(4)]
    statuses = sorted(p.get(timeout=TASK_TIMEOUT_S)["status"] for p in pending)
    assert statuses == ["duplicate", "duplicate", "duplicate", "published"]
    assert len(reports_of(client, run)) == 2


def test_invalid_requests_are_dead_lettered(worker: Worker, client: redis.Redis,
                                            run: str) -> None:
    key = stream_key(run, Stream.ATTENTION)
    newest = client.xrevrange(DEAD_LETTER_STREAM, count=1)
    start = newest[0][0].decode() if newest else "0-0"  # the records before are not ours
    garbage = client.xadd(key, {"data": "{not json"}).decode()
    foreign = snapshot("someone-else", [sample(diagonal(30, 10))])
    wrong_run = client.xadd(key, encode(foreign)).decode()
    nan = diagonal(30, 10)
    nan[2, 2] = np.nan
    unscorable = add_snapshot(client, snapshot(run, [sample(nan)]))
    cases = {
        "99-0": "no entry 99-0",
        "garbage": "not a full stream id",
        garbage: "invalid AttentionSnapshot",
        wrong_run: "belongs to run 'someone-else'",
        unscorable: "not scorable",
    }
    for entry, reason in cases.items():
        result = worker.call(SCORE_ALIGNMENT, run, entry)
        assert result["status"] == "invalid" and reason in result["reason"], result
    assert worker.call(SCORE_ALIGNMENT, "../bad run", "1-0")["status"] == "invalid"

    records = [{k.decode(): v.decode() for k, v in fields.items()}
               for _, fields in client.xrange(DEAD_LETTER_STREAM, f"({start}")]
    mine = {r["id"]: r for r in records if r["stream"] == key}
    assert set(mine) == set(cases) and all(r["group"] == SCORE_ALIGNMENT for r in mine.values())
    for entry, reason in cases.items():
        assert reason in mine[entry]["reason"]
    assert mine[garbage]["raw"] == "{not json"
    assert json.loads(mine[unscorable]["raw"])["kind"] == "attention"  # what was not scorable
    assert client.xlen(stream_key(run, Stream.DIAGNOSTICS)) == 0

    # The worker is still there and still right.
    entry = add_snapshot(client, snapshot(run, [sample(diagonal(100, 40))]))
    assert worker.call(SCORE_ALIGNMENT, run, entry)["status"] == "published"


def test_render_alignment_stores_a_png(worker: Worker, client: redis.Redis, run: str) -> None:
    assert worker.call(RENDER_ALIGNMENT, run, None, 0) is None  # nothing to draw yet
    first = snapshot(run, [sample(diagonal(80, 30))], step=5)
    latest = snapshot(run, [sample(uniform(60, 20)), sample(diagonal(90, 40))], step=6)
    first_id = add_snapshot(client, first)
    add_snapshot(client, latest)

    key = worker.call(RENDER_ALIGNMENT, run, None, 1)
    assert key == alignment_png_key(run)
    assert client.get(key).startswith(PNG_MAGIC)
    meta = json.loads(client.get(alignment_png_meta_key(run)))
    assert (meta["snapshot_id"], meta["step"], meta["sample"]) == (latest.snapshot_id, 6, 1)
    assert meta["scores"]["diagonality"] > 0.9
    assert 0 < client.ttl(key) <= 24 * 3600

    assert worker.call(RENDER_ALIGNMENT, run, first_id, 0) == key
    assert json.loads(client.get(alignment_png_meta_key(run)))["step"] == 5
    assert worker.call(RENDER_ALIGNMENT, run, first_id, 3) is None  # no such sample


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric samples by sample name, from a real HTTP GET of /metrics."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
           **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


def test_metrics_aggregate_both_pool_processes(worker: Worker, client: redis.Redis,
                                               run: str) -> None:
    published: list[dict] = []
    workers: set[str] = set()
    # Send in bursts until both pool processes have scored some (a burst almost always
    # reaches both; a second burst makes that certain enough on a loaded box).
    for _ in range(4):
        entries = [add_snapshot(client, snapshot(run, [sample(diagonal(200, 80))] * 4))
                   for _ in range(8)]
        pending = [worker.app.send_task(SCORE_ALIGNMENT, args=[run, e]) for e in entries]
        results = [p.get(timeout=TASK_TIMEOUT_S) for p in pending]
        published += [r for r in results if r["status"] == "published"]
        workers |= {r["worker"] for r in results}
        if len(workers) >= 2:
            break
    assert len(workers) >= 2, f"one pool process did all the work: {workers}"
    duplicate = worker.call(SCORE_ALIGNMENT, run, entries[0])
    assert duplicate["status"] == "duplicate"

    metrics = _scrape(worker.metrics_url)
    total = "smart_tuner_diagnostics_reports_total"
    assert _value(metrics, total, run=run, status="published") == len(published)
    assert len(published) == client.xlen(stream_key(run, Stream.DIAGNOSTICS))
    assert _value(metrics, total, run=run, status="duplicate") == 1
    # Every pool process's counter file holds part of the total: aggregation, not one pid.
    assert len(list(worker.metrics_dir.glob("counter_*.db"))) >= 2

    expected = published[-1]["scores"]  # identical snapshots: every report scores the same
    assert _value(metrics, "smart_tuner_alignment_diagonality", run=run) == pytest.approx(
        expected["diagonality"])
    assert _value(metrics, "smart_tuner_alignment_quality_percent", run=run) == pytest.approx(
        expected["quality"])
    for name in ("focus", "monotonicity", "coverage", "entropy"):
        assert f"smart_tuner_alignment_{name}" in metrics
    assert _value(metrics, "smart_tuner_alignment_snapshot_step", run=run) == 100
    assert _value(metrics, "smart_tuner_diagnostics_score_seconds_count") >= len(published)
