"""Start a Celery diagnostics worker process on its own queue and wait until it answers.

Used by the integration tests, the chaos suite and the loop benchmark (bench/loop.py), which
need a real worker that they can start, address and stop. A test harness, so it lives in
tests/ and is not installed with the package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import celery
import redis

from services.core.tasks import make_client

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the worker's cwd
WORKER_START_TIMEOUT_S = 90  # a loaded 2-core CI box imports numpy, matplotlib, celery
TASK_TIMEOUT_S = 30


@dataclass
class Worker:
    """The worker subprocess and what the tests need to talk to it."""

    process: subprocess.Popen[bytes]
    app: celery.Celery  # a client with a result backend
    node: str
    metrics_url: str
    metrics_dir: Path
    log_path: Path

    def call(self, name: str, *args: object) -> dict | str | None:
        """Send a task by name and wait for its result."""
        return self.app.send_task(name, args=list(args)).get(timeout=TASK_TIMEOUT_S)

    def log_tail(self) -> str:
        """The last 4,000 characters of the worker's log, for a failing test's message."""
        return self.log_path.read_text(errors="replace")[-4000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _metrics_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def start_worker(redis_url: str, base: Path, concurrency: int = 1, queue: str | None = None,
                 extra_env: dict[str, str] | None = None) -> Iterator[Worker]:
    """Start a worker on a fresh queue (or ``queue``), wait until it answers, stop it (and
    its pool) after."""
    base.mkdir(parents=True, exist_ok=True)
    queue = queue or f"diagnostics-test-{uuid.uuid4().hex[:10]}"
    node = f"{queue}-{uuid.uuid4().hex[:6]}@test"
    metrics_dir = base / "prometheus"
    port = _free_port()
    env = {**os.environ, "SMART_TUNER_REDIS_URL": redis_url,
           "SMART_TUNER_DIAGNOSTICS_QUEUE": queue, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "SMART_TUNER_DIAGNOSTICS_METRICS_PORT": str(port), "MPLCONFIGDIR": str(base / "mpl"),
           **(extra_env or {})}
    log_path = base / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "services.diagnostics.celery_app", "worker",
             "--pool", "prefork",
             "--concurrency", str(concurrency), "-Q", queue, "-n", node, "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    app = make_client(redis_url, queue=queue, backend_url=redis_url)
    handle = Worker(process, app, node, f"http://127.0.0.1:{port}/metrics", metrics_dir,
                    log_path)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}:\n"
                                   f"{handle.log_tail()}")
            if app.control.ping(destination=[node], timeout=1.0) and _metrics_up(
                    handle.metrics_url):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready in {WORKER_START_TIMEOUT_S} s:\n"
                            f"{handle.log_tail()}")
            time.sleep(0.3)
        yield handle
    finally:
        process.terminate()  # warm shutdown: finishes running tasks, stops the pool
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # our own session: the pool children too
            process.wait(timeout=10)
        cleanup = redis.Redis.from_url(redis_url)
        cleanup.delete(queue, *cleanup.scan_iter(match=f"_kombu.binding*.{queue}"))
        app.close()
