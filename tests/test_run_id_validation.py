"""Run ids and approval tokens are matched against the whole string: ``$`` in ``re.match``
also matches before a trailing newline, so "run\\n" used to pass as a run id."""

from __future__ import annotations

import pytest
import redis
from pydantic import ValidationError

from services.core.runstore import RunStore
from services.core.schemas import Event
from services.core.streams import RUNS_KEY, Stream, stream_key, validate_run_id

TRAILING = ["run\n", "run-1\n", "a\r\n"]


@pytest.mark.parametrize("bad", TRAILING)
def test_validate_run_id_refuses_a_trailing_newline(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid run id"):
        validate_run_id(bad)
    with pytest.raises(ValueError):
        stream_key(bad, Stream.EVENTS)


@pytest.mark.parametrize("bad", TRAILING)
def test_messages_refuse_a_run_id_with_a_trailing_newline(bad: str) -> None:
    with pytest.raises(ValidationError):
        Event(run_id=bad, event="paused")


def test_runs_set_member_with_a_newline_is_ignored(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    member = "newline-run\n"
    client.sadd(RUNS_KEY, member)
    try:
        assert member not in RunStore(client).run_ids()
    finally:
        client.srem(RUNS_KEY, member)
        client.close()


def test_approval_token_with_a_trailing_newline_is_malformed(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = RunStore(client)
    token = store.approval_token("token-run", "action-1", 60)
    try:
        assert store.approval_target(token) == ("token-run", "action-1")
        assert store.approval_target(token + "\n") is None
    finally:
        client.delete(f"smart-tuner:approval-token:{token}")
        client.close()


def test_a_stream_entry_id_with_a_trailing_newline_is_no_full_id(redis_url: str) -> None:
    """The diagnostics task reads one exact entry: ``1-1\\n`` must not pass as ``1-1``."""
    from services.diagnostics.tasks import InvalidRequestError, read_entry

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    entry = client.xadd(stream_key("entry-id-run", Stream.ATTENTION), {"k": "v"})
    assert read_entry(client, "entry-id-run", entry)[0] == entry
    with pytest.raises(InvalidRequestError, match="not a full stream id"):
        read_entry(client, "entry-id-run", entry + "\n")


def test_a_telegram_token_with_a_trailing_newline_is_refused(monkeypatch) -> None:
    """A token pasted with its newline fails at start-up, named, instead of at the first
    call to Telegram."""
    from services.notifier.config import NotifierSettings

    token = "123456789:" + "A" * 35
    monkeypatch.setenv("SMART_TUNER_NOTIFIER_CHAT_IDS", "42")
    monkeypatch.setenv("SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN", token)
    assert NotifierSettings(_env_file=None).telegram_token.get_secret_value() == token
    monkeypatch.setenv("SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN", token + "\n")
    with pytest.raises(ValidationError, match="telegram_token"):
        NotifierSettings(_env_file=None)
