"""What a client, authenticated or not, can make the control API spend: metric series,
memory for request bodies, CPU for pictures. Over real HTTP (uvicorn on a loopback port,
raw sockets where the point is what the server does before the body arrives) and a real
Redis."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterable, Iterator

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from services.tuner.api import KNOWN_METHODS, OTHER_LABEL, create_app
from services.tuner.limits import ApiLimits, RenderLimiter
from tests.test_api import (
    AUTH,
    PNG_SIGNATURE,
    TOKEN,
    add,
    commands_written,
    register,
    report,
    serve,
    snapshot,
)

SOCKET_TIMEOUT_S = 10.0  # far beyond an answer; a server waiting for a body never answers
HUGE = 30 * 1024 * 1024
CAP = 4096  # the body cap of the apps below
CHUNK = 16 * 1024


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def app_url(redis_url: str, store: redis.Redis, run_id: str) -> Iterator[str]:
    """An API with a token, a small body cap and one render per client per window."""
    app_client = redis.Redis.from_url(redis_url)
    limits = ApiLimits(max_body_bytes=CAP, renders_per_client=1, renders_total=100,
                       render_window_s=3600.0, png_cache_entries=8)
    with serve(create_app(app_client, TOKEN, limits)) as base_url:
        yield base_url
    app_client.close()
    keys = list(store.scan_iter(match=f"smart-tuner:{run_id}:*"))
    if keys:
        store.delete(*keys)
    store.srem("smart-tuner:runs", run_id)


def samples(base_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(f"{base_url}/metrics").text
    return [(sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def raw_request(base_url: str, head: str, body_parts: Iterable[bytes] = ()
                ) -> tuple[bytes, int]:
    """Send ``head`` (request line and headers) and then body parts until the server answers
    or closes; returns the status line and how many body bytes went out before that."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head.encode("latin-1"))
        sent = 0
        sock.setblocking(False)
        for part in body_parts:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # an answer came: stop sending
            except BlockingIOError:
                pass
            except ConnectionError:
                break
            try:
                sock.setblocking(True)
                sock.sendall(part)
                sent += len(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                sock.setblocking(False)
        sock.setblocking(True)
        sock.settimeout(SOCKET_TIMEOUT_S)
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            answer = b""  # the server is still waiting for the body
        return answer.split(b"\r\n", 1)[0], sent


# --------------------------------------------------------------------------- item 5: labels


def test_invented_methods_and_paths_fold_into_bounded_labels(app_url: str) -> None:
    with httpx.Client(base_url=app_url) as client:
        for index in range(20):
            client.request(f"BREW{index}", f"/coffee-{uuid.uuid4().hex}")
            client.request(f"X{index}", "/healthz")
            client.get(f"/no/such/{index}")
    series = samples(app_url, "smart_tuner_api_requests_total")
    methods = {labels["method"] for labels, _ in series}
    routes = {labels["route"] for labels, _ in series}
    assert methods <= set(KNOWN_METHODS) | {OTHER_LABEL}, methods
    assert OTHER_LABEL in methods
    assert all(not route.startswith(("/coffee", "/no/")) for route in routes), routes
    # 40 requests with invented methods, each counted in the "other" series
    other = sum(value for labels, value in series if labels["method"] == OTHER_LABEL)
    assert other == 40


# --------------------------------------------------------------------------- item 6: bodies


def _post_head(run_id: str, headers: dict[str, str]) -> str:
    lines = [f"POST /runs/{run_id}/commands HTTP/1.1", "Host: test",
             *(f"{name}: {value}" for name, value in headers.items())]
    return "\r\n".join(lines) + "\r\n\r\n"


def test_unauthenticated_huge_post_is_refused_before_its_body(app_url: str, store: redis.Redis,
                                                              run_id: str) -> None:
    register(store, run_id)
    status, sent = raw_request(app_url, _post_head(run_id, {
        "Content-Type": "application/json", "Content-Length": str(HUGE)}))
    assert status.split()[1] == b"401"
    assert sent == 0
    wrong = {"Authorization": "Bearer wrong-token-0123456789abcdef",
             "Content-Type": "application/json", "Content-Length": str(HUGE)}
    status, _ = raw_request(app_url, _post_head(run_id, wrong))
    assert status.split()[1] == b"403"
    assert commands_written(store, run_id) == []


def test_unauthenticated_chunked_post_is_refused_before_its_body(
        app_url: str, store: redis.Redis, run_id: str) -> None:
    register(store, run_id)
    chunks = (f"{CHUNK:x}\r\n".encode() + b"x" * CHUNK + b"\r\n" for _ in range(HUGE // CHUNK))
    status, sent = raw_request(app_url, _post_head(run_id, {
        "Content-Type": "application/json", "Transfer-Encoding": "chunked"}), chunks)
    assert status.split()[1] == b"401"
    assert sent < HUGE // 4  # refused long before the client finished sending


def test_authenticated_body_over_the_cap_is_413(app_url: str, store: redis.Redis,
                                                run_id: str) -> None:
    register(store, run_id)
    head = _post_head(run_id, {**AUTH, "Content-Type": "application/json",
                               "Content-Length": str(HUGE)})
    status, _ = raw_request(app_url, head)
    assert status.split()[1] == b"413"
    chunks = (f"{CHUNK:x}\r\n".encode() + b" " * CHUNK + b"\r\n" for _ in range(HUGE // CHUNK))
    status, sent = raw_request(app_url, _post_head(run_id, {
        **AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}), chunks)
    assert status.split()[1] == b"413"
    assert sent < HUGE // 4
    # Under the cap, a command still goes through.
    response = httpx.post(f"{app_url}/runs/{run_id}/commands", headers=AUTH,
                          json={"action": "pause", "reason_text": "y" * 200})
    assert response.status_code == 202
    assert [c.action for c in commands_written(store, run_id)] == ["pause"]
    rejected = dict((labels["cause"], value) for labels, value in
                    samples(app_url, "smart_tuner_api_commands_rejected_total"))
    assert rejected["too_large"] == 2


def test_body_cap_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.core.settings import load_settings

    monkeypatch.setenv("SMART_TUNER_API_MAX_BODY_BYTES", "2048")
    assert ApiLimits.from_settings(load_settings()).max_body_bytes == 2048


# --------------------------------------------------------------------------- item 7: pictures


def test_alignment_png_is_rendered_once_per_snapshot(app_url: str, store: redis.Redis,
                                                     run_id: str) -> None:
    register(store, run_id)
    add(store, snapshot(run_id, 40, "snap-40"))
    add(store, report(run_id, 40, snapshot_id="snap-40"))
    with httpx.Client(base_url=app_url) as client:
        pictures = [client.get(f"/runs/{run_id}/alignment.png") for _ in range(5)]
    assert [p.status_code for p in pictures] == [200] * 5
    assert pictures[0].content.startswith(PNG_SIGNATURE)
    assert all(p.content == pictures[0].content for p in pictures)
    renders = samples(app_url, "smart_tuner_api_png_renders_total")
    assert sum(value for _, value in renders) == 1


def test_alignment_png_rendering_is_rate_limited(app_url: str, store: redis.Redis,
                                                 run_id: str) -> None:
    register(store, run_id)
    add(store, snapshot(run_id, 40, "snap-40"))
    with httpx.Client(base_url=app_url) as client:
        assert client.get(f"/runs/{run_id}/alignment.png").status_code == 200
        add(store, snapshot(run_id, 50, "snap-50"))  # a new snapshot: a new render
        limited = client.get(f"/runs/{run_id}/alignment.png")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        # The stored picture of the diagnostics worker costs no render: never limited.
        store.set(f"smart-tuner:{run_id}:alignment-png", PNG_SIGNATURE + b"stored")
        assert client.get(f"/runs/{run_id}/alignment.png").status_code == 200


def test_render_limiter_bounds_each_client_and_the_total() -> None:
    now = [0.0]
    limiter = RenderLimiter(per_client=2, total=3, window_s=60.0, max_clients=2,
                            clock=lambda: now[0])
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    wait = limiter.acquire("a")
    assert wait is not None and 0 < wait <= 60.0
    assert limiter.acquire("b") is None
    total_wait = limiter.acquire("c")  # c is fresh, but the total is spent
    assert total_wait is not None and total_wait > 0
    assert len(limiter.clients) <= 2  # bounded memory of clients
    now[0] = 61.0
    assert limiter.acquire("a") is None
