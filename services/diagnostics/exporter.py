"""Prometheus metrics of the diagnostics worker, right with any number of pool processes.

Celery's prefork pool runs tasks in child processes, so each child would otherwise expose
only its own counts. With ``PROMETHEUS_MULTIPROC_DIR`` set (before prometheus_client is
imported) every process writes its values to files in that directory and the worker's main
process serves their aggregate: counters and the histogram are summed over processes (dead
ones included, so a count never drops when a child is replaced), and the score gauges keep
the most recently set value of any process ("mostrecent"), which is the latest report of
the run whichever child scored it.

One directory per worker instance: it is emptied when the worker starts.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from services.core.schemas import AlignmentScores
from services.core.settings import ENV_PREFIX, load_settings

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PORT_ENV = f"{ENV_PREFIX}DIAGNOSTICS_METRICS_PORT"  # setting diagnostics_metrics_port
DEFAULT_ADDR = "0.0.0.0"  # all interfaces: Prometheus scrapes from another container

# What became of one score_alignment task (the `status` label of REPORTS).
ReportStatus = Literal["published", "duplicate", "invalid"]


def multiprocess_dir() -> Path | None:
    """The multiprocess directory, or None in single-process mode."""
    value = os.environ.get(MULTIPROC_DIR_ENV)
    return Path(value) if value else None


# A metric without labels opens its file as soon as it is defined (just below): the
# directory must exist by then, or importing this module fails.
if (_dir := multiprocess_dir()) is not None:
    _dir.mkdir(parents=True, exist_ok=True)

REPORTS = Counter(
    "smart_tuner_diagnostics_reports",
    "Snapshots handled by the diagnostics worker, by outcome",
    ["run", "status"],
)
# Scoring takes ~1 ms to ~1 s depending on snapshot size; above that something is wrong.
SCORE_SECONDS = Histogram(
    "smart_tuner_diagnostics_score_seconds",
    "Seconds to read, score and publish one attention snapshot",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SNAPSHOT_STEP = Gauge(
    "smart_tuner_alignment_snapshot_step",
    "Training step of the snapshot the alignment gauges describe",
    ["run"], multiprocess_mode="mostrecent",
)
# Score key -> gauge; quality is a percentage, the rest lie in [0, 1].
SCORE_GAUGES: dict[str, Gauge] = {
    key: Gauge(
        f"smart_tuner_alignment_{name}",
        f"Latest alignment {key} of the run (batch mean of its newest scored snapshot)",
        ["run"], multiprocess_mode="mostrecent",
    )
    for key, name in (
        ("diagonality", "diagonality"),
        ("monotonicity", "monotonicity"),
        ("focus", "focus"),
        ("coverage", "coverage"),
        ("entropy", "entropy"),
        ("quality", "quality_percent"),
    )
}


def record_report(run_id: str, status: ReportStatus, step: int | None = None,
                  scores: AlignmentScores | None = None, seconds: float | None = None) -> None:
    """Count one handled snapshot; for a published report also set the run's gauges."""
    REPORTS.labels(run=run_id, status=status).inc()
    if seconds is not None:
        SCORE_SECONDS.observe(seconds)
    if scores is not None:
        for key, gauge in SCORE_GAUGES.items():
            gauge.labels(run=run_id).set(getattr(scores, key))
        if step is not None:
            SNAPSHOT_STEP.labels(run=run_id).set(step)


def reset_multiprocess_dir() -> None:
    """Empty (or create) the multiprocess directory: call once at worker start, before forks.

    Files left by an earlier worker would otherwise be summed into this one's counters.
    This process's own files stay: it opened them when the metrics were defined (all zero
    so far) and keeps writing to them, which matters when tasks run in it (``--pool solo``).
    """
    path = multiprocess_dir()
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    own_suffix = f"_{os.getpid()}.db"
    for entry in path.glob("*.db"):
        if not entry.name.endswith(own_suffix):
            entry.unlink(missing_ok=True)


def mark_process_dead(pid: int) -> None:
    """Multiprocess bookkeeping for a pool process that exited (no-op in single-process mode)."""
    if multiprocess_dir() is not None:
        prometheus_multiprocess.mark_process_dead(pid)


def metrics_registry() -> CollectorRegistry:
    """The registry to serve: the aggregate of all processes' files, or this process's."""
    if multiprocess_dir() is None:
        return REGISTRY
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)
    return registry


def start_metrics_server(port: int, addr: str = DEFAULT_ADDR
                         ) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server and thread.

    Call it in the worker's main process; pool processes only write their files.
    """
    if multiprocess_dir() is None:
        log.warning("%s is unset: /metrics shows only the main process, not the pool "
                    "processes that run the tasks", MULTIPROC_DIR_ENV)
    server, thread = start_http_server(port, addr=addr, registry=metrics_registry())
    log.info("diagnostics metrics on http://%s:%d/metrics", addr, port)
    return server, thread


def metrics_port_from_env() -> int | None:
    """The ``diagnostics_metrics_port`` setting (None: not served); ConfigError if bad."""
    return load_settings().diagnostics_metrics_port
