"""Shared fixtures: a small real corpus spoken by espeak-ng, and a tiny training config."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer.config import TrainConfig, preset

pytest_plugins = ["tests.telegram_stand_in"]


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
def redis_url() -> str:
    """A real Redis for integration tests; every test uses its own run ids in it.

    ``.ci/run`` starts one when none answers; set SMART_TUNER_TEST_REDIS_URL to use another.
    """
    import os

    import redis

    url = os.environ.get("SMART_TUNER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.ConnectionError as error:  # pragma: no cover - CI always has one
        pytest.fail(f"integration tests need a Redis at {url}: {error}")
    return url


@pytest.fixture
def run_id() -> str:
    """A fresh run id, so tests sharing one Redis never see each other's streams."""
    import uuid

    return f"test-{uuid.uuid4().hex[:12]}"
