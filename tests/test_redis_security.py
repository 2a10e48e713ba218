"""Redis secrets and TLS: no password or token is echoed into logs or config errors, the
private redis-server requires a password, and ``rediss://`` works end to end (redis-py,
the publisher, the Celery worker and its client) against a real redis-server with TLS."""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import redis

from services.core.bus import Publisher, connect
from services.core.redis_url import celery_ssl_conf, mask_url, redact
from services.core.schemas import Event, decode
from services.core.settings import ConfigError, load_settings
from services.core.streams import Stream, stream_key
from services.launcher.redis_server import RedisProcess, answers, free_port
from services.launcher.up import choose_redis

SECRET = "hunter2-s3cret-value"  # a test value, nowhere real


# --------------------------------------------------------------------------- not echoed

@pytest.mark.parametrize(("variable", "value", "shown"), [
    # a token too short: its value is a secret however wrong it is
    ("SMART_TUNER_API_TOKEN", SECRET[:10], None),
    # a URL of the wrong scheme with credentials: the rest of it still helps
    ("SMART_TUNER_REDIS_URL", f"http://:{SECRET}@redis:6379/0", "http://:***@redis:6379/0"),
    ("SMART_TUNER_REDIS_URL", f"htp://redis:6379/0?password={SECRET}", "password=***"),
    # a harmless value is still echoed: it tells what was wrong
    ("SMART_TUNER_NUM_THREADS", "zero", "'zero'"),
])
def test_config_errors_never_echo_a_secret(monkeypatch, variable, value, shown) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("SMART_TUNER_NUM_THREADS", "zero" if "THREADS" in variable else "0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert SECRET[:10] not in message, message
    assert variable in message or "NUM_THREADS" in message
    if shown is not None:
        assert shown in message, message


def test_urls_are_masked_in_log_records() -> None:
    from services.core.logging import RedactingFilter

    url = f"rediss://user:{SECRET}@redis.example:6380/0?ssl_cert_reqs=required"
    assert mask_url(url) == "rediss://user:***@redis.example:6380/0?ssl_cert_reqs=required"
    assert redact(f"broker redis://:{SECRET}@h:1/0 and redis://h:2/0") == \
        "broker redis://:***@h:1/0 and redis://h:2/0"
    record = logging.LogRecord("celery", logging.INFO, __file__, 1,
                               "Connected to %s", (f"redis://:{SECRET}@h:6379/0",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "Connected to redis://:***@h:6379/0"


# --------------------------------------------------------------------------- a password

def test_private_redis_server_requires_a_password(tmp_path) -> None:
    server = RedisProcess(tmp_path).start()
    try:
        assert server.password and server.password in server.url
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        # the password is in no process's command line (every local user reads those)
        assert server.password not in Path(f"/proc/{server.process.pid}/cmdline").read_text()
        server.stop()
        server.start()  # a restart keeps the URL (and the password)
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_up_starts_a_private_redis_with_a_password_and_never_logs_it(tmp_path,
                                                                      caplog) -> None:
    nothing = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.INFO, logger="services.launcher.up"):
        choice = choose_redis(nothing, tmp_path)
    try:
        assert choice.origin == "redis-server"
        assert choice.process is not None and choice.process.password in choice.url
        assert redis.Redis.from_url(choice.url).ping()  # what the children get works
        logged = caplog.text
        assert SECRET not in logged and choice.process.password not in logged, logged
        assert "***" in logged
    finally:
        choice.stop()


def test_up_warns_about_an_existing_redis_without_a_password(tmp_path, caplog) -> None:
    """The private one always has a password; one that is already there and answers
    without is the user's to fix: ``up`` says so, and uses it."""
    port = free_port()
    open_server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "guarded").mkdir()
    guarded = RedisProcess(tmp_path / "guarded").start()
    try:
        open_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not answers(open_url):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="services.launcher.up"):
            choice = choose_redis(open_url, tmp_path)
        assert choice.origin == "existing" and "without a password" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="services.launcher.up"):
            assert choose_redis(guarded.url, tmp_path).origin == "existing"
        assert "without a password" not in caplog.text
    finally:
        open_server.terminate()
        open_server.wait(10)
        guarded.stop()


# --------------------------------------------------------------------------- rediss://

def _tls_files(directory: Path):  # -> TlsFiles
    """A self-signed certificate for 127.0.0.1 (its own CA), made with openssl."""
    from services.launcher.redis_server import TlsFiles

    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return TlsFiles(cert=cert, key=key, ca=cert)


def test_celery_gets_verified_tls_options_for_rediss() -> None:
    conf = celery_ssl_conf("rediss://:pw@redis.example:6380/0")
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert conf["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert celery_ssl_conf("redis://:pw@redis:6379/0") == {}
    with_ca = celery_ssl_conf("rediss://h:1/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional")
    assert with_ca["broker_use_ssl"] == {"ssl_ca_certs": "/ca.pem",
                                         "ssl_cert_reqs": ssl.CERT_OPTIONAL}


def test_rediss_end_to_end_with_a_real_tls_redis(tmp_path, run_id) -> None:
    """redis-server with TLS only: the publisher, a real Celery worker and its client all
    speak to it through the one rediss:// URL (the worker crashed on such a URL)."""
    from services.core.tasks import SCORE_ALIGNMENT
    from tests.celery_worker import start_worker

    assert shutil.which("openssl"), "openssl is needed to make the test certificate"
    tls = _tls_files(tmp_path)
    (tmp_path / "redis").mkdir()
    server = RedisProcess(tmp_path / "redis", tls=tls).start()
    try:
        assert server.url.startswith("rediss://")
        with pytest.raises(redis.ConnectionError):  # plain TCP is not served
            redis.Redis(host="127.0.0.1", port=server.port, password=server.password,
                        socket_timeout=2).ping()
        client = connect(server.url)
        publisher = Publisher(client, run_id)
        publisher.publish(Stream.EVENTS, Event(run_id=run_id, event="paused"))
        assert publisher.close()
        assert [decode(f, Event).event for _, f in
                client.xrange(stream_key(run_id, Stream.EVENTS))] == ["paused"]
        with start_worker(server.url, tmp_path / "worker") as worker:
            # a snapshot id that is not there: the worker reads Redis over TLS and says so
            result = worker.call(SCORE_ALIGNMENT, run_id, "1-0")
            log = worker.log_tail()
        assert isinstance(result, dict) and result["status"] == "invalid", result
        assert server.password not in log, "the worker logged the Redis password"
    finally:
        server.stop()


def test_worker_app_takes_a_plain_rediss_url(monkeypatch) -> None:
    """The worker's app on ``rediss://host`` with nothing else: its result backend used to
    refuse it (no ssl_cert_reqs), crashing the worker; now both verify the certificate."""
    from services.core.settings import get_settings

    monkeypatch.setenv("SMART_TUNER_REDIS_URL", "rediss://:pw@redis.example:6380/0")
    get_settings.cache_clear()
    try:
        from services.diagnostics import celery_app

        app = celery_app.create_app()
        assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    finally:
        get_settings.cache_clear()
