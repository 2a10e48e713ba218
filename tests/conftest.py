"""Shared fixtures: a small real corpus spoken by espeak-ng, a tiny training config, and a
Redis for the integration tests.

The suite runs in parallel (pytest-xdist: ``-n`` in pyproject.toml's addopts). Each worker
is a process of its own with its own Redis server (so no test sees another worker's global
keys, dead letters or consumer groups) and one torch thread (several trainers share the two
cores; more threads than cores makes each of them slower, not faster).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.core.streams import PREFIX, RUNS_KEY
from services.trainer.config import TrainConfig, preset

pytest_plugins = ["tests.telegram_stand_in", "tests.fault_table"]

# The xdist worker's name ("gw0", ...); None when the suite runs in one process.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: one torch thread, here and in the processes its tests start."""
    if XDIST_WORKER:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by trainers and Celery workers
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 short utterances (10 English, 4 Russian) in the LJSpeech layout."""
    from services.trainer.corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(out, n_english=10, n_russian=4, seed=7, progress=False)
    return out


def make_small_config() -> TrainConfig:
    """The tiny preset at half width on a 4-utterance validation batch, short warm-up.

    Half width keeps each test to a few seconds on 2 cores; the loop's code paths are the
    same as at full size.
    """
    cfg = preset("tiny")
    m = cfg.model
    m.symbols_embedding_dim = m.encoder_embedding_dim = 64
    m.attention_rnn_dim = m.decoder_rnn_dim = 128
    m.prenet_dim = 64
    m.postnet_embedding_dim = 64
    cfg.run.batch_size = 4
    cfg.run.val_size = 4
    cfg.run.eval_every = 5
    cfg.run.checkpoint_every = 5
    cfg.optim.warmup_steps = 2
    # A free-running probe pass per checkpoint would add seconds to every test that
    # trains; tests/test_probes.py turns them on where they are the subject.
    cfg.probes.enabled = False
    return cfg


@pytest.fixture
def small_config() -> TrainConfig:
    """A fresh ``make_small_config()`` for each test (tests change it freely)."""
    return make_small_config()


@pytest.fixture
def one_thread():
    """Bitwise reproducibility across two runs needs a fixed reduction order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis for integration tests; every test uses its own run ids in it.

    SMART_TUNER_TEST_REDIS_URL names one to use. Otherwise an xdist worker starts a private
    ``redis-server`` on a free port for its session (tests read global keys such as the
    dead-letter stream and the runs set, which parallel workers would otherwise share), and
    a single-process run uses the one at 127.0.0.1:6379 that ``.ci/run`` starts when none
    answers. Database 15, as before: tests/test_runstore.py keeps database 13 to itself.
    """
    import redis

    from services.launcher.redis_server import RedisProcess

    url = os.environ.get("SMART_TUNER_TEST_REDIS_URL")
    server = None
    if url is None and XDIST_WORKER:
        server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
        url = server.url.rsplit("/", 1)[0] + "/15"
    url = url or "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.ConnectionError as error:  # pragma: no cover - CI always has one
        pytest.fail(f"integration tests need a Redis at {url}: {error}")
    try:
        yield url
    finally:
        if server is not None:
            server.stop()


@pytest.fixture
def rc(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test Redis that deletes, afterwards, every key of the run ids a test
    appends to ``rc.made`` and takes them out of the runs set."""
    client = redis.Redis.from_url(redis_url)
    made: list[str] = []
    client.made = made  # type: ignore[attr-defined]
    yield client
    for run_id in made:
        keys = list(client.scan_iter(match=f"{PREFIX}:{run_id}:*"))
        if keys:
            client.delete(*keys)
        client.srem(RUNS_KEY, run_id)
    client.close()


@pytest.fixture
def run_id() -> str:
    """A fresh run id, so tests sharing one Redis never see each other's streams."""
    import uuid

    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def critical_path() -> Iterator[None]:
    """Run this module's tests (and the processes they start) at a higher CPU priority than
    the other workers' tests.

    For the suite's longest test (the NaN storm, minutes of CPU-bound training): under xdist
    it shares two cores with three other workers, and its length is the suite's length. A
    nice value of -5 gives it about three times the share of an ordinary process, so the
    other workers' tests fill the remaining time around it instead of stretching it.
    Lowering a nice value needs root (as CI runs); elsewhere the test runs as before.
    Linux applies it to the calling thread (where the test trains) and to the threads and
    processes started from it after.
    """
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, before - 5)
    except PermissionError:
        yield
        return
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


@pytest.fixture
def client(redis_url: str, run_id: str) -> Iterator[redis.Redis]:
    """A Redis client for one run's test (tuner and supervised-mode tests); the run's keys
    and its RUNS_KEY membership are removed afterwards."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    keys = list(connection.scan_iter(match=f"{PREFIX}:{run_id}:*"))
    if keys:
        connection.delete(*keys)
    connection.srem(RUNS_KEY, run_id)
    connection.close()
