"""Celery tasks of the diagnostics worker: thin adapters between Redis and reports.py.

Delivery is at-least-once (acks late, requeue when a pool process dies), so publishing is
idempotent by snapshot id: one Lua script sets a per-snapshot marker and appends the report
in one atomic step. A redelivered task finds the marker and publishes nothing; a task killed
before the script ran left no marker and publishes on redelivery. Either way the stream
gets exactly one report per snapshot.

A request that cannot be served (unknown run, missing or trimmed entry, a payload that does
not decode) is recorded on the dead-letter stream with the reason and answered with status
"invalid": raising would only make Celery retry something that can never succeed.

The tasks are ``shared_task``s so that this module imports without a configured app (the
tests use its helpers directly); services.diagnostics.celery_app includes it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import time
from typing import Any

import redis
from celery import Task, shared_task

from services.core.bus import connect, dead_letter_record
from services.core.schemas import (
    AlignmentReport,
    AttentionSnapshot,
    MessageError,
    decode,
    encode,
)
from services.core.streams import (
    DEAD_LETTER_STREAM,
    Stream,
    alignment_png_key,
    alignment_png_meta_key,
    diagnostics_done_key,
    maxlen_for,
    stream_key,
)
from services.core.tasks import RENDER_ALIGNMENT, SCORE_ALIGNMENT
from services.diagnostics import exporter
from services.diagnostics.plots import render_alignment_png
from services.diagnostics.reports import build_report, score_samples

log = logging.getLogger(__name__)

# The marker must outlive every redelivery of the task (visibility timeout, retries, a
# worker down for a while); a week covers a whole run, and markers are a few bytes each.
DONE_TTL_S = 7 * 24 * 3600
PNG_TTL_S = 24 * 3600
# Only full ids: XRANGE with a bare millisecond id would match every entry of that ms.
ENTRY_ID = re.compile(r"^[0-9]+-[0-9]+$")
INVALID_RUN_LABEL = "<invalid>"  # keeps garbage run ids out of metric label values
# Redis unreachable: retry a few times with back-off, then fail (the broker is the same
# Redis, so the message is redelivered once it is back). Only Redis's own errors: a local
# OSError (say, matplotlib's cache) would fail the same way on every retry.
RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": (redis.ConnectionError, redis.TimeoutError), "retry_backoff": True,
    "retry_backoff_max": 30, "max_retries": 5,
}

# KEYS[1]: done marker, KEYS[2]: diagnostics stream.
# ARGV: marker TTL (s), approximate MAXLEN, entry field, entry payload.
# Returns {1, new entry id} when published, {0, earlier entry id} when already published.
PUBLISH_ONCE_LUA = """
if not redis.call('SET', KEYS[1], '', 'NX', 'EX', ARGV[1]) then
  return {0, redis.call('GET', KEYS[1])}
end
local id = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', ARGV[3], ARGV[4])
if type(id) == 'table' and id.err then
  -- Scripts are not rolled back: drop the marker so that a retry can still publish.
  redis.call('DEL', KEYS[1])
  return id
end
redis.call('SET', KEYS[1], id, 'KEEPTTL')
return {1, id}
"""


class InvalidRequestError(MessageError):
    """A task argument or entry that can never be served; keeps the entry for the record."""

    def __init__(self, reason: str, fields: dict[Any, Any] | None = None):
        super().__init__(reason)
        self.fields = fields or {}


class NoSnapshotError(InvalidRequestError):
    """The run has no attention snapshot to show yet: early, not wrong."""


@functools.lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    """One client per process and URL (redis-py reopens its connections after a fork)."""
    return connect(url)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def worker_name(task: Task) -> str:
    """``node/pid`` of the pool process running ``task``, for the report's ``worker``."""
    return f"{task.request.hostname or socket.gethostname()}/{os.getpid()}"


def attention_key(run_id: object) -> str | None:
    """The run's attention stream key, or None when ``run_id`` is not a valid run id."""
    if not isinstance(run_id, str):
        return None
    try:
        return stream_key(run_id, Stream.ATTENTION)
    except ValueError:
        return None


def read_entry(client: redis.Redis, run_id: str, entry_id: str | None
               ) -> tuple[str, dict[Any, Any]]:
    """The attention entry ``entry_id`` of a run (the newest when None): its id and fields.

    Raises InvalidRequestError when the run id or entry id is malformed or no such entry exists,
    NoSnapshotError when asked for the newest of an empty stream.
    """
    key = attention_key(run_id)
    if key is None:
        raise InvalidRequestError(f"invalid run id {run_id!r}")
    if entry_id is None:
        newest = client.xrevrange(key, count=1)
        if not newest:
            raise NoSnapshotError(f"{key} holds no snapshot yet")
        found_id, fields = newest[0]
        return _text(found_id), fields
    if not isinstance(entry_id, str) or not ENTRY_ID.fullmatch(entry_id):
        raise InvalidRequestError(f"entry id {entry_id!r} is not a full stream id (<ms>-<seq>)")
    entries = client.xrange(key, entry_id, entry_id)
    if not entries:
        raise InvalidRequestError(f"no entry {entry_id} in {key} (never written, or trimmed)")
    return entry_id, entries[0][1]


def read_snapshot(client: redis.Redis, run_id: str, entry_id: str | None
                  ) -> tuple[str, dict[Any, Any], AttentionSnapshot]:
    """``read_entry`` decoded as an AttentionSnapshot of that run: id, fields, snapshot.

    Raises InvalidRequestError (or NoSnapshotError) as ``read_entry``, and when the entry is
    not a snapshot of ``run_id``.
    """
    found_id, fields = read_entry(client, run_id, entry_id)
    try:
        snapshot = decode(fields, AttentionSnapshot)
    except MessageError as error:
        raise InvalidRequestError(error.reason, fields) from error
    if snapshot.run_id != run_id:
        raise InvalidRequestError(f"snapshot belongs to run {snapshot.run_id!r}, not {run_id!r}",
                                  fields)
    return found_id, fields, snapshot


def dead_letter(client: redis.Redis, run_id: object, entry_id: object, reason: str,
                source: str, fields: dict[Any, Any] | None = None) -> None:
    """Record an unusable request on the dead-letter stream (same fields as the bus uses)."""
    stream = attention_key(run_id) or f"<invalid run id {str(run_id)[:80]!r}>"
    record = dead_letter_record(stream, str(entry_id), source, reason, fields or {})
    client.xadd(DEAD_LETTER_STREAM, record, maxlen=maxlen_for(DEAD_LETTER_STREAM),
                approximate=True)
    log.warning("dead-lettered %s %s (%s): %s", stream, entry_id, source, reason)


def publish_report(client: redis.Redis, report: AlignmentReport) -> tuple[bool, str]:
    """Append ``report`` to its run's diagnostics stream unless its snapshot already has one.

    Returns (True, new entry id) or (False, the id published earlier).
    """
    key = stream_key(report.run_id, Stream.DIAGNOSTICS)
    ((field, payload),) = encode(report).items()
    script = client.register_script(PUBLISH_ONCE_LUA)  # EVALSHA; loads the script if needed
    published, entry_id = script(
        keys=[diagnostics_done_key(report.run_id, report.snapshot_id), key],
        args=[DONE_TTL_S, maxlen_for(key), field, payload])
    return bool(published), _text(entry_id)


@shared_task(name=SCORE_ALIGNMENT, bind=True, **RETRY_OPTIONS)
def score_alignment(self: Task, run_id: str, entry_id: str) -> dict[str, Any]:
    """Score one attention snapshot and publish its AlignmentReport exactly once.

    Returns ``{"status": "published" | "duplicate" | "invalid", ...}`` with the report's
    entry id and batch-mean scores, or the reason it was invalid.
    """
    started = time.perf_counter()
    client = _client(self.app.conf.broker_url)
    try:
        found_id, fields, snapshot = read_snapshot(client, run_id, entry_id)
        try:
            report = build_report(snapshot, worker=worker_name(self))
        except MessageError as error:  # undecodable or unscorable attention
            raise InvalidRequestError(error.reason, fields) from error
    except InvalidRequestError as error:
        dead_letter(client, run_id, entry_id, error.reason, SCORE_ALIGNMENT, error.fields)
        run_label = run_id if attention_key(run_id) else INVALID_RUN_LABEL
        exporter.record_report(run_label, "invalid")
        return {"status": "invalid", "run_id": run_id, "entry_id": entry_id,
                "reason": error.reason}
    published, report_id = publish_report(client, report)
    status: exporter.ReportStatus = "published" if published else "duplicate"
    seconds = time.perf_counter() - started
    exporter.record_report(run_id, status, step=report.step,
                           scores=report.scores if published else None, seconds=seconds)
    return {"status": status, "run_id": run_id, "entry_id": found_id,
            "snapshot_id": report.snapshot_id, "step": report.step, "report_id": report_id,
            "scores": report.scores.model_dump(), "worker": report.worker,
            "seconds": round(seconds, 6)}


@shared_task(name=RENDER_ALIGNMENT, bind=True, **RETRY_OPTIONS)
def render_alignment(self: Task, run_id: str, entry_id: str | None = None, sample: int = 0
                     ) -> str | None:
    """Render one sample of a snapshot (the newest when ``entry_id`` is None) as a PNG.

    Stores the PNG at ``alignment_png_key(run_id)`` and what it shows (snapshot id, step,
    sample, scores) as JSON at ``alignment_png_meta_key(run_id)``, both for a day, and
    returns the PNG key; None when there is nothing to render (dead-lettered if invalid).
    """
    client = _client(self.app.conf.broker_url)
    try:
        found_id, fields, snapshot = read_snapshot(client, run_id, entry_id)
        if not isinstance(sample, int) or not 0 <= sample < len(snapshot.samples):
            raise InvalidRequestError(f"sample {sample!r} out of range: the snapshot has "
                                      f"{len(snapshot.samples)}", fields)
        chosen = snapshot.samples[sample]
        try:
            _, (scores,) = score_samples([chosen])
            matrix = chosen.to_array()
        except MessageError as error:
            raise InvalidRequestError(error.reason, fields) from error
        png = render_alignment_png(
            matrix, title=f"{run_id} · step {snapshot.step} · sample {sample}",
            input_length=chosen.input_length, output_length=chosen.output_length,
            scores=scores.model_dump())
    except NoSnapshotError as error:
        log.info("render_alignment: %s", error.reason)
        return None
    except InvalidRequestError as error:
        dead_letter(client, run_id, entry_id, error.reason, RENDER_ALIGNMENT, error.fields)
        return None
    meta = {"snapshot_id": snapshot.snapshot_id, "step": snapshot.step, "entry_id": found_id,
            "sample": sample, "scores": scores.model_dump(), "rendered_at": time.time()}
    png_key = alignment_png_key(run_id)
    # One transaction: a reader never sees a picture with another picture's metadata.
    pipe = client.pipeline(transaction=True)
    pipe.set(png_key, png, ex=PNG_TTL_S)
    pipe.set(alignment_png_meta_key(run_id), json.dumps(meta), ex=PNG_TTL_S)
    pipe.execute()
    return png_key
