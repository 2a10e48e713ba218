"""The notifier's send queue: every message to Telegram goes through an ``Outbox``.

Telegram limits a bot to about one message per second in a chat and about thirty per
second overall, answers 429 with a ``retry_after`` when pushed harder, and, like any
network service, sometimes fails with 5xx or a dropped connection. The outbox queues each
message per chat (order within a chat is kept; chats do not hold each other up), spaces the
sends, honours ``retry_after`` exactly, backs off exponentially with jitter on 5xx and
network errors, and falls back to plain text when Telegram cannot parse a message's HTML.
Nothing is dropped silently: a message that finally fails is logged with ``log.error`` and
counted in Prometheus, and the caller's future resolves ``False``.

Texts are sent in Telegram's HTML parse mode and cut with ``split_message`` (one queued send
per part); a caption over Telegram's 1024-unit limit goes partly on the photo or audio and
the rest follows as text messages.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiogram import Bot
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.types import BufferedInputFile, InlineKeyboardMarkup
from aiohttp import ClientError
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.notifier.reports import split_message, to_plain_text

log = logging.getLogger(__name__)

Kind = Literal["text", "photo", "audio"]
KINDS: tuple[Kind, ...] = ("text", "photo", "audio")

CAPTION_LIMIT = 1024  # UTF-16 code units of a photo's or audio's caption
PREVIEW_CHARS = 100  # how much of a failed message's text the error log shows
PARSE_ERROR = "can't parse entities"  # Telegram's 400 description for HTML it refuses

# Why a message finally failed (the ``reason`` label of the failure counter).
FAILURE_REASONS: tuple[str, ...] = (
    "bad_request",  # a 400 other than unparsable HTML, or HTML still refused as plain text
    "forbidden",  # 403: the bot was blocked, kicked, or may not write there
    "unauthorized",  # 401: the token is wrong or revoked
    "not_found",  # 404
    "too_large",  # 413: the file is over Telegram's limit
    "migrated",  # the group became a supergroup with another id
    "api_error",  # any other error answer from Telegram
    "retry_after",  # still throttled when the attempts ran out
    "retry_after_too_long",  # Telegram asked to wait longer than the policy allows
    "server_error",  # 5xx (or a proxy's non-JSON answer) until the attempts ran out
    "network",  # no answer (timeouts, refused or dropped connections) until they ran out
    "queue_full",  # the chat's queue was full when the message was offered
    "closed",  # offered after close(), or still queued when close() stopped the workers
    "empty",  # a text with nothing to send
    "unexpected",  # a bug: an exception no rule above covers (logged with its traceback)
)
RETRY_CAUSES: tuple[str, ...] = ("retry_after", "server_error", "network", "parse_fallback")

_NETWORK_ERRORS = (TelegramNetworkError, asyncio.TimeoutError, ClientError, ConnectionError)


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the outbox paces, retries and bounds its sends.

    The defaults follow Telegram's bot FAQ: about one message per second in a chat and
    under thirty per second overall. Groups allow only about twenty a minute; there
    Telegram's 429 ``retry_after`` paces the outbox instead.
    """

    per_chat_interval_s: float = 1.0  # Telegram: about one message per second per chat
    global_rate_per_s: float = 25.0  # under Telegram's ~30 messages/s per bot
    max_attempts: int = 6  # every attempt counts, a 429 included
    backoff_base_s: float = 1.0  # 5xx / network: base * 2**n, capped, with jitter
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 600.0  # a longer retry_after fails the message (logged, counted)
    queue_size_per_chat: int = 1000  # beyond: the message fails at once, logged and counted

    def __post_init__(self) -> None:
        if self.per_chat_interval_s < 0 or self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("intervals and backoffs must not be negative")
        if self.global_rate_per_s <= 0:
            raise ValueError("global_rate_per_s must be positive")
        if self.max_attempts < 1 or self.queue_size_per_chat < 1:
            raise ValueError("max_attempts and queue_size_per_chat must be at least 1")

    def backoff_s(self, retry: int, jitter: float) -> float:
        """The wait before transient retry number ``retry`` (0 for the first).

        ``base * 2**retry`` capped at ``backoff_max_s``, then scaled into its upper half by
        ``jitter`` in [0, 1): senders that failed together spread out, yet each wait is at
        least the previous one's cap, so waits never shrink from one retry to the next.
        """
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(retry, 64))
        return ceiling * (0.5 + 0.5 * jitter)


class DeliveryMetrics:
    """The outbox's Prometheus series, on ``registry`` (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.deliveries = Counter(
            "smart_tuner_notifier_deliveries", "Telegram messages sent or finally failed.",
            ["kind", "outcome"], registry=self.registry)
        self.failures = Counter(
            "smart_tuner_notifier_delivery_failures",
            "Telegram messages that finally failed, by reason.",
            ["kind", "reason"], registry=self.registry)
        self.retries = Counter(
            "smart_tuner_notifier_delivery_retries",
            "Retried Telegram sends, by what caused the retry.",
            ["cause"], registry=self.registry)
        self.queue_depth = Gauge(
            "smart_tuner_notifier_queue_depth",
            "Telegram messages queued or in flight, all chats together.",
            registry=self.registry)
        # Every known series exists from the start at 0, so rates and alerts see them.
        for kind in KINDS:
            for outcome in ("sent", "failed"):
                self.deliveries.labels(kind=kind, outcome=outcome)
            for reason in FAILURE_REASONS:
                self.failures.labels(kind=kind, reason=reason)
        for cause in RETRY_CAUSES:
            self.retries.labels(cause=cause)


@dataclass
class _Delivery:
    """One ``send_*`` call: its future resolves once every part is done."""

    future: asyncio.Future[bool]
    remaining: int
    ok: bool = True


@dataclass
class _Part:
    """One Telegram message to send: a text, or a photo or audio with its caption."""

    delivery: _Delivery
    chat_id: int
    kind: Kind
    text: str  # the message text, or the caption of a photo or audio
    reply_markup: InlineKeyboardMarkup | None = None
    data: bytes = b""
    filename: str = ""
    title: str | None = None


@dataclass
class _Chat:
    """A chat's queue and pacing; kept after its worker ends so the pacing carries over."""

    chat_id: int
    queue: deque[_Part] = field(default_factory=deque)
    in_flight: _Part | None = None
    next_at: float = 0.0  # loop time before which nothing more may be sent to the chat
    worker: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class _Failure:
    """Why a part finally failed: the counter's ``reason`` and what Telegram said."""

    reason: str
    detail: str


class Outbox:
    """The notifier's send queue to Telegram through ``bot``; see the module docstring.

    ``send_*`` queue a message and return at once with a future of its outcome; they must
    be called from the thread of the running event loop the outbox works in. ``sleep`` is
    what every wait goes through (tests may observe or replace it); ``rng`` draws the
    backoff jitter.
    """

    def __init__(self, bot: Bot, policy: DeliveryPolicy = DeliveryPolicy(),
                 metrics: DeliveryMetrics | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        self.bot = bot
        self.policy = policy
        self.metrics = metrics if metrics is not None else DeliveryMetrics()
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._chats: dict[int, _Chat] = {}
        self._deliveries: set[asyncio.Future[bool]] = set()
        self._pending = 0
        self._closed = False
        self._global_next_at = 0.0  # loop time of the next free slot of the bot-wide limit

    # ------------------------------------------------------------------ sending

    def send_text(self, chat_id: int, text: str,
                  reply_markup: InlineKeyboardMarkup | None = None) -> asyncio.Future[bool]:
        """Queue ``text`` (HTML parse mode) for ``chat_id``; the future says if it all went.

        A text over Telegram's limit is sent as several messages in order, cut by
        ``split_message``; ``reply_markup`` goes on the last one. A text with nothing to
        send fails at once (logged and counted).
        """
        loop = asyncio.get_running_loop()
        delivery = _Delivery(loop.create_future(), 0)
        parts = [_Part(delivery, chat_id, "text", chunk) for chunk in split_message(text)]
        if not parts:
            return self._reject([_Part(delivery, chat_id, "text", text)], "empty",
                                "the text has nothing to send")
        parts[-1].reply_markup = reply_markup
        return self._enqueue(chat_id, parts)

    def send_photo(self, chat_id: int, png: bytes, caption: str = "",
                   filename: str = "alignment.png") -> asyncio.Future[bool]:
        """Queue a photo (``png`` bytes) with an HTML ``caption`` for ``chat_id``.

        A caption over 1024 UTF-16 units: its first part goes on the photo and the rest
        follows as text messages, so nothing is lost.
        """
        loop = asyncio.get_running_loop()
        delivery = _Delivery(loop.create_future(), 0)
        first, rest = self._media_caption(delivery, chat_id, caption)
        media = _Part(delivery, chat_id, "photo", first, data=png, filename=filename)
        return self._enqueue(chat_id, [media, *rest])

    def send_audio(self, chat_id: int, data: bytes, filename: str, caption: str = "",
                   title: str | None = None) -> asyncio.Future[bool]:
        """Queue an audio file (``data`` named ``filename``) with an HTML ``caption``.

        An overlong caption is handled as for ``send_photo``.
        """
        loop = asyncio.get_running_loop()
        delivery = _Delivery(loop.create_future(), 0)
        first, rest = self._media_caption(delivery, chat_id, caption)
        media = _Part(delivery, chat_id, "audio", first, data=data, filename=filename,
                      title=title)
        return self._enqueue(chat_id, [media, *rest])

    @staticmethod
    def _media_caption(delivery: _Delivery, chat_id: int,
                       caption: str) -> tuple[str, list[_Part]]:
        """A media's caption and the text parts that carry what does not fit in it."""
        chunks = split_message(caption, CAPTION_LIMIT) if caption else []
        if not chunks:
            return "", []
        overflow = split_message("\n".join(chunks[1:])) if len(chunks) > 1 else []
        return chunks[0], [_Part(delivery, chat_id, "text", chunk) for chunk in overflow]

    def _enqueue(self, chat_id: int, parts: list[_Part]) -> asyncio.Future[bool]:
        if self._closed:
            return self._reject(parts, "closed", "the outbox is closed")
        chat = self._chats.get(chat_id)
        if chat is None:
            chat = self._chats[chat_id] = _Chat(chat_id)
        if len(chat.queue) + len(parts) > self.policy.queue_size_per_chat:
            return self._reject(parts, "queue_full",
                                f"{len(chat.queue)} messages already wait for this chat")
        delivery = parts[0].delivery
        delivery.remaining = len(parts)
        chat.queue.extend(parts)
        self._pending += len(parts)
        self.metrics.queue_depth.set(self._pending)
        self._deliveries.add(delivery.future)
        delivery.future.add_done_callback(self._deliveries.discard)
        if chat.worker is None:
            chat.worker = asyncio.get_running_loop().create_task(
                self._work(chat), name=f"telegram-outbox-{chat_id}")
        return delivery.future

    def _reject(self, parts: list[_Part], reason: str, detail: str) -> asyncio.Future[bool]:
        """Fail ``parts`` before they were ever queued."""
        delivery = parts[0].delivery
        delivery.remaining = len(parts)
        self._pending += len(parts)  # _finish takes them off again
        for part in parts:
            self._finish(part, _Failure(reason, detail), attempts=0)
        return delivery.future

    # ------------------------------------------------------------------ waiting

    @property
    def pending(self) -> int:
        """Telegram messages (parts) queued or in flight, all chats together."""
        return self._pending

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is sent or has failed; ``False`` on timeout."""
        waiting = [future for future in self._deliveries if not future.done()]
        if not waiting:
            return True
        _, not_done = await asyncio.wait(waiting, timeout=timeout_s)
        return not not_done

    async def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new messages, drain for up to ``timeout_s``, then stop the workers.

        Whatever is still queued then fails with reason ``closed`` (logged and counted).
        The bot and its session stay open: they belong to the caller.
        """
        self._closed = True
        await self.drain(timeout_s)
        workers = [chat.worker for chat in self._chats.values() if chat.worker is not None]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        # A worker cancelled before it first ran never saw its queue: fail that here.
        for chat in self._chats.values():
            while chat.queue:
                self._finish(chat.queue.popleft(), _Failure("closed", "the outbox was closed"),
                             attempts=0)

    # ------------------------------------------------------------------ the workers

    async def _work(self, chat: _Chat) -> None:
        """Send ``chat``'s queue in order; ends when it is empty (a new send restarts it)."""
        try:
            while chat.queue:
                part = chat.in_flight = chat.queue.popleft()
                outcome = await self._deliver(chat, part)
                chat.in_flight = None
                self._finish(part, outcome[0], outcome[1])
        except asyncio.CancelledError:
            stopped = [chat.in_flight] if chat.in_flight is not None else []
            stopped.extend(chat.queue)
            chat.in_flight = None
            chat.queue.clear()
            for part in stopped:
                self._finish(part, _Failure("closed", "the outbox was closed"), attempts=0)
            raise
        finally:
            chat.worker = None

    def _finish(self, part: _Part, failure: _Failure | None, attempts: int) -> None:
        """Count and log a part's outcome; resolve its future with the last part."""
        self._pending -= 1
        self.metrics.queue_depth.set(self._pending)
        delivery = part.delivery
        if failure is None:
            self.metrics.deliveries.labels(kind=part.kind, outcome="sent").inc()
        else:
            delivery.ok = False
            self.metrics.deliveries.labels(kind=part.kind, outcome="failed").inc()
            self.metrics.failures.labels(kind=part.kind, reason=failure.reason).inc()
            log.error("Telegram %s to chat %s failed (%s) after %d attempt(s): %s; text: %r",
                      part.kind, part.chat_id, failure.reason, attempts, failure.detail,
                      part.text[:PREVIEW_CHARS])
        delivery.remaining -= 1
        if delivery.remaining <= 0 and not delivery.future.done():
            delivery.future.set_result(delivery.ok)

    async def _wait_turn(self, chat: _Chat) -> None:
        """Wait for the chat's pacing, then for a slot of the bot-wide rate."""
        loop = asyncio.get_running_loop()
        delay = chat.next_at - loop.time()
        if delay > 0:
            await self._sleep(delay)
        # Slots are reserved in order, one per 1/rate seconds, so concurrent chats queue up
        # behind each other instead of all waking at once.
        now = loop.time()
        slot = max(now, self._global_next_at)
        self._global_next_at = slot + 1.0 / self.policy.global_rate_per_s
        if slot > now:
            await self._sleep(slot - now)

    def _hold(self, chat: _Chat, seconds: float) -> None:
        """Send nothing more to ``chat`` for ``seconds`` from now (longer holds win)."""
        chat.next_at = max(chat.next_at, asyncio.get_running_loop().time() + seconds)

    async def _deliver(self, chat: _Chat, part: _Part) -> tuple[_Failure | None, int]:
        """Send ``part`` with retries; ``(None, attempts)`` once sent, else the failure."""
        policy = self.policy
        as_html = True
        transient = 0  # 5xx and network failures so far: the backoff exponent
        attempts = 0
        while True:
            attempts += 1
            await self._wait_turn(chat)
            retry: str | None = None
            try:
                await self._call(part, as_html)
                return None, attempts
            except TelegramRetryAfter as exc:
                if exc.retry_after > policy.max_retry_after_s:
                    return _Failure("retry_after_too_long", exc.message), attempts
                self._hold(chat, exc.retry_after)  # exactly as long as Telegram asked
                retry, reason, detail = "retry_after", "retry_after", exc.message
            except TelegramBadRequest as exc:
                if not (as_html and PARSE_ERROR in exc.message.lower()):
                    return _Failure("bad_request", exc.message), attempts
                # The caller's HTML is broken; the words still matter, so send them plain.
                as_html = False
                retry, reason, detail = "parse_fallback", "bad_request", exc.message
                log.warning("Telegram refused the HTML of a %s to chat %s (%s); resending "
                            "it as plain text", part.kind, part.chat_id, exc.message)
            except ClientDecodeError as exc:
                if isinstance(exc.data, dict) and exc.data.get("ok") is True:
                    # Telegram took the message but aiogram cannot read its answer (a field
                    # newer than aiogram, say): sending again would post it twice.
                    log.warning("Telegram accepted a %s to chat %s with an answer aiogram "
                                "could not read; counted as sent", part.kind, part.chat_id)
                    return None, attempts
                # A proxy in front of Telegram answers some 5xx with an HTML page instead of
                # Telegram's JSON: as transient as the 5xx itself.
                retry, reason, detail = "server_error", "server_error", str(exc)[:200]
            except TelegramServerError as exc:
                retry, reason, detail = "server_error", "server_error", exc.message
            except TelegramEntityTooLarge as exc:  # a TelegramNetworkError, but final
                return _Failure("too_large", exc.message), attempts
            except _NETWORK_ERRORS as exc:
                retry, reason, detail = "network", "network", str(exc) or type(exc).__name__
            except TelegramForbiddenError as exc:
                return _Failure("forbidden", exc.message), attempts
            except TelegramUnauthorizedError as exc:
                return _Failure("unauthorized", exc.message), attempts
            except TelegramNotFound as exc:
                return _Failure("not_found", exc.message), attempts
            except TelegramMigrateToChat as exc:
                return _Failure("migrated", exc.message), attempts
            except TelegramAPIError as exc:
                return _Failure("api_error", exc.message), attempts
            except Exception as exc:
                log.exception("unexpected error sending a Telegram %s to chat %s",
                              part.kind, part.chat_id)
                return _Failure("unexpected", f"{type(exc).__name__}: {exc}"), attempts
            finally:
                # Every attempt, answered or not, paces the next send to this chat.
                self._hold(chat, policy.per_chat_interval_s)
            if attempts >= policy.max_attempts:
                return _Failure(reason, detail), attempts
            if retry in ("server_error", "network"):
                self._hold(chat, policy.backoff_s(transient, self._rng.random()))
                transient += 1
            self.metrics.retries.labels(cause=retry).inc()

    async def _call(self, part: _Part, as_html: bool) -> None:
        """One attempt at sending ``part`` (its HTML as plain text when not ``as_html``)."""
        parse_mode = "HTML" if as_html else None
        text = part.text if as_html else to_plain_text(part.text)
        if part.kind == "text":
            await self.bot.send_message(chat_id=part.chat_id, text=text, parse_mode=parse_mode,
                                        reply_markup=part.reply_markup)
        elif part.kind == "photo":
            await self.bot.send_photo(
                chat_id=part.chat_id, photo=BufferedInputFile(part.data, part.filename),
                caption=text or None, parse_mode=parse_mode)
        else:
            await self.bot.send_audio(
                chat_id=part.chat_id, audio=BufferedInputFile(part.data, part.filename),
                caption=text or None, parse_mode=parse_mode, title=part.title)
