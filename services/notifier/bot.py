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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from aiogram import BaseMiddleware, F, Router
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
    "spikeguard": "set_spike_guard", "rollback": "rollback",
}
DEFAULT_ACTIONS = 5
MAX_ACTIONS = 20
STOP_DATA, CANCEL_DATA = "stop", "cancel"  # callback data prefixes of the /stop buttons
APPROVE_DATA, REJECT_DATA = "approve", "reject"  # ... and of a proposal's buttons
COMMAND_NAME = re.compile(r"^/([A-Za-z0-9_]+)(?:@\w+)?")
BOT_MENU = ("status", "report", "alignment", "sample", "actions", "pause", "resume", "stop",
            "lr", "ga", "gate", "spikeguard", "rollback", "help")

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
        for reason in ("chat", "admin"):
            self.refusals.labels(reason)


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


def command_name(text: str | None) -> str | None:
    """``"/lr@SmartTunerBot 1e-4"`` -> ``"lr"``; None for text that is not a command."""
    match = COMMAND_NAME.match(text or "")
    return match.group(1).lower() if match else None


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


class AccessMiddleware(BaseMiddleware):
    """Refuses chats outside the allow-list and non-admins' mutating commands; turns a Redis
    outage into a reply instead of a silent failure."""

    def __init__(self, ctx: BotContext):
        self.ctx = ctx

    async def __call__(self, handler: Callable[[TelegramObject, dict[str, Any]],
                                               Awaitable[Any]],
                       event: TelegramObject, data: dict[str, Any]) -> Any:
        ctx = self.ctx
        if isinstance(event, TgMessage):
            chat_id, user, what = event.chat.id, event.from_user, event.text or "<no text>"
            mutating = command_name(event.text) in MUTATING
        elif isinstance(event, CallbackQuery):
            message = event.message
            chat_id = message.chat.id if message is not None else None
            user, what = event.from_user, f"button {event.data!r}"
            mutating = True  # every button changes something: /stop's, or a proposal's
        else:  # pragma: no cover - the router only registers messages and callbacks
            return await handler(event, data)
        user_id = user.id if user is not None else None
        who = f"chat {chat_id}, user {user_id} (@{getattr(user, 'username', None)})"
        settings = ctx.settings
        if chat_id not in settings.chat_ids:
            ctx.metrics.refusals.labels("chat").inc()
            log.warning("refused %s from %s: chat not in the allow-list", what[:80], who)
            await self._refuse(event, chat_id, ctx.words["refused_chat"])
            return None
        if mutating and settings.admin_ids and user_id not in settings.admin_ids:
            ctx.metrics.refusals.labels("admin").inc()
            log.warning("refused %s from %s: not an admin", what[:80], who)
            await self._refuse(event, chat_id, ctx.words["refused_admin"])
            return None
        try:
            return await handler(event, data)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            log.warning("%s from %s: Redis unreachable: %s", what[:80], who, error)
            if chat_id is not None:
                ctx.reply(chat_id, ctx.words["redis_down"].format(reason=escape(error)))
            return None

    async def _refuse(self, event: TelegramObject, chat_id: int | None, text: str) -> None:
        if isinstance(event, CallbackQuery):
            # A button press is answered in place; Telegram shows the text as an alert.
            await event.answer(to_plain_text(text), show_alert=True)
        elif chat_id is not None:
            self.ctx.reply(chat_id, text)


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
    try:
        return float(text.replace(",", "."))  # "0,5" is how half is written in Russian
    except ValueError:
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
    if args and args[0].isdigit():
        count = int(args.pop(0))
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
    text = (command.args or "").strip() or (
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
    """/lr VALUE [run], /ga VALUE [run], /gate VALUE [run], /spikeguard FACTOR [run]."""
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
    """A router with every handler, behind access control (a new one per dispatcher)."""
    router = Router(name="smart-tuner")
    middleware = AccessMiddleware(ctx)
    router.message.outer_middleware(middleware)
    router.callback_query.outer_middleware(middleware)
    register = router.message.register
    register(on_help, CommandFilter("help", "start"))
    register(on_status, CommandFilter("status"))
    register(on_report, CommandFilter("report"))
    register(on_alignment, CommandFilter("alignment"))
    register(on_actions, CommandFilter("actions"))
    register(on_sample, CommandFilter("sample"))
    register(on_simple, CommandFilter("pause", "resume", "rollback"))
    register(on_value, CommandFilter("lr", "ga", "gate", "spikeguard"))
    register(on_stop, CommandFilter("stop"))
    register(on_unknown, F.text.startswith("/"))  # last: only what nothing else took
    router.callback_query.register(
        on_stop_answer,
        F.data.startswith(f"{STOP_DATA}:") | F.data.startswith(f"{CANCEL_DATA}:"))
    router.callback_query.register(
        on_approval_answer,
        F.data.startswith(f"{APPROVE_DATA}:") | F.data.startswith(f"{REJECT_DATA}:"))
    return router
