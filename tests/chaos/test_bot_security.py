"""Hostile people at the notifier's doors: the bot and the Alertmanager webhook.

Injected: mutating commands from a non-admin in captions and odd spellings; a flood of
strangers just before a red-flag alert; unauthenticated and oversized webhook bodies; bad
command arguments; a proxy whose malformed answers quote the bot token. Must hold: nothing
a non-admin sends is executed; the alert is not held up by refusals; no large body is read
before the token is checked or past the cap; every bad argument gets a reply and no handler
raises; no secret reaches a log line.
"""

from __future__ import annotations

import logging
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.core.bus import connect
from services.notifier.delivery import DeliveryPolicy
from tests.notifier_harness import TEST_POLICY, RunningNotifier, notifier_settings
from tests.telegram_stand_in import TEST_TOKEN, TelegramStandIn
from tests.test_notifier_alerts import alert, payload
from tests.test_notifier_bot_security import (
    CHAT,
    CHUNK,
    GROUP,
    MEMBER,
    SECRET_WEBHOOK_TOKEN,
    Bot,
    raw_post,
    register_run,
    wait_reply,
)

FLOOD_CHATS = 250  # at Telegram's ~25 sends/s, 10 s of refusals in front of an alert
ALERT_DEADLINE_S = 3.0
BODY_BYTES = 30 * 1024 * 1024
MEMORY_CEILING_BYTES = 8 * 1024 * 1024  # what a refused 30 MiB POST may cost at most
MIB = 1024 * 1024


@pytest.fixture
def bot(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path,
        telegram: TelegramStandIn) -> Iterator[Bot]:
    """A notifier with admins, a webhook token and the default refusal limits, sending at
    Telegram's real pace (or with the delivery policy a test passes as the parameter)."""
    policy = getattr(request, "param", DeliveryPolicy())
    client = connect(redis_url)
    run_id = register_run(client)
    settings = notifier_settings(telegram, tmp_path, chat_ids=(CHAT, GROUP),
                                 admin_ids=(CHAT,), language="en", ack_wait_s=1.0,
                                 report_every_steps=1_000_000,
                                 webhook_token=SECRET_WEBHOOK_TOKEN)
    with RunningNotifier(settings, redis_url, telegram, policy=policy) as notifier:
        yield Bot(telegram, notifier, client, run_id)


def test_non_admin_commands_in_any_spelling_are_not_executed(bot: Bot, chaos) -> None:
    row = chaos("non-admin mutating commands in captions / odd spellings")
    hostile = [("photo", "/pause {run}"), ("document", "/lr 0.001 {run}"),
               ("photo", "/ga 2 {run}"), ("document", "/rollback {run}"),
               (None, " /pause {run}"), (None, "\n/gate 20 {run}"),
               ("photo", "/stop {run}"), ("document", "/spikeguard 10 {run}")]
    before = bot.commands_written()
    refused_before = bot.sample("smart_tuner_notifier_bot_refusals_total", {"reason": "admin"})
    for media, text in hostile:
        bot.telegram.push_message(GROUP, text.format(run=bot.run_id), user_id=MEMBER,
                                  chat_type="group", media=media)
    deadline = time.monotonic() + 15
    while bot.sample("smart_tuner_notifier_bot_refusals_total",
                     {"reason": "admin"}) - refused_before < len(hostile):
        if time.monotonic() > deadline or bot.commands_written() > before:
            break
        time.sleep(0.05)
    time.sleep(1.5)  # a command that got through is written within ack_wait_s
    refused = bot.sample("smart_tuner_notifier_bot_refusals_total",
                         {"reason": "admin"}) - refused_before
    row.injected = len(hostile)
    row.survived = int(refused)
    row.lost = bot.commands_written() - before  # commands a non-admin got executed
    assert row.lost == 0
    assert refused == len(hostile)


def test_stranger_flood_does_not_hold_up_a_red_flag_alert(bot: Bot, chaos) -> None:
    row = chaos(f"refusal flood ({FLOOD_CHATS} stranger chats) before a red-flag alert")
    strangers = [-(2_000_000 + i) for i in range(FLOOD_CHATS)]
    for chat in strangers:
        bot.telegram.push_message(chat, "/pause", chat_type="group")
    deadline = time.monotonic() + 30
    while bot.sample("smart_tuner_notifier_bot_refusals_total",
                     {"reason": "chat"}) < FLOOD_CHATS:
        assert time.monotonic() < deadline, "not every stranger update was refused"
        time.sleep(0.05)
    mark = time.monotonic()
    body = payload(alert(name="GradNormRedFlag", severity="critical",
                         fingerprint=uuid.uuid4().hex[:16], run=bot.run_id))
    answer = httpx.post(f"{bot.notifier.url}/alertmanager", json=body, timeout=30,
                        headers={"Authorization": f"Bearer {SECRET_WEBHOOK_TOKEN}"})
    try:
        wait_reply(bot, mark, CHAT, "GradNormRedFlag")
        latency = time.monotonic() - mark
    except AssertionError:
        latency = float("inf")
    refusals_sent = sum(len(bot.telegram.calls("sendMessage", chat)) for chat in strangers)
    row.injected = FLOOD_CHATS
    # Survived: refusals logged and counted (answered or not); lost: the alert, if late.
    row.survived = int(bot.sample("smart_tuner_notifier_bot_refusals_total",
                                  {"reason": "chat"}))
    row.lost = 0 if latency <= ALERT_DEADLINE_S else 1
    print(f"alert after {latency:.2f} s behind {refusals_sent} refusals sent "
          f"(status {answer.status_code})")
    assert refusals_sent <= bot.notifier.settings.refusals_per_minute
    assert latency <= ALERT_DEADLINE_S


def test_webhook_bodies_cost_nothing_before_the_token(bot: Bot, chaos) -> None:
    row = chaos("30 MiB webhook bodies: no token, wrong token, oversized")
    port = bot.notifier.settings.port
    cases = [({}, 401), ({"Authorization": "Bearer wrong-token-0123456789"}, 403),
             ({"Authorization": f"Bearer {SECRET_WEBHOOK_TOKEN}"}, 413)]
    answers, peaks = [], []
    for extra, _ in cases:
        headers = {"Content-Type": "application/json", "Content-Length": str(BODY_BYTES),
                   **extra}
        tracemalloc.start()
        try:
            # The whole body is sent; what the server holds meanwhile is what counts.
            status = raw_post(port, headers, (CHUNK for _ in range(BODY_BYTES // len(CHUNK))),
                              timeout_s=20)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        answers.append(status)
    print("peak Python memory per refused 30 MiB body: "
          + ", ".join(f"{peak / MIB:.1f} MiB" for peak in peaks))
    row.injected = len(cases)
    row.survived = sum(status == expected and peak <= MEMORY_CEILING_BYTES
                       for status, peak, (_, expected) in zip(answers, peaks, cases, strict=True))
    row.lost = 0
    assert answers == [expected for _, expected in cases]
    assert max(peaks) <= MEMORY_CEILING_BYTES


def test_bad_arguments_get_replies_not_exceptions(bot: Bot, chaos,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    row = chaos("bad bot arguments (unicode digits, 5000 digits, overlong /sample)")
    texts = ["/actions ²", "/actions 1²", "/actions " + "9" * 5000, "/lr ²", "/ga ½",
             "/gate 1e999999", "/sample " + "a" * 4000]
    replied = 0
    with caplog.at_level(logging.ERROR):
        for text in texts:
            mark = time.monotonic()
            bot.telegram.push_message(CHAT, text)
            try:
                wait_reply(bot, mark, CHAT, "❗")
                replied += 1
            except AssertionError:
                pass
    crashed = [r for r in caplog.records if r.name.startswith("aiogram")
               and r.levelno >= logging.ERROR]
    row.injected = len(texts)
    row.survived = replied
    row.lost = len(crashed)  # updates whose handler raised
    assert replied == len(texts)
    assert crashed == []


@pytest.mark.parametrize("bot", [TEST_POLICY], indirect=True)  # a short backoff
def test_no_secret_in_logs_when_a_proxy_garbles_answers(bot: Bot, chaos,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    row = chaos("malformed proxy answers quoting the bot token")
    failures = ("smart_tuner_notifier_delivery_failures_total",
                {"kind": "text", "reason": "network"})
    attempts = TEST_POLICY.max_attempts
    with caplog.at_level(logging.DEBUG):
        bot.telegram.garble_next("getUpdates", times=2)
        bot.telegram.garble_next("sendMessage", times=attempts)
        bot.telegram.push_message(CHAT, "/help")
        deadline = time.monotonic() + 30
        while bot.sample(*failures) == 0:
            assert time.monotonic() < deadline, "the garbled sends were not given up"
            time.sleep(0.1)
        logged = caplog.text
    secret = TEST_TOKEN.split(":", 1)[1]
    leaks = logged.count(secret) + logged.count(SECRET_WEBHOOK_TOKEN)
    row.injected = 2 + attempts
    row.survived = logged.count("ClientResponseError")  # failures logged, token redacted
    row.lost = leaks  # log lines' worth of secrets
    assert leaks == 0
    assert row.survived >= 2
