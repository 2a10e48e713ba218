"""The notifier's send queue against the Telegram stand-in, over real HTTP through aiogram.

Each test drives an ``Outbox`` in its own ``asyncio.run``; the stand-in records what reached
"Telegram" (parameters, uploaded bytes, arrival times, statuses), so pacing, retries and
fallbacks are checked on the server side, as Telegram would see them. Policies use short
intervals to keep the file fast; the 429 test waits the real ``retry_after`` of 1 s.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramBadRequest, TelegramUnauthorizedError
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup
from prometheus_client import CollectorRegistry

from services.notifier.delivery import (
    DeliveryMetrics,
    DeliveryPolicy,
    Outbox,
)
from services.notifier.reports import (
    MESSAGES,
    TELEGRAM_MESSAGE_LIMIT,
    to_plain_text,
    utf16_length,
)
from tests.telegram_stand_in import TEST_TOKEN, RecordedCall, TelegramStandIn, parse_html

CHAT = 4242
OTHER_CHAT = -100777
FAST = DeliveryPolicy(per_chat_interval_s=0.05, global_rate_per_s=1000.0, max_attempts=4,
                      backoff_base_s=0.05, backoff_max_s=1.0, max_retry_after_s=5.0)
LOGGER = "services.notifier.delivery"
T = TypeVar("T")


class FixedJitter(random.Random):
    """Backoff jitter pinned to the middle, so expected waits are exact."""

    def random(self) -> float:
        return 0.5


def make_bot(standin: TelegramStandIn, token: str = TEST_TOKEN) -> Bot:
    return Bot(token, session=AiohttpSession(api=TelegramAPIServer.from_base(standin.base_url)))


def run_outbox(standin: TelegramStandIn, body: Callable[[Outbox], Awaitable[T]],
               policy: DeliveryPolicy = FAST, metrics: DeliveryMetrics | None = None,
               rng: random.Random | None = None) -> T:
    """``body(outbox)`` in a fresh event loop; the outbox and the bot's session closed after."""

    async def main() -> T:
        bot = make_bot(standin)
        outbox = Outbox(bot, policy, metrics, rng=rng)
        try:
            return await body(outbox)
        finally:
            await outbox.close(timeout_s=5.0)
            await bot.session.close()

    return asyncio.run(main())


def sample(metrics: DeliveryMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no series {name}{labels}"
    return value


def failures(metrics: DeliveryMetrics, reason: str, kind: str = "text") -> float:
    return sample(metrics, "smart_tuner_notifier_delivery_failures_total", kind=kind,
                  reason=reason)


def retries(metrics: DeliveryMetrics, cause: str) -> float:
    return sample(metrics, "smart_tuner_notifier_delivery_retries_total", cause=cause)


def gaps(calls: list[RecordedCall]) -> list[float]:
    return [later.at - earlier.at for earlier, later in itertools.pairwise(calls)]


def png(width: int, height: int) -> bytes:
    """A valid RGB PNG of the given size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    rows = b"".join(b"\x00" + bytes((x * 7 + y) % 256 for x in range(width * 3))
                    for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def keyboard() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text="Pause", callback_data="pause:r1")]])


# ---------------------------------------------------------------------------- sending


def test_text_is_sent_in_html_parse_mode(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    text = "🤖 <b>Smart Tuner</b> · <code>run-1</code> &amp; step 10"

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, text, reply_markup=keyboard())

    assert run_outbox(telegram, body, metrics=metrics) is True
    [call] = telegram.calls("sendMessage")
    assert call.status == 200
    assert call.params["chat_id"] == CHAT
    assert call.params["text"] == text
    assert call.params["parse_mode"] == "HTML"
    assert call.params["reply_markup"] == {
        "inline_keyboard": [[{"text": "Pause", "callback_data": "pause:r1"}]]}
    assert sample(metrics, "smart_tuner_notifier_deliveries_total", kind="text",
                  outcome="sent") == 1
    assert sample(metrics, "smart_tuner_notifier_queue_depth") == 0


def test_long_text_is_split_into_ordered_messages_within_the_limit(
        telegram: TelegramStandIn) -> None:
    # Cyrillic and emoji (two UTF-16 units each) make UTF-16 length differ from len().
    text = "\n".join(f"🎯 <b>Строка {i}</b>: <code>loss={i / 7:.5f}</code> · "
                     + "данные " * 12 for i in range(260))
    assert utf16_length(text) > 3 * TELEGRAM_MESSAGE_LIMIT

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, text, reply_markup=keyboard())

    assert run_outbox(telegram, body) is True
    calls = telegram.calls("sendMessage", chat_id=CHAT)
    assert len(calls) >= 4
    assert all(call.status == 200 for call in calls)
    assert all(utf16_length(call.params["text"]) <= TELEGRAM_MESSAGE_LIMIT for call in calls)
    assert "\n".join(call.params["text"] for call in calls) == text  # in order, nothing lost
    assert [("reply_markup" in call.params) for call in calls] == [False] * (len(calls) - 1) \
        + [True]


def test_429_waits_the_retry_after_then_delivers(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    telegram.fail_next("sendMessage", 429, retry_after=1)

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "throttled once")

    assert run_outbox(telegram, body, metrics=metrics) is True
    calls = telegram.calls("sendMessage")
    assert [call.status for call in calls] == [429, 200]
    assert calls[1].at - calls[0].at >= 1.0
    assert calls[1].params["text"] == "throttled once"
    assert retries(metrics, "retry_after") == 1


def test_server_errors_are_retried_with_growing_backoff(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    policy = DeliveryPolicy(per_chat_interval_s=0.01, global_rate_per_s=1000.0,
                            backoff_base_s=0.2, backoff_max_s=5.0)
    telegram.fail_next("sendMessage", 500)
    # A proxy in front of Telegram answers a 502 with an HTML page, not Telegram's JSON.
    telegram.fail_next("sendMessage", 502, body="<html><h1>502 Bad Gateway</h1></html>")

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "after two 5xx")

    assert run_outbox(telegram, body, policy=policy, metrics=metrics, rng=FixedJitter()) is True
    calls = telegram.calls("sendMessage")
    assert [call.status for call in calls] == [500, 502, 200]
    first, second = gaps(calls)
    assert first >= policy.backoff_s(0, 0.5) == pytest.approx(0.15)
    assert second >= policy.backoff_s(1, 0.5) == pytest.approx(0.3)
    assert second > first
    assert retries(metrics, "server_error") == 2


def test_an_accepted_send_with_an_unreadable_answer_is_not_repeated(
        telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    # Telegram said ok, but with a result aiogram cannot parse as a Message.
    telegram.fail_next("sendMessage", 200, body='{"ok": true, "result": {"unexpected": 1}}')

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "sent once")

    assert run_outbox(telegram, body, metrics=metrics) is True
    assert [call.status for call in telegram.calls("sendMessage")] == [200]
    assert retries(metrics, "server_error") == 0


def test_dropped_connection_is_retried(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    telegram.drop_next("sendMessage")

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "after a network error")

    assert run_outbox(telegram, body, metrics=metrics) is True
    assert [call.status for call in telegram.calls("sendMessage")] == [0, 200]
    assert retries(metrics, "network") == 1


def test_persistent_server_error_fails_after_max_attempts(
        telegram: TelegramStandIn, caplog: pytest.LogCaptureFixture) -> None:
    metrics = DeliveryMetrics()
    policy = DeliveryPolicy(per_chat_interval_s=0.01, global_rate_per_s=1000.0,
                            max_attempts=3, backoff_base_s=0.02)
    telegram.fail_next("sendMessage", 500, times=10)
    caplog.set_level(logging.ERROR, logger=LOGGER)

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "Persistent failure report")

    assert run_outbox(telegram, body, policy=policy, metrics=metrics) is False
    assert [call.status for call in telegram.calls("sendMessage")] == [500, 500, 500]
    assert failures(metrics, "server_error") == 1
    assert sample(metrics, "smart_tuner_notifier_deliveries_total", kind="text",
                  outcome="failed") == 1
    assert retries(metrics, "server_error") == 2
    [record] = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    message = record.getMessage()
    assert str(CHAT) in message and "server_error" in message
    assert "Persistent failure" in message


def test_forbidden_fails_at_once_without_retry(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    telegram.fail_next("sendMessage", 403)

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "to a blocked bot")

    assert run_outbox(telegram, body, metrics=metrics) is False
    assert [call.status for call in telegram.calls("sendMessage")] == [403]
    assert failures(metrics, "forbidden") == 1
    assert all(retries(metrics, cause) == 0
               for cause in ("retry_after", "server_error", "network", "parse_fallback"))


def test_retry_after_beyond_the_policy_fails_at_once(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    telegram.fail_next("sendMessage", 429, retry_after=3600)

    async def body(outbox: Outbox) -> tuple[bool, float]:
        start = time.monotonic()
        ok = await outbox.send_text(CHAT, "flooded")
        return ok, time.monotonic() - start

    ok, elapsed = run_outbox(telegram, body, metrics=metrics)
    assert ok is False and elapsed < 2.0
    assert len(telegram.calls("sendMessage")) == 1
    assert failures(metrics, "retry_after_too_long") == 1


def test_bad_html_from_a_caller_falls_back_to_plain_text(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    text = "loss < 1 & <foo>fine</foo> &amp; <b>done</b>"

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, text)

    assert run_outbox(telegram, body, metrics=metrics) is True
    refused, plain = telegram.calls("sendMessage")
    assert refused.status == 400 and refused.params["parse_mode"] == "HTML"
    assert plain.status == 200 and "parse_mode" not in plain.params
    assert plain.params["text"] == "loss < 1 & fine & done"
    assert retries(metrics, "parse_fallback") == 1
    assert failures(metrics, "bad_request") == 0


def test_other_bad_requests_fail_without_retry(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()
    telegram.fail_next("sendMessage", 400, description="Bad Request: chat not found")

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "to nowhere")

    assert run_outbox(telegram, body, metrics=metrics) is False
    assert len(telegram.calls("sendMessage")) == 1
    assert failures(metrics, "bad_request") == 1


def test_sends_to_one_chat_are_spaced_while_other_chats_go_on(
        telegram: TelegramStandIn) -> None:
    policy = DeliveryPolicy(per_chat_interval_s=0.3, global_rate_per_s=1000.0)

    async def body(outbox: Outbox) -> list[bool]:
        futures = [outbox.send_text(CHAT, f"a{i}") for i in range(3)]
        futures.append(outbox.send_text(OTHER_CHAT, "b0"))
        return list(await asyncio.gather(*futures))

    assert run_outbox(telegram, body, policy=policy) == [True] * 4
    ours = telegram.calls("sendMessage", chat_id=CHAT)
    assert [call.params["text"] for call in ours] == ["a0", "a1", "a2"]
    assert all(gap >= 0.3 for gap in gaps(ours))
    [other] = telegram.calls("sendMessage", chat_id=OTHER_CHAT)
    assert other.at < ours[1].at  # not held up behind the first chat's pacing


def test_the_global_rate_caps_sends_across_chats(telegram: TelegramStandIn) -> None:
    policy = DeliveryPolicy(per_chat_interval_s=0.0, global_rate_per_s=10.0)

    async def body(outbox: Outbox) -> list[bool]:
        return list(await asyncio.gather(*(outbox.send_text(chat, "hi")
                                           for chat in range(1, 6))))

    assert run_outbox(telegram, body, policy=policy) == [True] * 5
    calls = telegram.calls("sendMessage")
    assert len(calls) == 5
    assert calls[-1].at - calls[0].at >= 4 * 0.1 - 0.02  # slots 0.1 s apart, arrival jitter


def test_photo_and_audio_arrive_intact_and_a_long_caption_overflows(
        telegram: TelegramStandIn) -> None:
    picture = png(320, 200)
    audio = bytes(range(256)) * 200  # every byte value, 51 200 bytes
    caption = "\n".join(f"<b>Строка {i}</b>: " + "x" * 40 for i in range(40))
    assert utf16_length(caption) > 1024

    async def body(outbox: Outbox) -> list[bool]:
        return list(await asyncio.gather(
            outbox.send_photo(CHAT, picture, caption=caption),
            outbox.send_audio(CHAT, audio, "sample.wav", caption="<i>step 1000</i>",
                              title="Step 1000")))

    assert run_outbox(telegram, body) == [True, True]
    calls = telegram.calls(chat_id=CHAT)
    assert [call.method for call in calls] == ["sendPhoto", "sendMessage", "sendAudio"]
    photo, overflow, sound = calls
    assert all(call.status == 200 for call in calls)
    assert photo.files["photo"] == picture
    assert photo.filenames["photo"] == "alignment.png"
    assert utf16_length(photo.params["caption"]) <= 1024
    assert photo.params["caption"] + "\n" + overflow.params["text"] == caption
    assert sound.files["audio"] == audio
    assert sound.filenames["audio"] == "sample.wav"
    assert sound.params["title"] == "Step 1000"
    assert sound.params["caption"] == "<i>step 1000</i>"


def test_a_full_queue_fails_the_message_and_counts_it(
        telegram: TelegramStandIn, caplog: pytest.LogCaptureFixture) -> None:
    metrics = DeliveryMetrics()
    policy = DeliveryPolicy(per_chat_interval_s=0.01, global_rate_per_s=1000.0,
                            queue_size_per_chat=2)
    caplog.set_level(logging.ERROR, logger=LOGGER)

    async def body(outbox: Outbox) -> tuple[bool, list[bool]]:
        futures = [outbox.send_text(CHAT, f"m{i}") for i in range(3)]
        refused_at_once = futures[2].done()
        return refused_at_once, list(await asyncio.gather(*futures))

    refused_at_once, results = run_outbox(telegram, body, policy=policy, metrics=metrics)
    assert refused_at_once
    assert results == [True, True, False]
    assert [call.params["text"] for call in telegram.calls("sendMessage")] == ["m0", "m1"]
    assert failures(metrics, "queue_full") == 1
    assert any("queue_full" in record.getMessage() for record in caplog.records)


def test_empty_text_is_a_counted_failure(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics()

    async def body(outbox: Outbox) -> bool:
        return await outbox.send_text(CHAT, "\n  \n")

    assert run_outbox(telegram, body, metrics=metrics) is False
    assert telegram.calls("sendMessage") == []
    assert failures(metrics, "empty") == 1


def test_drain_waits_for_everything_queued(telegram: TelegramStandIn) -> None:
    policy = DeliveryPolicy(per_chat_interval_s=0.2, global_rate_per_s=1000.0)

    async def body(outbox: Outbox) -> tuple[bool, int, bool, int]:
        for i in range(3):
            outbox.send_text(CHAT, f"a{i}")
        outbox.send_text(OTHER_CHAT, "b0")
        pending_before = outbox.pending
        early = await outbox.drain(timeout_s=0.05)
        done = await outbox.drain()
        return early, pending_before, done, outbox.pending

    early, pending_before, done, pending_after = run_outbox(telegram, body, policy=policy)
    assert pending_before == 4 and early is False
    assert done is True and pending_after == 0
    assert len(telegram.calls("sendMessage")) == 4


def test_close_fails_what_is_left_and_refuses_new_messages(telegram: TelegramStandIn) -> None:
    metrics = DeliveryMetrics(CollectorRegistry())
    policy = DeliveryPolicy(per_chat_interval_s=1.0, global_rate_per_s=1000.0)

    async def body(outbox: Outbox) -> tuple[list[bool], bool, int]:
        futures = [outbox.send_text(CHAT, f"a{i}") for i in range(3)]
        await futures[0]  # the next one now waits out the 1 s interval
        await outbox.close(timeout_s=0.2)
        late = await outbox.send_text(CHAT, "too late")
        return list(await asyncio.gather(*futures)), late, outbox.pending

    results, late, pending = run_outbox(telegram, body, policy=policy, metrics=metrics)
    assert results == [True, False, False]
    assert late is False and pending == 0
    assert failures(metrics, "closed") == 3
    assert [call.params["text"] for call in telegram.calls("sendMessage")] == ["a0"]


def test_backoff_grows_is_capped_and_policy_is_validated() -> None:
    policy = DeliveryPolicy(backoff_base_s=1.0, backoff_max_s=10.0)
    waits = [policy.backoff_s(retry, 0.5) for retry in range(8)]
    assert waits == sorted(waits) and waits[0] == 0.75 and waits[-1] == 7.5
    assert policy.backoff_s(3, 0.0) >= policy.backoff_s(2, 0.999)  # jitter never reverses
    assert policy.backoff_s(1000, 0.999) <= 10.0
    with pytest.raises(ValueError):
        DeliveryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        DeliveryPolicy(global_rate_per_s=0.0)


def test_plain_text_fallback_strips_tags_and_unescapes() -> None:
    assert to_plain_text("<b>a</b> &lt;b&gt; &amp; <a href=\"x\">link</a> 1 < 2") \
        == "a <b> & link 1 < 2"


# ---------------------------------------------------------------------------- the stand-in


def _post(url: str, fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_stand_in_refuses_a_wrong_token_and_unknown_methods(telegram: TelegramStandIn) -> None:
    async def main() -> None:
        bot = make_bot(telegram, token="987654321:wrong-token")
        try:
            with pytest.raises(TelegramUnauthorizedError):
                await bot.get_me()
        finally:
            await bot.session.close()

    asyncio.run(main())
    assert [call.status for call in telegram.calls("getMe")] == [401]
    status, answer = _post(f"{telegram.base_url}/bot{TEST_TOKEN}/sendTelepathy", {})
    assert status == 404
    assert answer == {"ok": False, "error_code": 404,
                      "description": "Not Found: method not found"}


def test_stand_in_long_poll_returns_a_pushed_update(telegram: TelegramStandIn) -> None:
    pusher = threading.Timer(0.3, telegram.push_message, args=(CHAT, "/status@SmartTunerBot"))

    async def main() -> tuple[float, list[Any], list[Any]]:
        bot = make_bot(telegram)
        try:
            start = time.monotonic()
            pusher.start()
            updates = await bot.get_updates(timeout=5)
            waited = time.monotonic() - start
            confirmed = await bot.get_updates(offset=updates[-1].update_id + 1, timeout=0)
            return waited, updates, confirmed
        finally:
            await bot.session.close()

    waited, updates, confirmed = asyncio.run(main())
    assert 0.25 <= waited < 3.0  # waited for the push, and returned as soon as it came
    [update] = updates
    assert update.message is not None and update.message.text == "/status@SmartTunerBot"
    [entity] = update.message.entities or []
    assert (entity.type, entity.offset, entity.length) == ("bot_command", 0, 21)
    assert confirmed == []


def test_stand_in_validates_html_like_telegram(telegram: TelegramStandIn) -> None:
    words = MESSAGES["en"]
    report = words["progress_title"] + "\n" + words["run_step"].format(run_id="r&lt;1", step=5)
    assert parse_html(report).startswith("🤖 Smart Tuner V2")
    for bad in ("<foo>x</foo>", "<b>open", "x</b>", "<b><i>x</b></i>", "a & b", "a < b",
                '<span class="big">x</span>'):
        with pytest.raises(ValueError):
            parse_html(bad)

    async def main() -> tuple[str, list[str]]:
        bot = make_bot(telegram)
        errors = []
        try:
            sent = await bot.send_message(CHAT, report, parse_mode="HTML")
            for text in ("<foo>x</foo>", "x" * 4097):
                try:
                    await bot.send_message(CHAT, text, parse_mode="HTML")
                except TelegramBadRequest as exc:
                    errors.append(exc.message)
            return sent.text or "", errors
        finally:
            await bot.session.close()

    shown, errors = asyncio.run(main())
    assert shown == parse_html(report) and "<b>" not in shown
    assert errors[0].startswith("Bad Request: can't parse entities: Unsupported start tag")
    assert errors[1] == "Bad Request: message is too long"
