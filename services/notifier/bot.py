"""The Telegram bot: commands that read a run and commands that correct it.

Only chats in the allow-list are answered (everyone else gets a polite refusal, and the
attempt is logged and counted); mutating commands may be limited further to admin user
ids. A mutating command becomes a ``schemas.Command`` with ``source="bot"``, validated by
the same schema and bounds as the tuner's and the API's, written through the same
``RunStore``, and the bot replies with the trainer's ack. ``/stop`` asks for confirmation
with a button that only the person who asked may press, and only for a short while.
A supervised tuner proposal comes with Approve / Reject buttons (sent by the feed): any
admin may answer, the answer goes to the tuner through ``RunStore.answer`` and the message
then says who decided.

Every reply goes through the ``Outbox`` (rate limits, retries); only answers to button
presses go straight to Telegram, which expects them within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from aiogram import BaseMiddleware, F, Router
from aiogram.dispatcher.flags import get_flag
from aiogram.dispatcher.middlewares.user_context import EVENT_CHAT_KEY, EVENT_FROM_USER_KEY
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command as CommandFilter
from aiogram.filters import CommandObject
from aiogram.types import (
    BotCommand,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    TelegramObject,
)
from aiogram.types import Message as TgMessage
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from services.core.bounds import check_command
from services.core.indicators import Verdict
from services.core.runstore import RunStore
from services.core.schemas import (
    COMMAND_TTL_S,
    MAX_NOTE_CHARS,
    AlignmentReport,
    Approval,
    Command,
    CommandAction,
    Event,
    MessageError,
    MetricsMessage,
    ProbeReport,
)
from services.core.streams import validate_run_id
from services.diagnostics.plots import latest_alignment_png
from services.notifier.config import NotifierSettings
from services.notifier.delivery import Outbox
from services.notifier.reports import (
    MAX_ACTIONS_SHOWN,
    MESSAGES,
    Language,
    ack_report,
    actions_report,
    escape,
    format_clock,
    format_command_value,
    format_percent,
    format_score,
    help_text,
    progress_report,
    resolution_text,
    status_report,
    to_plain_text,
)
from services.notifier.sample import NoCheckpointError, Sample, speak

log = logging.getLogger(__name__)

# Bot command -> the trainer action it sends (the mutating commands).
MUTATING: dict[str, CommandAction] = {
    "pause": "pause", "resume": "resume", "stop": "stop", "lr": "set_lr",
    "ga": "set_guided_attention_weight", "gate": "set_gate_positive_weight",
    "spikeguard": "set_spike_guard", "rollback": "rollback", "skip": "skip_failed_batches",
}
DEFAULT_ACTIONS = 5
MAX_ACTIONS = 20
STOP_DATA, CANCEL_DATA = "stop", "cancel"  # callback data prefixes of the /stop buttons
APPROVE_DATA, REJECT_DATA = "approve", "reject"  # ... and of a proposal's buttons
MUTATING_FLAG = "mutating"  # handler flag: the admin check applies (AdminMiddleware)
MINUTE_S = 60.0
# /actions N: ASCII digits only (str.isdigit takes "²", which int() refuses), and few of
# them (int() refuses more than 4300 digits; MAX_ACTIONS has two).
ACTIONS_COUNT = re.compile(r"[0-9]{1,6}")
BOT_MENU = ("status", "report", "alignment", "sample", "actions", "pause", "resume", "stop",
            "lr", "ga", "gate", "spikeguard", "skip", "rollback", "help")

Speaker = Callable[[Path, str, str, str], Sample]


class BotMetrics:
    """The bot's Prometheus series: commands by outcome, refusals by reason."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.commands = Counter(
            "smart_tuner_notifier_bot_commands", "Bot commands handled, by command and outcome",
            ["command", "outcome"], registry=self.registry)
        self.refusals = Counter(
            "smart_tuner_notifier_bot_refusals", "Bot updates refused, by reason",
            ["reason"], registry=self.registry)
        self.refusals_unanswered = Counter(
            "smart_tuner_notifier_bot_refusals_unanswered",
            "Refusals not replied to because of the refusal rate limit (still counted in "
            "the refusals), by reason", ["reason"], registry=self.registry)
        for reason in ("chat", "admin"):
            self.refusals.labels(reason)
            self.refusals_unanswered.labels(reason)


@dataclass(frozen=True)
class Confirmation:
    """A /stop waiting for its button press."""

    run_id: str
    chat_id: int
    user_id: int
    expires_at: float  # monotonic


@dataclass
class BotContext:
    """What every handler shares (passed to aiogram as workflow data ``ctx``)."""

    settings: NotifierSettings
    store: RunStore
    outbox: Outbox
    metrics: BotMetrics = field(default_factory=BotMetrics)
    speaker: Speaker = speak
    clock: Callable[[], float] = time.monotonic
    confirmations: dict[str, Confirmation] = field(default_factory=dict)
    synthesis_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def words(self) -> dict[str, str]:
        """The message table of the configured language."""
        return MESSAGES[self.settings.language]

    def reply(self, chat_id: int, text: str,
              markup: InlineKeyboardMarkup | None = None) -> asyncio.Future[bool]:
        """Queue ``text`` for ``chat_id``."""
        return self.outbox.send_text(chat_id, text, reply_markup=markup)


def approval_markup(language: Language, token: str) -> InlineKeyboardMarkup:
    """The Approve / Reject buttons of a proposal; ``token`` stands for run and action."""
    words = MESSAGES[language]
    return InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text=words["approve"], callback_data=f"{APPROVE_DATA}:{token}"),
        InlineKeyboardButton(text=words["reject"], callback_data=f"{REJECT_DATA}:{token}"),
    ]])


def bot_commands(language: str) -> list[BotCommand]:
    """The command menu shown by Telegram clients (setMyCommands)."""
    lines = {line.split(" ", 1)[0].split(",")[0].lstrip("/"): line
             for line in MESSAGES[language]["help"].split("\n") if line.startswith("/")}
    menu = []
    for name in BOT_MENU:
        line = lines.get(name, f"/{name}")
        description = line.split("—", 1)[-1].strip() if "—" in line else name
        menu.append(BotCommand(command=name, description=description[:256]))
    return menu


# ---------------------------------------------------------------------------- access


class RefusalLimiter:
    """Which refusals get a reply: at most one per chat per ``interval_s`` and at most
    ``per_minute`` in all. Refusals share the outbox with alerts, so a flood of strangers
    must not queue up in front of a red flag; the refusals not answered are still logged
    and counted by the caller.

    Only answered refusals are remembered, so the memory is bounded by the limits, not by
    how many chats knock.
    """

    def __init__(self, interval_s: float, per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.per_minute = per_minute
        self.clock = clock
        self._last: dict[int, float] = {}  # chat -> when its last refusal was answered
        self._answered: deque[float] = deque()  # when each refusal of the last minute was

    def allow(self, chat_id: int) -> bool:
        """Whether a refusal to ``chat_id`` may be sent now (and if so, count it sent)."""
        now = self.clock()
        while self._answered and self._answered[0] <= now - MINUTE_S:
            self._answered.popleft()
        for chat, at in list(self._last.items()):
            if at <= now - self.interval_s:
                del self._last[chat]
        if chat_id in self._last or len(self._answered) >= self.per_minute:
            return False
        self._last[chat_id] = now
        self._answered.append(now)
        return True


def _describe(event: TelegramObject) -> str:
    """What an update asked for, for the log (quoted: the text is the sender's)."""
    if isinstance(event, TgMessage):
        return repr((event.text or event.caption or "<no text>")[:80])
    if isinstance(event, CallbackQuery):
        return f"button {event.data!r}"
    return type(event).__name__


Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]


class _Guard(BaseMiddleware):
    """A check on who is asking: the bot's context, and the limiter its refusals go through."""

    def __init__(self, ctx: BotContext, limiter: RefusalLimiter):
        self.ctx = ctx
        self.limiter = limiter


class AccessMiddleware(_Guard):
    """The allow-list, on every kind of update (an outer middleware: before any filter).

    Chat and user come from aiogram's event context, which is filled the same way for a
    message, a captioned upload, an edit or a button press, so no kind of update can name
    its chat in a field this check does not read. Also turns a Redis outage into a reply
    instead of a silent failure.
    """

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]
                       ) -> Any:
        ctx = self.ctx
        chat, user = data.get(EVENT_CHAT_KEY), data.get(EVENT_FROM_USER_KEY)
        chat_id = chat.id if chat is not None else None
        what = _describe(event)
        who = _who(chat_id, user)
        if chat_id not in ctx.settings.chat_ids:
            ctx.metrics.refusals.labels("chat").inc()
            log.warning("refused %s from %s: chat not in the allow-list", what, who)
            await refuse(ctx, self.limiter, event, chat_id, "chat")
            return None
        try:
            return await handler(event, data)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            log.warning("%s from %s: Redis unreachable: %s", what, who, error)
            if chat_id is not None:
                ctx.reply(chat_id, ctx.words["redis_down"].format(reason=escape(error)))
            return None


class AdminMiddleware(_Guard):
    """The admin list, for every handler flagged ``mutating`` (an inner middleware: it runs
    once a handler's filters have matched, so it judges the handler that is about to run,
    however its command was spelled or carried: text, caption, button)."""

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]
                       ) -> Any:
        ctx = self.ctx
        admins = ctx.settings.admin_ids
        if not get_flag(data, MUTATING_FLAG) or not admins:
            return await handler(event, data)
        chat, user = data.get(EVENT_CHAT_KEY), data.get(EVENT_FROM_USER_KEY)
        if user is not None and user.id in admins:
            return await handler(event, data)
        chat_id = chat.id if chat is not None else None
        ctx.metrics.refusals.labels("admin").inc()
        log.warning("refused %s from %s: not an admin", _describe(event), _who(chat_id, user))
        await refuse(ctx, self.limiter, event, chat_id, "admin")
        return None


def _who(chat_id: int | None, user: Any) -> str:
    user_id = user.id if user is not None else None
    return f"chat {chat_id}, user {user_id} (@{getattr(user, 'username', None)})"


async def refuse(ctx: BotContext, limiter: RefusalLimiter, event: TelegramObject,
                 chat_id: int | None, reason: str) -> None:
    """Tell the sender no: a button press in place (Telegram expects an answer, and it does
    not go through the outbox), a message through the outbox within the limiter's rate;
    other updates (edits and the like) get no reply."""
    text = ctx.words[f"refused_{reason}"]
    if isinstance(event, CallbackQuery):
        # Telegram shows the text as an alert; an answer is owed or the button spins.
        await event.answer(to_plain_text(text), show_alert=True)
    elif isinstance(event, TgMessage) and chat_id is not None:
        if limiter.allow(chat_id):
            ctx.reply(chat_id, text)
        else:
            ctx.metrics.refusals_unanswered.labels(reason).inc()
            log.info("refusal to chat %s not answered: over the refusal rate limit", chat_id)


# ---------------------------------------------------------------------------- helpers


async def _run_id(ctx: BotContext, chat_id: int, given: str | None) -> str | None:
    """The run a command is about: ``given`` if it is a known run, else the most recent one;
    None (after telling the chat why) when there is none."""
    if given:
        try:
            validate_run_id(given)
        except ValueError:
            ctx.reply(chat_id, ctx.words["unknown_run"].format(run_id=escape(given)))
            return None
        if not await asyncio.to_thread(ctx.store.exists, given):
            ctx.reply(chat_id, ctx.words["unknown_run"].format(run_id=escape(given)))
            return None
        return given
    run_id = await asyncio.to_thread(ctx.store.most_recent_run)
    if run_id is None:
        ctx.reply(chat_id, ctx.words["no_runs"])
    return run_id


def _args(command: CommandObject) -> list[str]:
    return (command.args or "").split()


def _parse_value(text: str) -> float | None:
    """A command's number, or None for anything float() refuses (the caller answers with
    the usage); out-of-range values, inf and nan are the bounds check's to refuse."""
    try:
        return float(text.replace(",", "."))  # "0,5" is how half is written in Russian
    except (ValueError, OverflowError):
        return None


async def _send_picture(ctx: BotContext, chat_id: int, run_id: str) -> bool:
    """The run's alignment picture to ``chat_id``; False when there is none."""
    try:
        png = await asyncio.to_thread(latest_alignment_png, ctx.store, run_id)
    except MessageError as error:
        log.warning("run %s: newest snapshot does not decode: %s", run_id, error.reason)
        png = None
    if png is None:
        return False
    ctx.outbox.send_photo(chat_id, png, caption=f"<code>{escape(run_id)}</code>",
                          filename=f"{run_id}-alignment.png")
    return True


async def submit(ctx: BotContext, message: TgMessage, name: str, run_id: str,
                 value: float | None = None) -> None:
    """Validate, write and follow one mutating command; reply with the trainer's ack."""
    chat_id = message.chat.id
    user = message.from_user
    action = MUTATING[name]
    requested_by = f"telegram:{user.id if user else '?'}@{chat_id}"
    note = f"/{name} from Telegram user {user.id if user else '?'}"
    if user is not None and user.username:
        note += f" (@{user.username})"
    try:
        command = Command(run_id=run_id, action=action, value=value, source="bot",
                          requested_by=requested_by, note=note[:MAX_NOTE_CHARS],
                          expires_at=time.time() + COMMAND_TTL_S)
    except ValidationError as error:
        reason = error.errors()[0]["msg"]
        command = None
    else:
        reason = check_command(command)
    if command is None or reason is not None:
        ctx.metrics.commands.labels(name, "rejected").inc()
        log.info("bot command /%s %s for run %s refused: %s", name, value, run_id, reason)
        ctx.reply(chat_id, ctx.words["rejected_value"].format(reason=escape(reason)))
        return
    shown = "" if value is None else f" {format_command_value(action, value)}"
    ctx.reply(chat_id, ctx.words["sent"].format(action=escape(action), value=shown,
                                                run_id=escape(run_id)))
    log.info("bot command %s for run %s from %s: %s %s", command.command_id, run_id,
             requested_by, action, value)
    _, ack = await asyncio.to_thread(ctx.store.submit, command, ctx.settings.ack_wait_s)
    if ack is None:
        ctx.metrics.commands.labels(name, "no_ack").inc()
        expires = datetime.fromtimestamp(command.expires_at or 0, UTC).strftime("%H:%M:%S")
        ctx.reply(chat_id, ctx.words["no_ack"].format(
            seconds=f"{ctx.settings.ack_wait_s:g}", expires=expires))
        return
    ctx.metrics.commands.labels(name, ack.status).inc()
    ctx.reply(chat_id, ack_report(command, ack, ctx.settings.language))


# ---------------------------------------------------------------------------- handlers

async def on_help(message: TgMessage, ctx: BotContext) -> None:
    """/help: what the bot can do."""
    ctx.metrics.commands.labels("help", "ok").inc()
    ctx.reply(message.chat.id, help_text(ctx.settings.language, bool(ctx.settings.admin_ids)))


async def on_status(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/status [run]: the run in brief."""
    args = _args(command)
    run_id = await _run_id(ctx, message.chat.id, args[0] if args else None)
    if run_id is None:
        return

    def gather() -> tuple[MetricsMessage | None, AlignmentReport | None, Event | None, int,
                          Verdict | None]:
        store = ctx.store
        return (store.latest(run_id, MetricsMessage), store.latest(run_id, AlignmentReport),
                store.latest(run_id, Event), store.restarts(run_id),
                store.latest_verdict(run_id))

    metrics, report, event, restarts, verdict = await asyncio.to_thread(gather)
    ctx.metrics.commands.labels("status", "ok").inc()
    ctx.reply(message.chat.id, status_report(run_id, metrics, report, event, restarts,
                                             ctx.settings.language, verdict))


async def on_report(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/report [run]: the detailed progress report, then the alignment picture."""
    chat_id = message.chat.id
    args = _args(command)
    run_id = await _run_id(ctx, chat_id, args[0] if args else None)
    if run_id is None:
        return

    def gather() -> tuple[MetricsMessage | None, list[AlignmentReport], list[Any],
                          Verdict | None, ProbeReport | None]:
        store = ctx.store
        return (store.latest(run_id, MetricsMessage), store.recent(run_id, AlignmentReport, 2),
                store.latest_actions(run_id, MAX_ACTIONS_SHOWN), store.latest_verdict(run_id),
                store.latest_probes(run_id))

    metrics, reports, actions, verdict, probes = await asyncio.to_thread(gather)
    if metrics is None:
        ctx.metrics.commands.labels("report", "empty").inc()
        ctx.reply(chat_id, ctx.words["no_metrics"].format(run_id=escape(run_id)))
        return
    report = reports[-1] if reports else None
    previous = reports[-2] if len(reports) > 1 else None
    ctx.reply(chat_id, progress_report(run_id, metrics, report, previous, actions, verdict,
                                       ctx.settings.language, probes))
    await _send_picture(ctx, chat_id, run_id)
    ctx.metrics.commands.labels("report", "ok").inc()


async def on_alignment(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/alignment [run]: the newest alignment picture."""
    args = _args(command)
    run_id = await _run_id(ctx, message.chat.id, args[0] if args else None)
    if run_id is None:
        return
    sent = await _send_picture(ctx, message.chat.id, run_id)
    ctx.metrics.commands.labels("alignment", "ok" if sent else "empty").inc()
    if not sent:
        ctx.reply(message.chat.id, ctx.words["no_picture"].format(run_id=escape(run_id)))


async def on_actions(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/actions [N] [run]: the tuner's last N decisions, each at its latest stage."""
    chat_id = message.chat.id
    args = _args(command)
    count, given = DEFAULT_ACTIONS, None
    if args and ACTIONS_COUNT.fullmatch(args[0]):
        count = int(args.pop(0))
    elif args and args[0][:1].isdigit():  # "²", "1²", 5000 nines: a count, but not one
        count = 0  # int() would not take it: answered with the usage below
    if args:
        given = args.pop(0)
    if not 1 <= count <= MAX_ACTIONS or args:
        ctx.metrics.commands.labels("actions", "rejected").inc()
        ctx.reply(chat_id, ctx.words["usage"].format(
            usage=ctx.words["usage_actions"].format(max=MAX_ACTIONS)))
        return
    run_id = await _run_id(ctx, chat_id, given)
    if run_id is None:
        return
    records = await asyncio.to_thread(ctx.store.latest_actions, run_id, count)
    ctx.metrics.commands.labels("actions", "ok").inc()
    ctx.reply(chat_id, actions_report(run_id, records, ctx.settings.language))


async def on_sample(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/sample [text]: the latest checkpoint speaks ``text`` (or the language's pangram)."""
    chat_id = message.chat.id
    settings = ctx.settings
    given = (command.args or "").strip()
    if len(given) > settings.sample_max_chars:
        # Synthesis time grows with the text and holds the one synthesis slot.
        ctx.metrics.commands.labels("sample", "rejected").inc()
        ctx.reply(chat_id, ctx.words["sample_too_long"].format(
            length=len(given), max=settings.sample_max_chars))
        return
    text = given or (
        settings.sample_text_ru if settings.language == "ru" else settings.sample_text_en)
    run_id = await _run_id(ctx, chat_id, None)
    if run_id is None:
        return
    ctx.reply(chat_id, ctx.words["sample_wait"].format(text=escape(text[:200])))
    async with ctx.synthesis_lock:  # one synthesis at a time: it is CPU work
        try:
            sample = await asyncio.to_thread(ctx.speaker, settings.runs_dir, run_id, text,
                                             "auto")
        except NoCheckpointError as error:
            ctx.metrics.commands.labels("sample", "empty").inc()
            ctx.reply(chat_id, ctx.words["no_checkpoint"].format(path=escape(error)))
            return
        except Exception as error:  # a broken checkpoint or text must not kill the bot
            log.exception("run %s: /sample failed", run_id)
            ctx.metrics.commands.labels("sample", "error").inc()
            ctx.reply(chat_id, ctx.words["sample_failed"].format(reason=escape(error)))
            return
    words = ctx.words
    caption = words["sample_caption"].format(
        run_id=escape(run_id), step=sample.step,
        stopped=words["sample_stopped" if sample.stopped else "sample_not_stopped"],
        diagonality=format_score(sample.diagonality), quality=format_percent(sample.quality))
    ctx.outbox.send_audio(chat_id, sample.audio, filename=f"{run_id}-step{sample.step}.mp3",
                          caption=caption, title=sample.text[:64])
    ctx.metrics.commands.labels("sample", "ok").inc()


async def on_simple(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/pause, /resume, /rollback [run]."""
    args = _args(command)
    run_id = await _run_id(ctx, message.chat.id, args[0] if args else None)
    if run_id is not None:
        await submit(ctx, message, command.command.lower(), run_id)


async def on_value(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/lr VALUE [run], /ga VALUE [run], /gate VALUE [run], /spikeguard FACTOR [run],
    /skip STEPS [run]."""
    name = command.command.lower()
    args = _args(command)
    value = _parse_value(args[0]) if args else None
    if value is None or len(args) > 2:
        ctx.metrics.commands.labels(name, "rejected").inc()
        ctx.reply(message.chat.id, ctx.words["usage"].format(usage=ctx.words[f"usage_{name}"]))
        return
    run_id = await _run_id(ctx, message.chat.id, args[1] if len(args) > 1 else None)
    if run_id is not None:
        await submit(ctx, message, name, run_id, value)


async def on_stop(message: TgMessage, command: CommandObject, ctx: BotContext) -> None:
    """/stop [run]: ask to confirm with buttons; the stop is sent on "yes"."""
    chat_id = message.chat.id
    args = _args(command)
    run_id = await _run_id(ctx, chat_id, args[0] if args else None)
    if run_id is None or message.from_user is None:
        return
    now = ctx.clock()
    for token, waiting in list(ctx.confirmations.items()):
        if waiting.expires_at <= now:
            del ctx.confirmations[token]
    token = secrets.token_urlsafe(12)
    ctx.confirmations[token] = Confirmation(run_id, chat_id, message.from_user.id,
                                            now + ctx.settings.confirm_ttl_s)
    markup = InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text=ctx.words["stop_yes"], callback_data=f"{STOP_DATA}:{token}"),
        InlineKeyboardButton(text=ctx.words["stop_no"], callback_data=f"{CANCEL_DATA}:{token}"),
    ]])
    ctx.metrics.commands.labels("stop", "asked").inc()
    ctx.reply(chat_id, ctx.words["stop_confirm"].format(run_id=escape(run_id)), markup)


async def on_stop_answer(callback: CallbackQuery, ctx: BotContext) -> None:
    """A /stop button: only its asker, only before it expires, only once."""
    kind, _, token = (callback.data or "").partition(":")
    waiting = ctx.confirmations.get(token)
    if waiting is None or waiting.expires_at <= ctx.clock():
        ctx.confirmations.pop(token, None)
        await callback.answer(ctx.words["confirm_expired"], show_alert=True)
        return
    if callback.from_user.id != waiting.user_id:
        log.warning("user %s pressed a /stop button of user %s", callback.from_user.id,
                    waiting.user_id)
        await callback.answer(ctx.words["confirm_other_user"], show_alert=True)
        return
    del ctx.confirmations[token]
    await callback.answer()
    if kind == CANCEL_DATA:
        ctx.metrics.commands.labels("stop", "cancelled").inc()
        ctx.reply(waiting.chat_id, ctx.words["stop_cancelled"])
        return
    if not isinstance(callback.message, TgMessage):
        return  # pragma: no cover - the asking message is always one the bot sent
    # The command is on behalf of the presser (== the asker), in the asker's chat.
    message = callback.message.model_copy(update={"from_user": callback.from_user})
    await submit(ctx, message, "stop", waiting.run_id)


async def on_approval_answer(callback: CallbackQuery, ctx: BotContext) -> None:
    """A proposal's Approve / Reject button (admins only: the middleware refuses others).

    The answer is written for the tuner, which acts on the first one it reads; a press on a
    proposal already decided is told how it ended and writes nothing. The message is then
    edited to say who decided, without its buttons.
    """
    words = ctx.words
    kind, _, token = (callback.data or "").partition(":")
    approved = kind == APPROVE_DATA
    target = await asyncio.to_thread(ctx.store.approval_target, token)
    record = None if target is None else await asyncio.to_thread(ctx.store.latest_action,
                                                                 *target)
    if target is None or record is None:
        ctx.metrics.commands.labels("approval", "unknown").inc()
        await callback.answer(words["approval_unknown"], show_alert=True)
        return
    run_id, action_id = target
    if record.stage != "proposed":
        ctx.metrics.commands.labels("approval", "decided").inc()
        ended = resolution_text(words, record) or words[f"stage_{record.stage}"]
        await callback.answer(to_plain_text(words["approval_decided"].format(
            resolution=ended)), show_alert=True)
        return
    user = callback.from_user
    message = callback.message
    chat_id = message.chat.id if message is not None else "?"
    approval = Approval(run_id=run_id, action_id=action_id, approved=approved,
                        by=f"telegram:{user.id}@{chat_id}")
    await asyncio.to_thread(ctx.store.answer, approval)
    log.info("run %s: proposal %s %s by %s", run_id, action_id,
             "approved" if approved else "rejected", approval.by)
    ctx.metrics.commands.labels("approval", "approved" if approved else "rejected").inc()
    await callback.answer(words["approval_sent"])
    if not isinstance(message, TgMessage):
        return  # pragma: no cover - a message too old to edit; the answer is sent anyway
    who = f"@{user.username}" if user.username else str(user.id)
    line = words["approval_by_approved" if approved else "approval_by_rejected"].format(
        who=escape(who), when=format_clock(time.time()))
    try:
        await message.edit_text(f"{message.html_text}\n{line}", parse_mode="HTML",
                                reply_markup=None)
    except TelegramAPIError as error:  # too long, or edited meanwhile: drop the buttons
        log.info("proposal message not edited (%s); removing its buttons", error)
        with contextlib.suppress(TelegramAPIError):
            await message.edit_reply_markup(reply_markup=None)


async def on_unknown(message: TgMessage, ctx: BotContext) -> None:
    """Any other command: point to /help."""
    ctx.metrics.commands.labels("unknown", "ok").inc()
    ctx.reply(message.chat.id, ctx.words["unknown_command"])


def build_router(ctx: BotContext) -> Router:
    """A router with every handler, behind access control (a new one per dispatcher).

    The allow-list and the admin check sit on every kind of update the router could ever
    see, not only on the ones with handlers today, so a handler added later for edits or
    channel posts is guarded too. Handlers that change a run are flagged ``mutating``.
    """
    router = Router(name="smart-tuner")
    limiter = RefusalLimiter(ctx.settings.refusal_interval_s, ctx.settings.refusals_per_minute,
                             ctx.clock)
    access, admin = AccessMiddleware(ctx, limiter), AdminMiddleware(ctx, limiter)
    for name, observer in router.observers.items():
        if name != "error":
            observer.outer_middleware(access)
            observer.middleware(admin)
    mutating = {MUTATING_FLAG: True}
    register = router.message.register
    register(on_help, CommandFilter("help", "start"))
    register(on_status, CommandFilter("status"))
    register(on_report, CommandFilter("report"))
    register(on_alignment, CommandFilter("alignment"))
    register(on_actions, CommandFilter("actions"))
    register(on_sample, CommandFilter("sample"))
    register(on_simple, CommandFilter("pause", "resume", "rollback"), flags=mutating)
    register(on_value, CommandFilter("lr", "ga", "gate", "spikeguard", "skip"), flags=mutating)
    register(on_stop, CommandFilter("stop"), flags=mutating)
    register(on_unknown, F.text.startswith("/"))  # last: only what nothing else took
    # Every button changes something: /stop's, or a proposal's.
    router.callback_query.register(
        on_stop_answer,
        F.data.startswith(f"{STOP_DATA}:") | F.data.startswith(f"{CANCEL_DATA}:"),
        flags=mutating)
    router.callback_query.register(
        on_approval_answer,
        F.data.startswith(f"{APPROVE_DATA}:") | F.data.startswith(f"{REJECT_DATA}:"),
        flags=mutating)
    # Every mutating command must reach the admin check: a new one has to be flagged.
    flagged = {command for handler in router.message.handlers
               if handler.flags.get(MUTATING_FLAG)
               for flt in handler.flags.get("commands", ()) for command in flt.commands}
    if not set(MUTATING) <= flagged:
        raise RuntimeError(f"mutating commands without the admin check: "
                           f"{sorted(set(MUTATING) - flagged)}")
    return router
