"""A stranger on the machine reaches ``smart-tuner up``'s private Redis: without the
password it can read nothing, write nothing, and the password is in no command line, no
log line and no config error it could read.

Must hold: every unauthenticated command is refused (NOAUTH), the run's streams are intact,
and the password appears in no log record and no process argument list.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis

from services.core.bus import Publisher, connect
from services.core.schemas import Event
from services.core.settings import ConfigError, load_settings
from services.core.streams import RUNS_KEY, Stream, stream_key
from services.launcher.redis_server import free_port
from services.launcher.up import choose_redis

ATTEMPTS = ("ping", "keys", "xadd", "flushall", "config_get")


def test_stranger_without_the_password(tmp_path, run_id, chaos, caplog,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    row = chaos(f"Client without the Redis password ({len(ATTEMPTS)} commands; "
                "password in logs, argv, config errors)")
    with caplog.at_level(logging.INFO):
        choice = choose_redis(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    try:
        assert choice.process is not None
        password, port = choice.process.password, choice.process.port
        publisher = Publisher(connect(choice.url), run_id)
        publisher.publish(Stream.EVENTS, Event(run_id=run_id, event="run_started"))
        assert publisher.close()
        stranger = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        calls = {"ping": stranger.ping, "keys": lambda: stranger.keys("*"),
                 "xadd": lambda: stranger.xadd(stream_key(run_id, Stream.EVENTS), {"x": "1"}),
                 "flushall": stranger.flushall, "config_get": lambda: stranger.config_get("*")}
        row.injected = len(calls) + 3
        refused = 0
        for call in calls.values():
            try:
                call()
            except redis.AuthenticationError:
                refused += 1
        monkeypatch.setenv("SMART_TUNER_REDIS_URL", choice.url.replace("redis://", "http://"))
        with pytest.raises(ConfigError) as caught:
            load_settings()
        argv = Path(f"/proc/{choice.process.process.pid}/cmdline").read_text()
        leaks = [password in caplog.text, password in argv, password in str(caught.value)]
        owner = connect(choice.url)
        intact = owner.xlen(stream_key(run_id, Stream.EVENTS)) == 1 and \
            owner.sismember(RUNS_KEY, run_id)
        row.lost = 0 if intact else 1
        row.survived = refused + leaks.count(False)

        assert refused == len(calls)
        assert leaks == [False, False, False]
        assert intact
    finally:
        choice.stop()
