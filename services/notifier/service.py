"""The notifier process: the bot's long polling, the run-stream feed and the HTTP side, in
one event loop, all sending through one outbox.

``python -m services.notifier.service`` (or ``smart-tuner notifier``) runs it until SIGINT
or SIGTERM. Settings come from the environment (``services.notifier.config``); a missing or
malformed token stops it before it talks to Telegram, with the variable named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramAPIError
from prometheus_client import CollectorRegistry

from services.core.bus import connect
from services.core.logging import setup_logging
from services.core.metrics import DeadLetterCounter
from services.core.runstore import RunStore
from services.core.settings import ConfigError, get_settings
from services.notifier.bot import BotContext, BotMetrics, bot_commands, build_router
from services.notifier.config import NotifierSettings, load_notifier_settings
from services.notifier.delivery import DeliveryMetrics, DeliveryPolicy, Outbox
from services.notifier.feed import ReportFeed
from services.notifier.planner import ReportPlanner
from services.notifier.webhook import WebhookContext, create_app

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
POLLING_TIMEOUT_S = 10  # getUpdates long poll; also bounds how long a stop may take
STOP_TIMEOUT_S = 10.0


class SecretRedactor:
    """Keeps the notifier's secrets out of every log line while installed.

    The bot token is part of every Bot API URL, and some network errors quote the URL (a
    proxy's malformed answer makes aiohttp raise a ``ClientResponseError`` with it), which
    aiogram's polling loop and the outbox then log. Rather than guess every such message,
    the log record factory is wrapped: a record whose text or traceback holds a secret gets
    it replaced before any handler formats it, whatever logger made it.
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        # Longest first, so that a token is replaced whole before any part of it.
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self.active = False
        self._previous: Callable[..., logging.LogRecord] | None = None
        self._factory: Callable[..., logging.LogRecord] | None = None

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _scrub(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: logging reports it later
            return
        if any(secret in message for secret in self.secrets):
            record.msg, record.args = self.redact(message), ()
        if record.exc_info and record.exc_info != (None, None, None):
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            if any(secret in text for secret in self.secrets):
                # The exception itself cannot be changed, and a handler that renders it
                # (rich tracebacks) would print the secret: keep only the redacted text,
                # which every formatter appends.
                record.exc_info, record.exc_text = None, self.redact(text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)

    def install(self) -> None:
        """Redact every log record made from now on, by any logger."""
        previous = self._previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if self.active:
                self._scrub(record)
            return record

        self.active = True
        self._factory = factory
        logging.setLogRecordFactory(factory)

    def uninstall(self) -> None:
        """Stop redacting; the factory is restored unless another was installed on top,
        in which case ours stays in the chain but passes records through."""
        self.active = False
        if self._previous is not None and logging.getLogRecordFactory() is self._factory:
            logging.setLogRecordFactory(self._previous)
        self._previous = self._factory = None


@dataclass
class Notifier:
    """The parts of a running notifier (kept for tests and for shutdown)."""

    bot: Bot
    outbox: Outbox
    dispatcher: Dispatcher
    feed: ReportFeed
    server: uvicorn.Server
    registry: CollectorRegistry
    redactor: SecretRedactor


def build(settings: NotifierSettings, redis_url: str,
          policy: DeliveryPolicy | None = None) -> Notifier:
    """Wire the notifier's parts; call from inside the event loop that will run them."""
    registry = CollectorRegistry()
    secrets = [settings.telegram_token.get_secret_value()]
    secrets.append(secrets[0].split(":", 1)[-1])  # the secret part alone, too
    if settings.webhook_token is not None:
        secrets.append(settings.webhook_token.get_secret_value())
    redactor = SecretRedactor(secrets)
    session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_url))
    bot = Bot(settings.telegram_token.get_secret_value(), session=session)
    outbox = Outbox(bot, policy or DeliveryPolicy(), DeliveryMetrics(registry))
    client = connect(redis_url)
    ctx = BotContext(settings, RunStore(client), outbox, BotMetrics(registry))
    dispatcher = Dispatcher(ctx=ctx)
    dispatcher.include_router(build_router(ctx))
    planner = ReportPlanner(settings.language, settings.report_every_steps,
                            settings.report_every_s)
    feed = ReportFeed(client, planner, outbox, settings.chat_ids,
                      dead_letters=DeadLetterCounter(registry, "notifier"))
    token = settings.webhook_token.get_secret_value().encode() if settings.webhook_token \
        else None
    app = create_app(WebhookContext(outbox, settings.chat_ids, settings.language, registry,
                                    token, max_body_bytes=settings.webhook_max_body_bytes))
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning", lifespan="off"))
    return Notifier(bot, outbox, dispatcher, feed, server, registry, redactor)


async def run(notifier: Notifier, stop: asyncio.Event, language: str) -> None:
    """Run every part until ``stop`` is set, then drain the outbox and close.

    No secret reaches a log line meanwhile (``SecretRedactor``).
    """
    notifier.redactor.install()
    try:
        await _run(notifier, stop, language)
    finally:
        notifier.redactor.uninstall()


async def _run(notifier: Notifier, stop: asyncio.Event, language: str) -> None:
    with contextlib.suppress(TelegramAPIError):  # the menu is a nicety; never fatal
        await notifier.bot.set_my_commands(bot_commands(language))
    tasks = [
        asyncio.create_task(notifier.dispatcher.start_polling(
            notifier.bot, handle_signals=False, close_bot_session=False,
            polling_timeout=POLLING_TIMEOUT_S), name="polling"),
        asyncio.create_task(notifier.feed.run(stop), name="feed"),
        asyncio.create_task(notifier.server.serve(), name="http"),
    ]
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopped and task.exception() is not None:
            log.error("notifier part %s failed: %r", task.get_name(), task.exception())
    stop.set()
    with contextlib.suppress(RuntimeError):  # not polling (it failed to start)
        await notifier.dispatcher.stop_polling()
    notifier.server.should_exit = True
    await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
    await notifier.outbox.close(STOP_TIMEOUT_S)
    await notifier.bot.session.close()
    failed = [task for task in tasks if task.done() and not task.cancelled()
              and task.exception() is not None]
    if failed:
        raise RuntimeError(f"notifier part {failed[0].get_name()} failed") \
            from failed[0].exception()


async def _main(settings: NotifierSettings, redis_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    notifier = build(settings, redis_url)
    log.info("notifier: %d allowed chat(s), %s admins, language %s, webhook on %s:%d",
             len(settings.chat_ids), len(settings.admin_ids) or "no", settings.language,
             settings.host, settings.port)
    await run(notifier, stop, settings.language)


def main(argv: Sequence[str] | None = None) -> None:
    """Start the notifier; exit 2 with the offending setting named when the config is bad."""
    del argv  # configured by the environment only
    try:
        shared = get_settings()
        setup_logging(shared.log_level)
        settings = load_notifier_settings()
        if shared.redis_url is None:
            raise ConfigError("the notifier needs SMART_TUNER_REDIS_URL")
    except ConfigError as error:
        print(f"notifier: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    asyncio.run(_main(settings, shared.redis_url))


if __name__ == "__main__":
    main()
