"""The control API over real HTTP (uvicorn in a thread) and a real Redis; and the bounds."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.core import bounds, indicators
from services.core.bounds import check_command, check_value
from services.core.schemas import (
    SCHEMAS,
    VALUE_ACTIONS,
    Ack,
    ActionRecord,
    AlignmentReport,
    AlignmentScores,
    AttentionSample,
    AttentionSnapshot,
    Command,
    Event,
    Message,
    MetricsMessage,
    ProbeReport,
    Trigger,
    VerdictMessage,
    decode,
    encode,
)
from services.core.settings import ConfigError, get_settings
from services.core.streams import RUNS_KEY, Stream, alignment_png_key, stream_key
from services.tuner import api
from services.tuner.api import MAX_LIMIT, MAX_WAIT_S, RECENT_EVENTS, create_app

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDED = 5  # messages per stream in a seeded run (events: more than RECENT_EVENTS)
SEEDED_EVENTS = RECENT_EVENTS + 2
STARTUP_TIMEOUT_S = 10.0
STREAM_OF = {schema: stream for stream, schema in SCHEMAS.items()}


# --------------------------------------------------------------------------- harness


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STARTUP_TIMEOUT_S)
        sock.close()


@pytest.fixture(scope="module")
def store(redis_url: str) -> Iterator[redis.Redis]:
    """The test's own Redis client (the app has another)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(redis_url: str) -> Iterator[httpx.Client]:
    """An HTTP client for the API with a token configured, served for the whole module."""
    app_client = redis.Redis.from_url(redis_url)
    with serve(create_app(app_client, TOKEN)) as base_url, \
            httpx.Client(base_url=base_url, timeout=MAX_WAIT_S + 10) as client:
        yield client
    app_client.close()


@pytest.fixture(autouse=True)
def _forget_run(store: redis.Redis, run_id: str) -> Iterator[None]:
    """Remove the test's run from the shared Redis afterwards."""
    yield
    keys = list(store.scan_iter(match=f"smart-tuner:{run_id}:*"))
    if keys:
        store.delete(*keys)
    store.srem(RUNS_KEY, run_id)


def add(store: redis.Redis, message: Message) -> str:
    """XADD ``message`` to its run's stream, as the services do."""
    key = stream_key(message.run_id, STREAM_OF[type(message)])
    return store.xadd(key, encode(message)).decode()


def metrics_message(run_id: str, step: int, **changes: Any) -> MetricsMessage:
    fields = dict(run_id=run_id, step=step, loss=1.0 / (step + 1), mel=0.5, mel_postnet=0.4,
                  gate=0.1, guided_attention=0.05, objective=1.0, grad_norm=3.0, lr=1e-4,
                  guided_attention_weight=1.0, clip_threshold=1.0, step_seconds=0.2,
                  finite=True, skipped_steps=0)
    return MetricsMessage(**(fields | changes))


def scores(quality: float = 80.0) -> AlignmentScores:
    return AlignmentScores(diagonality=0.8, monotonicity=0.9, focus=0.7, coverage=0.95,
                           entropy=0.3, quality=quality)


def report(run_id: str, step: int, snapshot_id: str = "") -> AlignmentReport:
    return AlignmentReport(run_id=run_id, snapshot_id=snapshot_id or f"snap-{step}", step=step,
                           scores=scores(), per_sample=[scores(), scores(70.0)])


def command(run_id: str, value: float = 1e-4) -> Command:
    return Command(run_id=run_id, action="set_lr", value=value, source="tuner")


def action_record(run_id: str, index: int) -> ActionRecord:
    trigger = Trigger(rule="grad_norm_high", metric="grad_norm", value=150.0, threshold=100.0,
                      window=50)
    return ActionRecord(run_id=run_id, action_id=f"action-{index}", stage="issued",
                        trigger=trigger, command=command(run_id))


def ack(run_id: str, command_id: str, step: int = 7) -> Ack:
    return Ack(run_id=run_id, command_id=command_id, action="set_lr", status="applied",
               step=step, before=1e-3, after=1e-4, detail="learning rate set")


def snapshot(run_id: str, step: int = 40, snapshot_id: str = "snap-40") -> AttentionSnapshot:
    """A near-diagonal attention of 30 decoder steps over 12 tokens."""
    rows, cols = 30, 12
    matrix = np.zeros((rows, cols), dtype=np.float32)
    matrix[np.arange(rows), np.minimum(np.arange(rows) * cols // rows, cols - 1)] = 1.0
    sample = AttentionSample.from_array(matrix, input_length=cols, output_length=rows)
    return AttentionSnapshot(run_id=run_id, snapshot_id=snapshot_id, step=step, samples=[sample])


def register(store: redis.Redis, run_id: str) -> str:
    """Make ``run_id`` a known run with empty streams."""
    store.sadd(RUNS_KEY, run_id)
    return run_id


@pytest.fixture
def seeded(store: redis.Redis, run_id: str) -> str:
    """A known run with SEEDED messages in each stream (SEEDED_EVENTS events), steps 0..n."""
    register(store, run_id)
    for step in range(SEEDED):
        add(store, metrics_message(run_id, step))
        add(store, report(run_id, step))
        add(store, ack(run_id, f"cmd-{step}", step))
        add(store, action_record(run_id, step))
    for step in range(SEEDED_EVENTS):
        add(store, Event(run_id=run_id, event="checkpoint_saved", step=step))
    return run_id


def commands_written(store: redis.Redis, run_id: str) -> list[Command]:
    entries = store.xrange(stream_key(run_id, Stream.COMMANDS))
    return [decode(fields, Command) for _, fields in entries]


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the API's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- health, metrics


def test_healthz_pings_redis(http: httpx.Client) -> None:
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["redis_latency_ms"] >= 0


def test_redis_down_is_503_not_a_stack_trace() -> None:
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))  # fail at once, not after back-off
    with serve(create_app(dead, TOKEN)) as base_url, httpx.Client(base_url=base_url) as client:
        for path in ("/healthz", "/runs", "/runs/some-run"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert "Redis unreachable" in response.json()["detail"]


def test_metrics_count_requests_and_commands(http: httpx.Client, seeded: str) -> None:
    route = {"method": "GET", "route": "/runs/{run_id}", "status": "200"}
    before = {
        "state": metric(http, "smart_tuner_api_requests_total", **route),
        "unmatched": metric(http, "smart_tuner_api_requests_total", method="GET",
                            route="<unmatched>", status="404"),
        "accepted": metric(http, "smart_tuner_api_commands_accepted_total", action="set_lr"),
        "bounds": metric(http, "smart_tuner_api_commands_rejected_total", cause="out_of_bounds"),
        "invalid": metric(http, "smart_tuner_api_commands_rejected_total", cause="invalid"),
        "401": metric(http, "smart_tuner_api_commands_rejected_total", cause="unauthenticated"),
    }
    assert http.get(f"/runs/{seeded}").status_code == 200
    assert http.get("/no-such-path").status_code == 404
    url = f"/runs/{seeded}/commands"
    assert http.post(url, json={"action": "set_lr", "value": 1e-4}, headers=AUTH
                     ).status_code == 202
    assert http.post(url, json={"action": "set_lr", "value": 1.0}, headers=AUTH
                     ).status_code == 422
    assert http.post(url, json={"action": "pause", "value": 1.0}, headers=AUTH
                     ).status_code == 422
    assert http.post(url, json={"action": "pause"}).status_code == 401

    assert metric(http, "smart_tuner_api_requests_total", **route) == before["state"] + 1
    assert metric(http, "smart_tuner_api_requests_total", method="GET", route="<unmatched>",
                  status="404") == before["unmatched"] + 1
    assert metric(http, "smart_tuner_api_commands_accepted_total",
                  action="set_lr") == before["accepted"] + 1
    assert metric(http, "smart_tuner_api_commands_rejected_total",
                  cause="out_of_bounds") == before["bounds"] + 1
    assert metric(http, "smart_tuner_api_commands_rejected_total",
                  cause="invalid") == before["invalid"] + 1
    assert metric(http, "smart_tuner_api_commands_rejected_total",
                  cause="unauthenticated") == before["401"] + 1


def test_metrics_speak_openmetrics_when_asked(http: httpx.Client) -> None:
    plain = http.get("/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "smart_tuner_api_commands_accepted_total" in plain.text
    negotiated = http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert negotiated.headers["content-type"].startswith("application/openmetrics-text")
    assert negotiated.text.rstrip().endswith("# EOF")


# --------------------------------------------------------------------------- reading runs


def test_runs_lists_last_step_and_last_event(http: httpx.Client, seeded: str,
                                             store: redis.Redis) -> None:
    empty = register(store, f"{seeded}-empty")
    try:
        runs = {run["run_id"]: run for run in http.get("/runs").json()}
    finally:
        store.srem(RUNS_KEY, empty)
    assert runs[seeded]["last_step"] == SEEDED - 1
    assert runs[seeded]["last_event"]["step"] == SEEDED_EVENTS - 1
    assert runs[empty] == {"run_id": empty, "last_step": None, "last_event": None}


def test_run_state(http: httpx.Client, seeded: str) -> None:
    response = http.get(f"/runs/{seeded}")
    assert response.status_code == 200
    state = response.json()
    assert state["run_id"] == seeded
    assert state["latest_metrics"]["step"] == SEEDED - 1
    assert state["latest_alignment"]["snapshot_id"] == f"snap-{SEEDED - 1}"
    assert [event["step"] for event in state["recent_events"]] == list(
        range(SEEDED_EVENTS - RECENT_EVENTS, SEEDED_EVENTS))
    assert state["counts"] == {"metrics": SEEDED, "attention": 0, "diagnostics": SEEDED,
                               "commands": 0, "acks": SEEDED, "actions": SEEDED,
                               "events": SEEDED_EVENTS, "verdict": 0}
    assert state["verdict"] is None


def test_verdict_is_the_trainers_newest(http: httpx.Client, seeded: str,
                                        store: redis.Redis) -> None:
    """The API shows the verdict the trainer published, as published: it computes nothing."""
    assert http.get(f"/runs/{seeded}/verdict").status_code == 404
    # A verdict that contradicts the seeded metrics (grad norms of 1-ish): the trainer's
    # window saw a spike, so grad norm is not met; the API must say so too.
    checks = indicators.evaluate_indicators(25.0, 0.85, 0, 0.6, 83.0)
    for number, step in enumerate((100, 200)):
        checks[0] = checks[0].model_copy(update={"measured": f"largest of steps {step - 99}-"
                                                             f"{step}", "value": 25.0 - number})
        add(store, VerdictMessage(run_id=seeded, verdict=indicators.make_verdict(step, checks)))
    verdict = http.get(f"/runs/{seeded}/verdict").json()
    assert verdict["step"] == 200 and verdict["all_met"] is False
    assert verdict["indicators"][0] == {
        "name": indicators.GRAD_NORM, "value": 24.0, "threshold": indicators.GRAD_NORM_OK,
        "comparison": "<", "met": False, "measured": "largest of steps 101-200"}
    assert http.get(f"/runs/{seeded}").json()["verdict"] == verdict


def test_run_state_carries_the_newest_probe_pass(http: httpx.Client, seeded: str,
                                                store: redis.Redis) -> None:
    assert http.get(f"/runs/{seeded}").json()["latest_probes"] is None
    for step, stop in ((100, 25.0), (200, 91.7)):
        probes = ProbeReport(checkpoint_step=step, n=12, stop_percent=stop,
                             median_diagonality=0.8, median_quality=84.0, seconds=3.0)
        add(store, Event(run_id=seeded, event="probes", step=step + 3,
                                      data=probes.model_dump(mode="json")))
    # A later event of another kind does not hide it.
    add(store, Event(run_id=seeded, event="checkpoint_saved", step=300))
    state = http.get(f"/runs/{seeded}").json()
    assert state["latest_probes"]["checkpoint_step"] == 200
    assert state["latest_probes"]["stop_percent"] == pytest.approx(91.7)


@pytest.mark.parametrize(("path", "key", "seeded_count"), [
    ("metrics", "step", SEEDED),
    ("diagnostics", "step", SEEDED),
    ("acks", "step", SEEDED),
    ("actions", "action_id", SEEDED),
    ("events", "step", SEEDED_EVENTS),
])
def test_stream_endpoints_newest_last(http: httpx.Client, seeded: str, path: str, key: str,
                                      seeded_count: int) -> None:
    everything = http.get(f"/runs/{seeded}/{path}").json()
    assert len(everything) == seeded_count
    newest = http.get(f"/runs/{seeded}/{path}", params={"limit": 3}).json()
    assert [item[key] for item in newest] == [item[key] for item in everything[-3:]]
    assert all(item["run_id"] == seeded for item in newest)
    for bad_limit in (0, MAX_LIMIT + 1):
        assert http.get(f"/runs/{seeded}/{path}", params={"limit": bad_limit}
                        ).status_code == 422


def test_non_finite_metrics_are_served_and_bad_entries_skipped(
        http: httpx.Client, store: redis.Redis, run_id: str) -> None:
    register(store, run_id)
    add(store, metrics_message(run_id, 0))
    store.xadd(stream_key(run_id, Stream.METRICS), {"data": "{not json"})
    add(store, metrics_message(run_id, 1, loss=math.nan, grad_norm=math.inf, finite=False))
    served = http.get(f"/runs/{run_id}/metrics").json()  # NaN/Infinity as on the bus
    assert [item["step"] for item in served] == [0, 1]
    assert math.isnan(served[1]["loss"]) and math.isinf(served[1]["grad_norm"])
    assert http.get(f"/runs/{run_id}").json()["latest_metrics"]["finite"] is False


@pytest.mark.parametrize("suffix", ["", "/metrics", "/diagnostics", "/actions", "/events",
                                    "/acks", "/alignment.png"])
def test_unknown_run_is_404(http: httpx.Client, run_id: str, suffix: str) -> None:
    response = http.get(f"/runs/{run_id}{suffix}")
    assert response.status_code == 404
    assert run_id in response.json()["detail"]


@pytest.mark.parametrize("bad_id", ["-starts-with-dash", "x" * 65, "has:colon"])
def test_invalid_run_id_is_422(http: httpx.Client, bad_id: str) -> None:
    assert http.get(f"/runs/{bad_id}").status_code == 422
    assert http.get(f"/runs/{bad_id}/metrics").status_code == 422
    response = http.post(f"/runs/{bad_id}/commands", json={"action": "pause"}, headers=AUTH)
    assert response.status_code == 422


# --------------------------------------------------------------------------- alignment picture


def test_alignment_png_404_before_any_snapshot(http: httpx.Client, store: redis.Redis,
                                               run_id: str) -> None:
    register(store, run_id)
    response = http.get(f"/runs/{run_id}/alignment.png")
    assert response.status_code == 404
    assert "no alignment picture" in response.json()["detail"]


def test_alignment_png_drawn_from_newest_snapshot(http: httpx.Client, store: redis.Redis,
                                                  run_id: str) -> None:
    register(store, run_id)
    store.xadd(stream_key(run_id, Stream.ATTENTION), {"data": "garbage"})  # older, bad
    add(store, snapshot(run_id))
    add(store, report(run_id, 40, snapshot_id="snap-40"))
    store.set(alignment_png_key(run_id), b"not a png")  # ignored: not a PNG
    response = http.get(f"/runs/{run_id}/alignment.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    assert response.content.startswith(PNG_SIGNATURE) and len(response.content) > 1000


def test_alignment_png_prefers_the_stored_picture(http: httpx.Client, store: redis.Redis,
                                                  run_id: str) -> None:
    register(store, run_id)
    add(store, snapshot(run_id))
    stored = PNG_SIGNATURE + b"stored by the diagnostics worker"
    store.set(alignment_png_key(run_id), stored)
    response = http.get(f"/runs/{run_id}/alignment.png")
    assert response.status_code == 200
    assert response.content == stored


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": f"Basic {TOKEN}"}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer wrong-token-0123456789abcdef"}, 403),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403),
    ({"Authorization": "Bearer тест"}, 403),  # non-ASCII must not crash compare_digest
])
def test_commands_need_the_bearer_token(http: httpx.Client, store: redis.Redis, seeded: str,
                                        headers: dict[str, str], status: int) -> None:
    encoded = {name: value.encode() for name, value in headers.items()}
    response = http.post(f"/runs/{seeded}/commands", json={"action": "pause"}, headers=encoded)
    assert response.status_code == status
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert commands_written(store, seeded) == []


def test_commands_refused_when_no_token_is_configured(redis_url: str, store: redis.Redis,
                                                      seeded: str) -> None:
    app_client = redis.Redis.from_url(redis_url)
    with serve(create_app(app_client, None)) as base_url, \
            httpx.Client(base_url=base_url) as client:
        for headers in ({}, AUTH):
            response = client.post(f"/runs/{seeded}/commands", json={"action": "pause"},
                                   headers=headers)
            assert response.status_code == 503
            assert "no API token is configured" in response.json()["detail"]
        assert client.get(f"/runs/{seeded}").status_code == 200  # reading needs no token
    app_client.close()
    assert commands_written(store, seeded) == []


@pytest.mark.parametrize(("body", "reason"), [
    ({"action": "explode"}, "Input should be 'set_lr'"),
    ({"action": "set_lr"}, "set_lr needs a value"),
    ({"action": "set_lr", "value": 0.5}, "set_lr value 0.5 is outside [1e-06, 0.01]"),
    ({"action": "set_lr", "value": 1e-7}, "outside [1e-06, 0.01]"),
    ({"action": "set_grad_clip", "value": 0}, "set_grad_clip value 0 is outside"),
    ({"action": "set_guided_attention_weight", "value": -1}, "outside [0, 50]"),
    ({"action": "pause", "value": 1}, "pause takes no value"),
    ({"action": "set_lr", "value": 1e-4, "expires_in_s": 0}, "greater than 0"),
    ({"action": "set_lr", "value": 1e-4, "colour": "red"}, "Extra inputs are not permitted"),
    ({"action": "stop", "reason_text": "x" * 281}, "at most 280 characters"),
])
def test_invalid_commands_are_422_with_the_reason(
        http: httpx.Client, store: redis.Redis, seeded: str, body: dict[str, Any], reason: str,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=api.__name__):
        response = http.post(f"/runs/{seeded}/commands", json=body, headers=AUTH)
    assert response.status_code == 422
    messages = " | ".join(error["msg"] for error in response.json()["detail"])
    assert reason in messages
    assert commands_written(store, seeded) == []
    assert any(seeded in record.getMessage() and reason in record.getMessage()
               for record in caplog.records), "the refusal is logged with its reason"


def test_non_finite_value_is_refused(http: httpx.Client, store: redis.Redis,
                                     seeded: str) -> None:
    response = http.post(f"/runs/{seeded}/commands", content=b'{"action":"set_lr","value":NaN}',
                         headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 422
    assert commands_written(store, seeded) == []


def test_command_to_unknown_run_is_404(http: httpx.Client, store: redis.Redis,
                                       run_id: str) -> None:
    response = http.post(f"/runs/{run_id}/commands", json={"action": "pause"}, headers=AUTH)
    assert response.status_code == 404
    assert commands_written(store, run_id) == []


def test_valid_command_is_written_exactly_once(http: httpx.Client, store: redis.Redis,
                                               seeded: str) -> None:
    started = time.time()
    response = http.post(f"/runs/{seeded}/commands", headers=AUTH, json={
        "action": "set_lr", "value": 2e-4, "reason_text": "loss plateau", "expires_in_s": 60})
    assert response.status_code == 202
    body = response.json()
    assert body["ack"] is None
    [written] = commands_written(store, seeded)
    assert written.command_id == body["command_id"] == body["command"]["command_id"]
    assert (written.run_id, written.action, written.value, written.source) == (
        seeded, "set_lr", 2e-4, "api")
    assert written.requested_by == "api" and written.note == "loss plateau"
    assert started + 60 <= written.expires_at <= time.time() + 60
    [(entry_id, _)] = store.xrange(stream_key(seeded, Stream.COMMANDS))
    assert body["stream_id"] == entry_id.decode()

    response = http.post(f"/runs/{seeded}/commands", json={"action": "rollback"}, headers=AUTH)
    assert response.status_code == 202
    assert [c.action for c in commands_written(store, seeded)] == ["set_lr", "rollback"]
    assert commands_written(store, seeded)[1].value is None


def _ack_like_a_trainer(redis_url: str, run_id: str, done: threading.Event) -> None:
    """Wait for one command, ack another id first (must be ignored), then ack it."""
    client = redis.Redis.from_url(redis_url)
    try:
        reply = client.xread({stream_key(run_id, Stream.COMMANDS): "0-0"}, count=1, block=10_000)
        [(_, [(_, fields)])] = reply
        received = decode(fields, Command)
        time.sleep(0.2)  # the API is already waiting
        add(client, ack(run_id, "someone-else", step=11))
        add(client, ack(run_id, received.command_id, step=12))
    finally:
        client.close()
        done.set()


def test_wait_s_returns_the_trainers_ack(http: httpx.Client, redis_url: str, store: redis.Redis,
                                         seeded: str) -> None:
    done = threading.Event()
    trainer = threading.Thread(target=_ack_like_a_trainer, args=(redis_url, seeded, done),
                               daemon=True)
    trainer.start()
    response = http.post(f"/runs/{seeded}/commands", params={"wait_s": 10}, headers=AUTH,
                         json={"action": "set_lr", "value": 1e-4})
    trainer.join(10)
    assert done.is_set()
    assert response.status_code == 200
    body = response.json()
    assert body["ack"]["command_id"] == body["command_id"]
    assert (body["ack"]["status"], body["ack"]["step"]) == ("applied", 12)


def test_wait_s_without_an_ack_times_out_as_accepted(http: httpx.Client, store: redis.Redis,
                                                     seeded: str) -> None:
    started = time.monotonic()
    response = http.post(f"/runs/{seeded}/commands", params={"wait_s": 0.3}, headers=AUTH,
                         json={"action": "checkpoint_now"})
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 202
    assert response.json()["ack"] is None
    assert len(commands_written(store, seeded)) == 1
    too_long = http.post(f"/runs/{seeded}/commands", params={"wait_s": MAX_WAIT_S + 1},
                         headers=AUTH, json={"action": "checkpoint_now"})
    assert too_long.status_code == 422
    assert len(commands_written(store, seeded)) == 1


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_documents_every_endpoint(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    expected = {("get", "/healthz"), ("get", "/metrics"), ("get", "/runs"),
                ("get", "/runs/{run_id}"), ("get", "/runs/{run_id}/verdict"),
                ("get", "/runs/{run_id}/metrics"),
                ("get", "/runs/{run_id}/diagnostics"), ("get", "/runs/{run_id}/actions"),
                ("get", "/runs/{run_id}/events"), ("get", "/runs/{run_id}/acks"),
                ("get", "/runs/{run_id}/alignment.png"), ("post", "/runs/{run_id}/commands"),
                ("post", "/runs/{run_id}/approvals/{action_id}")}
    documented = {(method, path) for path, item in schema["paths"].items() for method in item}
    assert documented == expected
    for method, path in expected:
        operation = schema["paths"][path][method]
        assert operation["tags"] and operation["summary"] and operation["description"], path
        success = "202" if method == "post" else "200"
        assert all(content.get("schema") for content in
                   operation["responses"][success]["content"].values()), path
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                [content] = response["content"].values()
                assert content["schema"]["$ref"].rsplit("/", 1)[1] in schema[
                    "components"]["schemas"], (path, status)
        if "{run_id}" in path:
            assert {"404", "422"} <= set(operation["responses"]), path
    commands = schema["paths"]["/runs/{run_id}/commands"]["post"]
    assert {"200", "202", "401", "403", "404", "422", "503"} <= set(commands["responses"])
    assert commands["security"] == [{"HTTPBearer": []}]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert set(schema["components"]["schemas"]["CommandRequest"]["properties"]) == {
        "action", "value", "reason_text", "expires_in_s"}


# --------------------------------------------------------------------------- settings factory


def test_app_from_settings(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setattr(api, "setup_logging", lambda level: None)
    monkeypatch.delenv("SMART_TUNER_REDIS_URL", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="SMART_TUNER_REDIS_URL"):
            api.create_app_from_settings()
        get_settings.cache_clear()
        monkeypatch.setenv("SMART_TUNER_REDIS_URL", redis_url)
        monkeypatch.setenv("SMART_TUNER_API_TOKEN", TOKEN)
        built = api.app  # the lazy module-level app
        assert built is api.app
        assert built.state.context.token == TOKEN.encode()
        assert TOKEN not in repr(built.state.context)
    finally:
        api._default_app.cache_clear()
        get_settings.cache_clear()


# --------------------------------------------------------------------------- bounds


def test_value_bounds_cover_exactly_the_value_actions() -> None:
    assert set(bounds.VALUE_BOUNDS) == VALUE_ACTIONS


@pytest.mark.parametrize(("action", "low", "high"), [
    ("set_lr", bounds.LR_MIN, bounds.LR_MAX),
    ("set_guided_attention_weight", bounds.GA_WEIGHT_MIN, bounds.GA_WEIGHT_MAX),
    ("set_grad_clip", bounds.GRAD_CLIP_MIN, bounds.GRAD_CLIP_MAX),
])
def test_bounds_are_inclusive_and_finite(action: str, low: float, high: float) -> None:
    def make(value: float) -> Command:
        return Command(run_id="r", action=action, value=value, source="test")

    assert check_command(make(low)) is None
    assert check_command(make(high)) is None
    assert "outside" in check_command(make(high * 1.001))
    assert "outside" in check_command(make(low - max(low * 0.001, 1e-9)))
    for value in (math.nan, math.inf, -math.inf):
        assert "not a finite number" in check_command(make(value))


def test_value_less_actions() -> None:
    assert check_command(Command(run_id="r", action="rollback", source="test")) is None
    assert check_value("pause", 1.0) == "pause takes no value"
    assert check_value("set_lr", None) == "set_lr needs a value"
