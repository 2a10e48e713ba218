"""The bot's doors, end to end: aiogram polling the Telegram stand-in over real HTTP, a real
Redis, and every way a command can reach a handler (text, a media caption, an edited
message, a button) checked against the same allow-list and admin list. Also bad arguments
(a clear reply, never an exception), the /sample length cap, and no secret in the logs.

No trainer runs here: a mutating command that got through would be written to the run's
command stream, which is what the tests count.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from services.core.bus import connect
from services.core.schemas import encode
from services.core.streams import RUNS_KEY, Stream, stream_key
from services.notifier.reports import MESSAGES
from tests.notifier_harness import RunningNotifier, notifier_settings
from tests.telegram_stand_in import TEST_TOKEN, RecordedCall, TelegramStandIn
from tests.test_notifier_reports import metrics as make_metrics

pytestmark = pytest.mark.slow

CHAT = 1001  # a private chat in the allow-list; its user (id 1001) is an admin
GROUP = -1002  # a group in the allow-list
MEMBER = 3003  # a group member who is not an admin
STRANGER = 999  # a private chat outside the allow-list
EN = MESSAGES["en"]
REPLY_TIMEOUT_S = 10.0
QUIET_S = 1.0  # how long "nothing happened" is watched for
SECRET_WEBHOOK_TOKEN = "webhook-secret-0123456789abcdef"


@dataclass
class Bot:
    telegram: TelegramStandIn
    notifier: RunningNotifier
    client: redis.Redis
    run_id: str

    def commands_written(self) -> int:
        """Entries in the run's command stream: what got through to the trainer."""
        return int(self.client.xlen(stream_key(self.run_id, Stream.COMMANDS)))

    def sample(self, name: str, labels: dict[str, str]) -> float:
        """A notifier metric's value (0 when absent)."""
        value = self.notifier.notifier.registry.get_sample_value(name, labels)
        return float(value or 0.0)


def replies_after(telegram: TelegramStandIn, mark: float, chat_id: int,
                  method: str = "sendMessage") -> list[RecordedCall]:
    """Successful calls of ``method`` to ``chat_id`` since ``mark``."""
    return [c for c in telegram.calls(method, chat_id) if c.at > mark and c.status == 200]


def wait_reply(bot: Bot, mark: float, chat_id: int, contains: str) -> str:
    """The first text sent to ``chat_id`` after ``mark`` that contains ``contains``."""
    def found(_: list[RecordedCall]) -> bool:
        return any(contains in str(c.params.get("text"))
                   for c in replies_after(bot.telegram, mark, chat_id))

    bot.telegram.wait_for(found, REPLY_TIMEOUT_S)
    return next(str(c.params["text"]) for c in replies_after(bot.telegram, mark, chat_id)
                if contains in str(c.params.get("text")))


def register_run(client: redis.Redis) -> str:
    """A run the bot knows: in the runs set, with one metrics entry."""
    run_id = f"sec-{uuid.uuid4().hex[:10]}"
    client.sadd(RUNS_KEY, run_id)
    client.xadd(stream_key(run_id, Stream.METRICS), encode(make_metrics(run_id=run_id,
                                                                         step=5)))
    return run_id


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    """A notifier with an admin list, refusals answered without a rate limit (so that each
    test sees its own refusal), and a registered run."""
    client = connect(redis_url)
    run_id = register_run(client)
    telegram = TelegramStandIn(TEST_TOKEN).start()
    settings = notifier_settings(
        telegram, tmp_path_factory.mktemp("runs"), chat_ids=(CHAT, GROUP), admin_ids=(CHAT,),
        language="en", report_every_steps=1_000_000, ack_wait_s=1.0,
        refusal_interval_s=0.001, refusals_per_minute=1000,
        webhook_token=SECRET_WEBHOOK_TOKEN)
    notifier = RunningNotifier(settings, redis_url, telegram).start()
    try:
        yield Bot(telegram, notifier, client, run_id)
    finally:
        notifier.close()
        telegram.stop()


# ---------------------------------------------------------------------------- admin check


@pytest.mark.parametrize(("media", "text", "refused"), [
    ("photo", "/pause {run}", True),
    ("document", "/lr 0.001 {run}", True),
    ("photo", "/ga 2 {run}", True),
    ("document", "/rollback {run}", True),
    (None, " /pause {run}", True),  # aiogram's filter strips leading blanks before the command
    (None, "\n/lr 0.001 {run}", True),
    ("photo", "/pause@SmartTunerBot {run}", True),
    ("photo", "/PAUSE {run}", False),  # no command filter takes it: nothing happens at all
])
def test_non_admin_command_in_a_caption_or_odd_text_is_refused(
        bot: Bot, media: str | None, text: str, refused: bool) -> None:
    before = bot.commands_written()
    mark = time.monotonic()
    bot.telegram.push_message(GROUP, text.format(run=bot.run_id), user_id=MEMBER,
                              chat_type="group", media=media)
    if refused:
        wait_reply(bot, mark, GROUP, EN["refused_admin"])
    time.sleep(QUIET_S)  # what got through would be written (and answered) by now
    assert bot.commands_written() == before
    texts = [str(c.params.get("text")) for c in replies_after(bot.telegram, mark, GROUP)]
    assert texts == ([EN["refused_admin"]] if refused else []), texts


def test_admin_command_in_a_caption_still_works(bot: Bot) -> None:
    """The admin check is per person, not a ban on captions."""
    before = bot.commands_written()
    mark = time.monotonic()
    bot.telegram.push_message(CHAT, f"/pause {bot.run_id}", media="photo")
    wait_reply(bot, mark, CHAT, "pause")
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while bot.commands_written() == before:
        assert time.monotonic() < deadline, "the admin's /pause was not written"
        time.sleep(0.05)


def test_edited_message_never_runs_a_command(bot: Bot) -> None:
    """An edit is not a new command, from an admin or anyone else: nothing is written."""
    before = bot.commands_written()
    first = bot.telegram.push_message(GROUP, "hello", user_id=MEMBER, chat_type="group")
    del first
    bot.telegram.push_message(GROUP, f"/pause {bot.run_id}", user_id=MEMBER,
                              chat_type="group", edited_id=1)
    bot.telegram.push_message(CHAT, f"/rollback {bot.run_id}", edited_id=1)
    mark = time.monotonic()
    bot.telegram.push_message(CHAT, "/help")  # answered after the edits were dispatched
    wait_reply(bot, mark, CHAT, "/status")
    time.sleep(QUIET_S)
    assert bot.commands_written() == before


def test_non_admin_buttons_are_refused(bot: Bot) -> None:
    """The Approve / Reject and /stop buttons pass the admin check too."""
    mark = time.monotonic()
    for data in ("approve:0123456789abcdef", "reject:0123456789abcdef", "stop:whatever"):
        bot.telegram.push_callback(GROUP, MEMBER, data, message_id=1)
    answers = bot.telegram.wait_for(lambda _: len(
        [c for c in bot.telegram.calls("answerCallbackQuery") if c.at > mark]) >= 3)
    texts = [c.params.get("text") for c in answers
             if c.method == "answerCallbackQuery" and c.at > mark]
    assert texts == [EN["refused_admin"]] * 3


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("text", [
    "/actions ²", "/actions ³ {run}", "/actions ٣٣", "/actions 1²", "/actions " + "9" * 5000,
    "/actions -1", "/actions 1e3",
])
def test_actions_with_a_bad_count_gets_a_usage_reply(bot: Bot, text: str) -> None:
    mark = time.monotonic()
    bot.telegram.push_message(CHAT, text.format(run=bot.run_id))
    reply = wait_reply(bot, mark, CHAT, "")
    assert reply in (EN["usage"].format(usage=EN["usage_actions"].format(max=20)),
                     EN["unknown_run"].format(run_id=text.split()[-1]))


@pytest.mark.parametrize("text", [
    "/lr ²", "/lr ½", "/ga 1e999999", "/gate ∞", "/spikeguard 0x10", "/lr " + "1" * 5000,
    "/lr 1_0", "/ga -",
])
def test_value_commands_with_bad_numbers_get_a_clear_reply(bot: Bot, text: str) -> None:
    before = bot.commands_written()
    mark = time.monotonic()
    bot.telegram.push_message(CHAT, f"{text} {bot.run_id}")
    reply = wait_reply(bot, mark, CHAT, "")
    assert reply.startswith(("❗ Usage", "❗ Not sent")), reply
    assert bot.commands_written() == before


def test_sample_text_over_the_cap_is_refused_before_synthesis(bot: Bot) -> None:
    ctx = bot.notifier.notifier.dispatcher["ctx"]
    spoken: list[str] = []

    def speaker(runs_dir: Path, run_id: str, text: str, device: str) -> None:
        spoken.append(text)
        raise RuntimeError("no synthesis in this test")

    ctx.speaker = speaker
    limit = ctx.settings.sample_max_chars
    mark = time.monotonic()
    bot.telegram.push_message(CHAT, "/sample " + "a" * (limit + 1))
    reply = wait_reply(bot, mark, CHAT, "")
    assert reply == EN["sample_too_long"].format(length=limit + 1, max=limit)
    assert spoken == []
    mark = time.monotonic()
    bot.telegram.push_message(CHAT, "/sample " + "b" * limit)  # at the cap: accepted
    wait_reply(bot, mark, CHAT, EN["sample_failed"].split("{")[0])
    assert spoken == ["b" * limit]


# ---------------------------------------------------------------------------- secrets


def test_no_secret_in_the_logs_when_a_proxy_garbles_answers(
        bot: Bot, caplog: pytest.LogCaptureFixture) -> None:
    """A broken proxy's answer makes aiohttp's error carry the request URL, which holds the
    bot token; neither it nor the webhook token may reach a log line."""
    attempts = bot.notifier.notifier.outbox.policy.max_attempts
    failed = ("smart_tuner_notifier_delivery_failures_total",
              {"kind": "text", "reason": "network"})
    before = bot.sample(*failed)
    with caplog.at_level(logging.DEBUG):
        bot.telegram.garble_next("getUpdates")
        bot.telegram.garble_next("sendMessage", times=attempts)
        bot.telegram.push_message(CHAT, "/help")
        deadline = time.monotonic() + 3 * REPLY_TIMEOUT_S
        while bot.sample(*failed) == before:  # every attempt garbled: the reply failed
            assert time.monotonic() < deadline, "the garbled sends were not given up"
            time.sleep(0.05)
        logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "ClientResponseError" in logged  # the failures were logged ...
    secret = TEST_TOKEN.split(":", 1)[1]
    assert secret not in logged  # ... without the token
    assert SECRET_WEBHOOK_TOKEN not in logged


def test_a_short_webhook_token_is_not_echoed_in_the_config_error() -> None:
    from services.core.settings import ConfigError
    from services.notifier.config import load_notifier_settings

    short = "hunter2-secret"  # under the 16 characters required
    with pytest.raises(ConfigError) as caught:
        load_notifier_settings(telegram_token=TEST_TOKEN, chat_ids="1", webhook_token=short)
    assert "WEBHOOK_TOKEN" in str(caught.value)
    assert short not in str(caught.value)


# ---------------------------------------------------------------------------- refusals


def test_refusals_are_rate_limited_per_chat_and_in_total(
        telegram: TelegramStandIn, redis_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Strangers flooding the bot get at most one refusal per chat and a few in all; every
    refusal is still logged and counted."""
    settings = notifier_settings(telegram, tmp_path, chat_ids=(CHAT,), language="en",
                                 refusal_interval_s=60.0, refusals_per_minute=3)
    strangers = [STRANGER - i for i in range(6)]
    flood = [(chat, f"/pause x{n}") for n in range(4) for chat in strangers]
    with caplog.at_level(logging.INFO, logger="services.notifier.bot"), \
            RunningNotifier(settings, redis_url, telegram) as notifier:
        registry = notifier.notifier.registry
        for chat, text in flood:
            telegram.push_message(chat, text)
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while (registry.get_sample_value("smart_tuner_notifier_bot_refusals_total",
                                         {"reason": "chat"}) or 0) < len(flood):
            assert time.monotonic() < deadline, "not every stranger update was refused"
            time.sleep(0.05)
        time.sleep(QUIET_S)  # let whatever was queued go out
        unanswered = registry.get_sample_value(
            "smart_tuner_notifier_bot_refusals_unanswered_total", {"reason": "chat"})
    sent = {chat: len(telegram.calls("sendMessage", chat)) for chat in strangers}
    assert sum(sent.values()) == 3
    assert max(sent.values()) == 1
    assert unanswered == len(flood) - 3
    logged = [r for r in caplog.records if "allow-list" in r.getMessage()]
    assert len(logged) == len(flood)


# ---------------------------------------------------------------------------- webhook

BIG_BODY_BYTES = 30 * 1024 * 1024
CHUNK = b"x" * 65536


def raw_post(port: int, headers: dict[str, str], body: Iterable[bytes],
             timeout_s: float = 5.0) -> int | None:
    """POST to the webhook over a bare socket, sending ``body`` piece by piece without
    waiting to finish it; the status answered within ``timeout_s``, or None."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"POST /alertmanager HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n"
                     .encode())
        try:
            for piece in body:
                sock.sendall(piece)
        except OSError:  # the server answered and closed: what the answer says counts
            pass
        try:
            answer = sock.recv(4096)
        except (TimeoutError, OSError):
            return None
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer.split(b" ", 2)[1])


def _chunked(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
        sent += len(CHUNK)


@pytest.mark.parametrize(("token", "expected"), [(None, 401), ("wrong-token-0123456789", 403)])
def test_webhook_checks_the_token_before_reading_the_body(bot: Bot, token: str | None,
                                                          expected: int) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(BIG_BODY_BYTES)}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    # Only 64 KiB of the announced 30 MiB is sent: an answer proves the rest was not awaited.
    assert raw_post(bot.notifier.settings.port, headers, [CHUNK]) == expected


def test_webhook_refuses_an_announced_oversized_body_unread(bot: Bot) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(BIG_BODY_BYTES),
               "Authorization": f"Bearer {SECRET_WEBHOOK_TOKEN}"}
    assert raw_post(bot.notifier.settings.port, headers, [CHUNK]) == 413


def test_webhook_stops_reading_a_chunked_body_at_the_cap(bot: Bot) -> None:
    cap = bot.notifier.settings.webhook_max_body_bytes
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked",
               "Authorization": f"Bearer {SECRET_WEBHOOK_TOKEN}"}
    # Twice the cap, never finished: only a server that stops at the cap can answer.
    assert raw_post(bot.notifier.settings.port, headers, _chunked(2 * cap)) == 413


def test_webhook_still_takes_a_valid_body_and_refuses_a_bad_one(bot: Bot) -> None:
    import httpx

    from tests.test_notifier_alerts import alert, payload

    url = f"{bot.notifier.url}/alertmanager"
    auth = {"Authorization": f"Bearer {SECRET_WEBHOOK_TOKEN}"}
    body = payload(alert(fingerprint=uuid.uuid4().hex[:16]))
    answer = httpx.post(url, json=body, headers=auth, timeout=10)
    assert answer.status_code == 200, answer.text
    assert httpx.post(url, content=b"{not json", headers=auth, timeout=10).status_code == 422
    assert httpx.post(url, json={"version": "3"}, headers=auth, timeout=10).status_code == 422
    assert httpx.post(url, json=body, timeout=10).status_code == 401


def test_redactor_keeps_a_token_in_an_exception_out_of_rich_tracebacks() -> None:
    """Rich tracebacks render the exception object, not the record's text: a record whose
    exception quotes the token must reach a rich handler without it."""
    import io

    from rich.console import Console
    from rich.logging import RichHandler

    from services.notifier.service import SecretRedactor

    secret = TEST_TOKEN.split(":", 1)[1]
    out = io.StringIO()
    handler = RichHandler(console=Console(file=out, width=200), rich_tracebacks=True)
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    redactor = SecretRedactor([TEST_TOKEN, secret])
    redactor.install()
    try:
        try:
            raise RuntimeError(f"url='http://proxy/bot{TEST_TOKEN}/getUpdates'")
        except RuntimeError:
            logger.exception("polling failed for bot%s", TEST_TOKEN)
    finally:
        redactor.uninstall()
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "polling failed" in text and "RuntimeError" in text
    assert secret not in text
