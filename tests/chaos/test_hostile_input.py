"""Hostile input into every consumer, command path and door.

Injected: stream entries fuzzed with hypothesis (not JSON, wrong types, unknown versions,
invalid or foreign run ids, bad base64 and bad compression in attention, an oversized
payload) into the tuner's, the notifier's and the trainer's consumers and the diagnostics
task; commands out of bounds; API calls without or with a wrong token; Telegram updates from
unknown chats. Must hold: nothing crashes, nothing is applied, every rejection has a reason
on record (the dead-letter stream, a rejected ack, a logged and counted refusal).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from services.core.bus import Consumer, connect
from services.core.schemas import (
    MAX_WIRE_BYTES,
    AttentionSnapshot,
    Command,
    MetricsMessage,
    decode,
)
from services.core.streams import DEAD_LETTER_STREAM, RUNS_KEY, Stream, stream_key
from services.core.tasks import SCORE_ALIGNMENT
from services.tuner.api import create_app
from services.tuner.config import TunerConfig
from services.tuner.service import TunerService
from tests.celery_worker import Worker, start_worker
from tests.test_api import serve
from tests.test_diagnostics_worker import diagonal, sample, snapshot
from tests.test_notifier_reports import metrics as valid_metrics

FUZZ = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
NUMBER_FIELDS = ("step", "loss", "grad_norm", "lr", "objective")
NOT_A_NUMBER = st.one_of(st.none(), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                         st.text(alphabet="abcxyz!", min_size=1, max_size=8))
BAD_RUN_IDS = st.one_of(st.just(""), st.just("../etc/passwd"), st.just("a b"),
                        st.text(alphabet="/\\:* ", min_size=1, max_size=10),
                        st.text(min_size=65, max_size=80))


def _metrics_dict(run_id: str) -> dict[str, Any]:
    return json.loads(valid_metrics(run_id=run_id, step=5).model_dump_json())


@st.composite
def hostile_metrics(draw: st.DrawFn, run_id: str) -> dict[str, Any]:
    """Stream entry fields that no consumer may accept as a metrics message."""
    kind = draw(st.sampled_from(["bytes", "text", "json_list", "version", "type", "run_id",
                                 "missing_field", "foreign_run", "nan_json"]))
    body = _metrics_dict(run_id)
    if kind == "bytes":
        return {"data": draw(st.binary(max_size=64))}
    if kind == "text":
        return {"data": draw(st.text(max_size=64).filter(lambda t: not t.startswith("{")))}
    if kind == "json_list":
        return {"data": json.dumps(draw(st.lists(st.integers(), max_size=4)))}
    if kind == "version":
        body["v"] = draw(st.integers().filter(lambda v: v != 1))
    elif kind == "type":
        body[draw(st.sampled_from(NUMBER_FIELDS))] = draw(NOT_A_NUMBER)
    elif kind == "run_id":
        body["run_id"] = draw(BAD_RUN_IDS)
    elif kind == "missing_field":
        return {"payload": json.dumps(body)}
    elif kind == "foreign_run":
        body["run_id"] = f"other-{uuid.uuid4().hex[:6]}"
    else:
        body["step"] = -draw(st.integers(min_value=1))
    return {"data": json.dumps(body)}


def _dead_letters(client: redis.Redis, key: str, ids: list[str]) -> dict[str, str]:
    """entry id -> reason, of the dead-letter records of ``key`` among ``ids``."""
    found = {}
    for _, fields in client.xrevrange(DEAD_LETTER_STREAM, count=5000):
        if fields[b"stream"].decode() == key and fields[b"id"].decode() in ids:
            found[fields[b"id"].decode()] = fields[b"reason"].decode()
    return found


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return connect(redis_url)


def _record_rejections(row: Any, ids: list[str], reasons: dict[str, str],
                       applied: bool = False) -> None:
    """Add a batch of hostile entries to ``row``: survived are those refused with a reason
    on record (none, if anything was applied); lost, those with no dead-letter record."""
    row.injected += len(ids)
    on_record = sum(bool(reasons.get(i)) for i in ids)
    row.survived += 0 if applied else on_record
    row.lost = (row.lost or 0) + len(ids) - on_record


def test_tuner_survives_fuzzed_streams(client: redis.Redis, chaos) -> None:
    row = chaos("fuzzed entries into the tuner")

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        run_id = f"fuzz-{uuid.uuid4().hex[:10]}"
        key = stream_key(run_id, Stream.METRICS)
        entries = data.draw(st.lists(hostile_metrics(run_id), min_size=1, max_size=6))
        ids = [client.xadd(key, fields).decode() for fields in entries]
        tuner = TunerService(client, TunerConfig(), group=f"tuner-{run_id}", runs=[run_id])
        for _ in range(2):
            tuner.run_once(block_ms=10)
        reasons = _dead_letters(client, key, ids)
        _record_rejections(row, ids, reasons,
                           applied=client.xlen(stream_key(run_id, Stream.COMMANDS)) > 0)
        assert set(reasons) == set(ids) and all(reasons.values())
        assert client.xlen(stream_key(run_id, Stream.COMMANDS)) == 0
        assert client.xpending(key, f"tuner-{run_id}")["pending"] == 0

    run()


def test_notifier_and_trainer_consumers_dead_letter_fuzz(client: redis.Redis, chaos) -> None:
    """The same fuzz through the bus consumer every other service uses (notifier feed,
    trainer command reader), with each one's schema."""
    row = chaos("fuzzed entries into the bus consumers")

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        run_id = f"fuzz-{uuid.uuid4().hex[:10]}"
        for stream in (Stream.METRICS, Stream.COMMANDS, Stream.EVENTS):
            key = stream_key(run_id, stream)
            entries = data.draw(st.lists(hostile_metrics(run_id), min_size=1, max_size=4))
            # foreign-run entries are valid messages; those the consumers reject later
            entries = [e for e in entries if "other-" not in str(e.get("data", ""))] or [
                {"data": "not json"}]
            ids = [client.xadd(key, fields).decode() for fields in entries]
            consumer = Consumer(client, {key: stream}, f"g-{run_id}", "c")
            delivered = consumer.poll(block_ms=None)
            reasons = _dead_letters(client, key, ids)
            _record_rejections(row, ids, reasons, applied=bool(delivered))
            assert delivered == []
            assert set(reasons) == set(ids) and all(reasons.values())

    run()


def test_oversized_entry_is_refused_unread(client: redis.Redis, chaos) -> None:
    row = chaos("oversized entry (8 MiB + 1)")
    run_id = f"fuzz-{uuid.uuid4().hex[:10]}"
    key = stream_key(run_id, Stream.METRICS)
    entry = client.xadd(key, {"data": "x" * (MAX_WIRE_BYTES + 1)}).decode()
    tuner = TunerService(client, TunerConfig(), group=f"tuner-{run_id}", runs=[run_id])
    tuner.run_once(block_ms=10)
    reasons = _dead_letters(client, key, [entry])
    _record_rejections(row, [entry], reasons)
    reason = reasons[entry]
    assert "exceeds" in reason


def _bad_attention(run_id: str, kind: str) -> dict[str, str]:
    good = snapshot(run_id, [sample(diagonal(20, 8))])
    body = json.loads(good.model_dump_json())
    sample_body = body["samples"][0]
    if kind == "base64":
        sample_body["data"] = "!!! not base64 !!!"
    elif kind == "compression":
        sample_body["encoding"] = "f16-zlib-b64"
        sample_body["data"] = base64.b64encode(b"definitely not zlib").decode()
    elif kind == "shape":
        sample_body["shape"] = [999, 999]
    else:  # nan
        sample_body["data"] = base64.b64encode(b"\x00\x7e" * 160).decode()  # float16 NaN
        sample_body["encoding"] = "f16-b64"
    return {"data": json.dumps(body)}


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A real diagnostics worker (one pool process) on a queue of its own."""
    with start_worker(redis_url, tmp_path_factory.mktemp("hostile-worker")) as handle:
        yield handle


@pytest.mark.parametrize("kind", ["base64", "compression", "shape", "nan"])
def test_diagnostics_refuses_bad_attention(client: redis.Redis, worker: Worker, kind: str,
                                           chaos) -> None:
    row = chaos(f"attention with bad {kind}")
    run_id = f"fuzz-{uuid.uuid4().hex[:10]}"
    key = stream_key(run_id, Stream.ATTENTION)
    entry = client.xadd(key, _bad_attention(run_id, kind)).decode()
    result = worker.call(SCORE_ALIGNMENT, run_id, entry)
    reason = [f[b"reason"].decode() for _, f in client.xrevrange(DEAD_LETTER_STREAM, count=50)
              if f[b"id"].decode() == entry]
    scored = client.xlen(stream_key(run_id, Stream.DIAGNOSTICS)) > 0
    _record_rejections(row, [entry], {entry: reason[0]} if reason else {},
                       applied=scored or result["status"] != "invalid")
    assert result["status"] == "invalid" and result["reason"]
    assert reason and reason[0] == result["reason"]
    assert not scored


TOKEN = "a-token-of-sixteen-chars"
API_RUN = "fuzz-api"


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[str]:
    """The control API under real uvicorn, with a token configured."""
    client = connect(redis_url)
    client.sadd(RUNS_KEY, API_RUN)
    with serve(create_app(client, TOKEN)) as url:
        yield url


def test_out_of_bounds_commands_never_pass_the_api(api: str, client: redis.Redis) -> None:
    from services.core.bounds import check_value

    @FUZZ
    @given(action=st.sampled_from(["set_lr", "set_guided_attention_weight", "set_grad_clip"]),
           value=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                           st.floats(min_value=1e3, max_value=1e12)))
    def run(action: str, value: float) -> None:
        if check_value(action, value) is None:
            return  # a value within bounds is not hostile
        before = client.xlen(stream_key(API_RUN, Stream.COMMANDS))
        answer = httpx.post(f"{api}/runs/{API_RUN}/commands", content=json.dumps(
            {"action": action, "value": value}, allow_nan=True),
            headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
            timeout=10)
        assert answer.status_code == 422 and answer.json()["detail"]
        assert client.xlen(stream_key(API_RUN, Stream.COMMANDS)) == before

    run()


def _rejected(metrics_text: str, cause: str) -> int:
    """The API's count of commands rejected for ``cause``, from its /metrics text."""
    for family in text_string_to_metric_families(metrics_text):
        for sample_ in family.samples:
            if (sample_.name == "smart_tuner_api_commands_rejected_total"
                    and sample_.labels.get("cause") == cause):
                return int(sample_.value)
    return 0


def test_api_without_or_with_a_wrong_token_writes_nothing(api: str, client: redis.Redis,
                                                          chaos) -> None:
    row = chaos("API calls without / with a wrong token")
    key = stream_key(API_RUN, Stream.COMMANDS)
    before = client.xlen(key)
    url = f"{api}/runs/{API_RUN}/commands"
    body = {"action": "stop"}
    answers = [httpx.post(url, json=body, timeout=10),
               httpx.post(url, json=body, timeout=10,
                          headers={"Authorization": "Bearer wrong-token-of-sixteen"}),
               httpx.post(url, json=body, timeout=10,
                          headers={"Authorization": f"Basic {TOKEN}"})]
    metrics = httpx.get(f"{api}/metrics", timeout=10).text
    # Measured: refused calls (401/403, nothing written); lost: refusals the API's own
    # counters do not show.
    row.injected = len(answers)
    written = client.xlen(key) != before
    row.survived = 0 if written else sum(a.status_code in (401, 403) for a in answers)
    counted = sum(_rejected(metrics, cause) for cause in ("unauthenticated", "forbidden"))
    row.lost = max(0, len(answers) - counted)
    assert [a.status_code for a in answers] == [401, 403, 401]
    assert client.xlen(key) == before
    assert 'smart_tuner_api_commands_rejected_total{cause="unauthenticated"} 2.0' in metrics
    assert 'smart_tuner_api_commands_rejected_total{cause="forbidden"} 1.0' in metrics


def test_trainer_rejects_foreign_and_out_of_bounds_commands(redis_url: str) -> None:
    """The trainer's own checks, behind the API's: run id, bounds, expiry; each rejection
    is an ack with the reason, and the trainer's settings do not move."""
    from services.trainer.commands import CommandHandler

    class Knobs:  # what CommandHandler.apply reads and sets on a Trainer
        def __init__(self) -> None:
            self.step, self.calls = 10, []

        def set_lr(self, value: float, source: str = "") -> tuple[float, float]:
            self.calls.append(("set_lr", value))
            return 1e-3, value

    run_id = f"fuzz-{uuid.uuid4().hex[:10]}"
    client = connect(redis_url)
    from services.core.bus import Publisher

    publisher = Publisher(client, run_id)
    handler = CommandHandler(client, run_id, publisher)
    knobs = Knobs()
    try:
        hostile = [Command(run_id="someone-else", action="set_lr", value=1e-4, source="test"),
                   Command(run_id=run_id, action="set_lr", value=5.0, source="test"),
                   Command(run_id=run_id, action="set_lr", value=1e-4, source="test",
                           expires_at=1.0)]
        acks = [handler.apply(knobs, command) for command in hostile]  # type: ignore[arg-type]
    finally:
        handler.close()
        publisher.close()
    assert [a.status for a in acks] == ["rejected", "rejected", "expired"]
    assert all(a.detail for a in acks[:2])
    assert knobs.calls == []


def test_telegram_strangers_are_refused_with_reasons(telegram, redis_url, tmp_path,
                                                     caplog, chaos) -> None:
    from tests.notifier_harness import RunningNotifier, notifier_settings

    row = chaos("Telegram updates from unknown chats")
    strangers = [(9_000 + i, text) for i, text in enumerate(
        ["/stop", "/lr 1", "/ga 50", "/pause", "/rollback", "/status", "hello", "/sample x"])]
    settings_ = notifier_settings(telegram, tmp_path, chat_ids=(1001,), language="en")
    with RunningNotifier(settings_, redis_url, telegram) as notifier:
        for chat, text in strangers:
            telegram.push_message(chat, text)
        registry = notifier.notifier.registry
        refused = 0.0
        deadline = time.monotonic() + 20
        while refused < len(strangers) and time.monotonic() < deadline:
            time.sleep(0.05)
            refused = registry.get_sample_value("smart_tuner_notifier_bot_refusals_total",
                                                {"reason": "chat"}) or 0.0
        time.sleep(0.5)  # the answered refusals go out
    refusals = [r for r in caplog.records if "allow-list" in r.getMessage()]
    # Measured: refusals the bot counted; lost: updates with no logged refusal.
    row.injected = len(strangers)
    row.survived = int(refused or 0)
    row.lost = max(0, len(strangers) - len(refusals))
    assert refused == len(strangers)
    assert len(refusals) == len(strangers)
    # Replies are rate-limited (a few a minute in all); whatever is sent is the refusal.
    sent = [c.params["text"] for chat, _ in strangers
            for c in telegram.calls("sendMessage", chat)]
    assert 0 < len(sent) <= settings_.refusals_per_minute
    assert all("only answers its team" in s for s in sent)


def test_decode_never_raises_anything_but_message_error() -> None:
    """The one parser every consumer uses: any bytes in, a MessageError (with a reason) or a
    message out, never another exception."""
    from services.core.schemas import MessageError

    @FUZZ
    @given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
    def run(raw: bytes | str) -> None:
        for schema in (MetricsMessage, Command, AttentionSnapshot):
            try:
                decode({"data": raw}, schema)
            except MessageError as error:
                assert error.reason

    run()
