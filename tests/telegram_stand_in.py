"""A local stand-in for the Telegram Bot API, served over real HTTP for the tests.

The stand-in is an aiohttp web app on ``127.0.0.1`` (a free port) running in a background
thread with its own event loop, so sync tests and tests that drive their own loop with
``asyncio.run`` can both use it. aiogram reaches it through
``AiohttpSession(api=TelegramAPIServer.from_base(standin.base_url))``, which builds the URLs
``{base}/bot{token}/{method}`` exactly as for the real server.

It answers the way Telegram does where the notifier depends on it: ``{"ok": true, "result":
...}`` with Message objects that aiogram parses, and ``{"ok": false, "error_code": N,
"description": ...}`` errors for a wrong token, an unknown method, HTML that Telegram's parser
would refuse, texts and captions over the limits, and empty texts. Every call is recorded
(method, decoded parameters, uploaded bytes, arrival time, HTTP status), updates can be fed
to ``getUpdates`` long polls, and failures (429 with ``retry_after``, 5xx, dropped
connections) can be injected for the next calls of a method.

The module is also a pytest plugin: ``tests/conftest.py`` lists it in ``pytest_plugins`` so
the ``telegram`` fixture is available to every test.

Run as a program it is the Telegram container of the compose smoke run
(deploy/docker/docker-compose.ci.yml): ``python telegram_stand_in.py --host 0.0.0.0 --port
8081`` serves until stopped, and ``GET /_calls`` lists the calls it recorded as JSON.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import mimetypes
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

try:
    import pytest
except ImportError:  # served from the app image (the compose smoke run), which has no pytest
    pytest = None  # type: ignore[assignment]

TEST_TOKEN = "12345:FAKE-test-token-for-the-stand-in-not-real"  # never a real one

MESSAGE_LIMIT = 4096  # UTF-16 code units of the text after entity parsing
CAPTION_LIMIT = 1024
CALLBACK_TEXT_LIMIT = 200
UPDATES_LIMIT = 100  # the most updates one getUpdates answers
MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # Telegram's limit for bot uploads
FIRST_UPDATE_ID = 100_000
SUPERGROUP_ID_BELOW = -1_000_000_000_000  # supergroup and channel ids are -100xxxxxxxxxx
SHUTDOWN_TIMEOUT_S = 1.0  # long polls are woken on stop, so the server closes quickly
POLL_INTERVAL_S = 0.01  # how often wait_for re-reads the recorded calls
GARBLED_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n{}"  # not valid HTTP
DROPPED = 0  # the status recorded for a call whose connection was closed without an answer

# Tags Telegram's HTML parse mode accepts (the notifier's reports use b and code).
ALLOWED_TAGS = frozenset({
    "b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "code", "pre", "a",
    "tg-spoiler", "span", "blockquote",
})
NAMED_ENTITIES = frozenset({"lt", "gt", "amp", "quot"})  # the only named ones Telegram knows
_ENTITY = re.compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|[a-zA-Z]+);")
_TAG_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")
_ATTRIBUTE = re.compile(r"""\s*([a-zA-Z-]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")

# Parameters that are strings on the wire whatever they look like; every other value is
# decoded as JSON where it parses (aiogram JSON-encodes numbers, booleans and objects).
STRING_PARAMS = frozenset({
    "text", "caption", "parse_mode", "title", "performer", "callback_query_id",
    "inline_message_id", "url", "business_connection_id", "message_effect_id",
    "language_code", "description", "short_description", "name", "secret_token", "data",
    "query", "emoji", "file_name", "question", "explanation", "address", "first_name",
    "last_name", "vcard", "phone_number", "action", "custom_title",
})

DEFAULT_DESCRIPTIONS: dict[int, str] = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden: bot was blocked by the user",
    404: "Not Found",
    409: "Conflict: terminated by other getUpdates request",
    413: "Request Entity Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class ApiError(Exception):
    """An error answer: HTTP ``status`` with Telegram's ``description``."""

    def __init__(self, status: int, description: str,
                 parameters: dict[str, Any] | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters


def _bad_request(reason: str) -> ApiError:
    return ApiError(400, f"Bad Request: {reason}")


@dataclass(frozen=True)
class RecordedCall:
    """One API call as the stand-in received and answered it.

    ``params`` holds the form fields, JSON-decoded where aiogram sent JSON (numbers,
    booleans, ``reply_markup``); ``files`` maps a parameter (``photo``, ``audio``, ...) to
    the uploaded bytes and ``filenames`` to the uploaded file name. ``at`` is
    ``time.monotonic()`` on arrival; ``status`` is the HTTP status answered (``0`` for a
    connection dropped on purpose).
    """

    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    filenames: dict[str, str]
    at: float
    status: int

    @property
    def chat_id(self) -> Any:
        """The call's ``chat_id`` parameter, or ``None``."""
        return self.params.get("chat_id")


@dataclass
class _Injected:
    """A failure to answer with instead of handling the call."""

    status: int
    description: str
    retry_after: int | None = None
    body: str | None = None
    drop: bool = False
    garble: bool = False


@dataclass
class _Upload:
    data: bytes
    filename: str


@dataclass
class _State:
    """Everything the handlers share with the test thread; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list[RecordedCall] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    injected: dict[str, deque[_Injected]] = field(default_factory=dict)
    messages: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    chats: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_message_id: dict[int, int] = field(default_factory=dict)
    callback_ids: set[str] = field(default_factory=set)
    commands: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------- HTML


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode("utf-8"))


def _utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _check_attributes(name: str, raw: str) -> None:
    attributes: dict[str, str] = {}
    position = 0
    while position < len(raw):
        match = _ATTRIBUTE.match(raw, position)
        if match is None or match.end() == position:
            if raw[position:].strip():
                raise ValueError(f'Can\'t parse attributes of tag "{name}"')
            break
        value = next((group for group in match.groups()[1:] if group is not None), "")
        attributes[match.group(1).lower()] = value
        position = match.end()
    if name == "span" and attributes.get("class") != "tg-spoiler":
        raise ValueError('Tag "span" must have class "tg-spoiler"')


def parse_html(text: str) -> str:
    """The visible text of ``text`` in Telegram's HTML parse mode.

    Raises ``ValueError`` with a Telegram-style reason for HTML Telegram would refuse: an
    unsupported tag, an end tag without its start tag or the other way round, a ``<`` that
    opens no tag, or an ``&`` that is not one of the entities Telegram knows (numeric ones
    and ``&lt;``, ``&gt;``, ``&amp;``, ``&quot;``).
    """
    visible: list[str] = []
    stack: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "&":
            match = _ENTITY.match(text, i)
            if match is None or (match.group(1)[0] != "#"
                                 and match.group(1).lower() not in NAMED_ENTITIES):
                raise ValueError(f'Character "&" at byte offset {_byte_offset(text, i)} '
                                 "does not start a supported entity")
            visible.append(html.unescape(match.group(0)))
            i = match.end()
            continue
        if char != "<":
            visible.append(char)
            i += 1
            continue
        end = text.find(">", i)
        if end < 0:
            raise ValueError(f"Unclosed start tag at byte offset {_byte_offset(text, i)}")
        inner = text[i + 1:end]
        if inner.startswith("/"):
            name = inner[1:].strip().lower()
            if not stack:
                raise ValueError(f'Unexpected end tag "{name}" at byte offset '
                                 f"{_byte_offset(text, i)}")
            if stack[-1] != name:
                raise ValueError(f"Unmatched end tag at byte offset {_byte_offset(text, i)}, "
                                 f'expected "</{stack[-1]}>", found "</{name}>"')
            stack.pop()
        else:
            match = _TAG_NAME.match(inner)
            name = match.group(0).lower() if match else ""
            if name not in ALLOWED_TAGS:
                raise ValueError(f'Unsupported start tag "{name}" at byte offset '
                                 f"{_byte_offset(text, i)}")
            _check_attributes(name, inner[match.end():] if match else "")
            stack.append(name)
        i = end + 1
    if stack:
        raise ValueError(f'Can\'t find end tag corresponding to start tag "{stack[-1]}"')
    return "".join(visible)


def _visible(text: str, parse_mode: str | None) -> str:
    """``text`` as Telegram shows it; a 400 for HTML it would refuse."""
    if parse_mode is None or parse_mode == "":
        return text
    mode = parse_mode.lower()
    if mode == "html":
        try:
            return parse_html(text)
        except ValueError as exc:
            raise _bad_request(f"can't parse entities: {exc}") from exc
    if mode in ("markdown", "markdownv2"):
        return text  # the notifier only uses HTML; Markdown is passed through unchecked
    raise _bad_request("unsupported parse_mode")


# ---------------------------------------------------------------------------- media


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if marker in (0xC0, 0xC1, 0xC2):  # start of frame: height, then width
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + length
    return None


def _wav_duration(data: bytes) -> int:
    """Whole seconds of a PCM WAV file; ``0`` for anything else (the stand-in decodes no more)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    position, byte_rate = 12, 0
    while position + 8 <= len(data):
        chunk, size = data[position:position + 4], struct.unpack("<I", data[position + 4:
                                                                            position + 8])[0]
        if chunk == b"fmt " and size >= 12:
            byte_rate = struct.unpack("<I", data[position + 16:position + 20])[0]
        elif chunk == b"data" and byte_rate:
            return round(size / byte_rate)
        position += 8 + size + (size & 1)
    return 0


# ---------------------------------------------------------------------------- the server


class TelegramStandIn:
    """A Telegram Bot API stand-in for ``token``, served on a free port of 127.0.0.1."""

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.host, self.requested_port = host, port
        self.bot_id = int(token.split(":", 1)[0])
        self._state = _State()
        self._update_ids = itertools.count(FIRST_UPDATE_ID)
        self._callback_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._updated: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._port: int | None = None
        self._handlers: dict[str, Callable[[dict[str, Any], dict[str, _Upload]], Any]] = {
            "getme": self._get_me,
            "getupdates": self._get_updates,
            "deletewebhook": self._true,
            "setmycommands": self._set_my_commands,
            "sendmessage": self._send_message,
            "sendphoto": self._send_photo,
            "sendaudio": self._send_audio,
            "senddocument": self._send_document,
            "answercallbackquery": self._answer_callback_query,
            "editmessagetext": self._edit_message_text,
            "editmessagereplymarkup": self._edit_message_reply_markup,
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> TelegramStandIn:
        """Serve in a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("the stand-in is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="telegram-stand-in", daemon=True)
        self._thread.start()
        if not ready.wait(10.0) or failure:
            raise RuntimeError("the Telegram stand-in did not start") from (
                failure[0] if failure else None)
        return self

    def stop(self) -> None:
        """Stop serving (pending long polls answer at once) and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10.0)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10.0)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> TelegramStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, the base for ``TelegramAPIServer.from_base``."""
        if self._port is None:
            raise RuntimeError("the stand-in is not running")
        return f"http://127.0.0.1:{self._port}"

    async def _serve(self) -> None:
        self._updated = asyncio.Event()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_get("/_calls", self._calls_json)
        self._runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def _calls_json(self, request: web.Request) -> web.Response:
        """The recorded calls (method, status, parameters) as JSON, for a caller outside."""
        return web.json_response([
            {"method": call.method, "status": call.status, "at": call.at,
             "params": {key: value if isinstance(value, int | float | bool | None)
                        else str(value) for key, value in call.params.items()}}
            for call in self.calls()])

    async def _shutdown(self) -> None:
        assert self._stopping is not None and self._runner is not None
        self._stopping.set()
        await self._runner.cleanup()

    # ------------------------------------------------------------------ recording

    def calls(self, method: str | None = None, chat_id: int | None = None) -> list[RecordedCall]:
        """The recorded calls in order of arrival, optionally of one method and one chat."""
        with self._state.lock:
            recorded = list(self._state.calls)
        recorded.sort(key=lambda call: call.at)
        return [call for call in recorded
                if (method is None or call.method.lower() == method.lower())
                and (chat_id is None or call.chat_id == chat_id)]

    def _summary(self) -> str:
        lines = [f"{call.at:.3f} {call.method} {call.status} "
                 f"{ {k: str(v)[:60] for k, v in call.params.items()} }"
                 for call in self.calls()]
        return "\n".join(lines) or "(no calls)"

    def _poll(self, predicate: Callable[[list[RecordedCall]], Any], deadline: float,
              timeout_s: float) -> list[RecordedCall] | None:
        """The calls if ``predicate`` accepts them now; None to keep waiting; raises past
        ``deadline``."""
        recorded = self.calls()
        if predicate(recorded):
            return recorded
        if time.monotonic() >= deadline:
            raise AssertionError(f"no matching Telegram calls within {timeout_s} s; "
                                 f"recorded:\n{self._summary()}")
        return None

    def wait_for(self, predicate: Callable[[list[RecordedCall]], Any],
                 timeout_s: float = 10.0) -> list[RecordedCall]:
        """Block until ``predicate(calls)`` is truthy; the calls it accepted.

        Raises ``AssertionError`` listing every recorded call when ``timeout_s`` passes
        first. It sleeps the calling thread: inside an event loop use ``wait_for_async``.
        """
        deadline = time.monotonic() + timeout_s
        while (recorded := self._poll(predicate, deadline, timeout_s)) is None:
            time.sleep(POLL_INTERVAL_S)
        return recorded

    async def wait_for_async(self, predicate: Callable[[list[RecordedCall]], Any],
                             timeout_s: float = 10.0) -> list[RecordedCall]:
        """``wait_for`` for code running in an event loop: it yields to the loop meanwhile."""
        deadline = time.monotonic() + timeout_s
        while (recorded := self._poll(predicate, deadline, timeout_s)) is None:
            await asyncio.sleep(POLL_INTERVAL_S)
        return recorded

    def clear(self) -> None:
        """Forget the recorded calls (messages, updates and injected failures stay)."""
        with self._state.lock:
            self._state.calls.clear()

    # ------------------------------------------------------------------ feeding updates

    def _chat(self, chat_id: int, chat_type: str | None = None,
              username: str | None = None) -> dict[str, Any]:
        """The chat object for ``chat_id``, remembered from pushed updates; lock held."""
        known = self._state.chats.get(chat_id)
        if known is not None and chat_type is None:
            return known
        if chat_type is None:
            chat_type = ("private" if chat_id > 0
                         else "supergroup" if chat_id < SUPERGROUP_ID_BELOW else "group")
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = "Tester"
            if username:
                chat["username"] = username
        else:
            chat["title"] = f"Test {chat_type} {chat_id}"
        self._state.chats[chat_id] = chat
        return chat

    def _message_id(self, chat_id: int) -> int:
        """The next message id in ``chat_id`` (one sequence for the bot and the users)."""
        message_id = self._state.next_message_id.get(chat_id, 1)
        self._state.next_message_id[chat_id] = message_id + 1
        return message_id

    def _push(self, update: dict[str, Any]) -> None:
        with self._state.lock:
            self._state.updates.append(update)
        loop, updated = self._loop, self._updated
        if loop is not None and updated is not None:
            loop.call_soon_threadsafe(updated.set)

    def push_message(self, chat_id: int, text: str, user_id: int | None = None,
                     chat_type: str = "private", username: str = "tester",
                     media: str | None = None, edited_id: int | None = None) -> int:
        """Queue a user's text message for ``getUpdates``; returns its ``update_id``.

        A text starting with ``/`` carries a ``bot_command`` entity over its first word
        (``/lr``, ``/status@SmartTunerBot``), as Telegram sends it, so aiogram's ``Command``
        filter matches. With ``media`` (``"photo"`` or ``"document"``) the message is that
        media and ``text`` is its caption (with ``caption_entities``), as Telegram sends a
        captioned upload. With ``edited_id`` the update is an ``edited_message``: the user's
        message ``edited_id`` now reads ``text``.
        """
        user = {"id": user_id if user_id is not None else abs(chat_id), "is_bot": False,
                "first_name": "Tester", "username": username, "language_code": "en"}
        with self._state.lock:
            message: dict[str, Any] = {
                "message_id": edited_id if edited_id is not None
                else self._message_id(chat_id),
                "from": user,
                "chat": self._chat(chat_id, chat_type, username),
                "date": int(time.time()),
            }
            entities_key = "entities"
            if media is None:
                message["text"] = text
            else:
                message.update(self._media(media))
                message["caption"] = text
                entities_key = "caption_entities"
            if text.startswith("/"):
                command = text.split(maxsplit=1)[0]
                message[entities_key] = [{"type": "bot_command", "offset": 0,
                                          "length": _utf16_length(command)}]
            if edited_id is not None:
                message["edit_date"] = int(time.time())
            self._state.messages[(chat_id, message["message_id"])] = message
        update_id = next(self._update_ids)
        kind = "message" if edited_id is None else "edited_message"
        self._push({"update_id": update_id, kind: message})
        return update_id

    @staticmethod
    def _media(kind: str) -> dict[str, Any]:
        """The media part of a user's upload of ``kind`` (``photo`` or ``document``)."""
        ids = {"file_id": f"{kind}-user", "file_unique_id": f"u-{kind}-user"}
        if kind == "photo":
            return {"photo": [{**ids, "width": 90, "height": 90, "file_size": 1000}]}
        if kind == "document":
            return {"document": {**ids, "file_name": "notes.txt", "mime_type": "text/plain",
                                 "file_size": 1000}}
        raise ValueError(f"no such media kind: {kind}")

    def push_callback(self, chat_id: int, user_id: int, data: str, message_id: int) -> int:
        """Queue a press of an inline button with ``data`` under the bot's ``message_id``.

        The update's ``message`` is the message the bot sent with that id (a minimal one
        if the stand-in never saw it); returns the ``update_id``. The query id is
        remembered so that ``answerCallbackQuery`` accepts it.
        """
        query_id = f"cbq-{next(self._callback_ids)}"
        with self._state.lock:
            message = self._state.messages.get((chat_id, message_id)) or {
                "message_id": message_id, "from": self._bot_user(),
                "chat": self._chat(chat_id), "date": int(time.time()), "text": "…"}
            self._state.callback_ids.add(query_id)
        update_id = next(self._update_ids)
        self._push({"update_id": update_id, "callback_query": {
            "id": query_id,
            "from": {"id": user_id, "is_bot": False, "first_name": "Tester",
                     "username": "tester"},
            "message": message,
            "chat_instance": f"instance-{chat_id}",
            "data": data,
        }})
        return update_id

    # ------------------------------------------------------------------ failure injection

    def _inject(self, method: str, failures: list[_Injected]) -> None:
        with self._state.lock:
            self._state.injected.setdefault(method.lower(), deque()).extend(failures)

    def fail_next(self, method: str, status: int, times: int = 1,
                  retry_after: int | None = None, description: str | None = None,
                  body: str | None = None) -> None:
        """Answer the next ``times`` calls of ``method`` with an error instead.

        A 429 carries ``parameters.retry_after`` (``retry_after``, 1 s when not given, as
        Telegram always sends one); ``description`` defaults to Telegram's wording for the
        status. ``body``, when given, is sent as is with ``status`` instead of Telegram's
        JSON (e.g. the HTML page a proxy answers a 502 with, or with status 200 an answer
        aiogram cannot read). Injected calls are not handled: nothing is sent or stored.
        """
        if status == 429 and retry_after is None:
            retry_after = 1
        if description is None:
            description = (f"Too Many Requests: retry after {retry_after}" if status == 429
                           else DEFAULT_DESCRIPTIONS.get(status, f"Error {status}"))
        self._inject(method, [_Injected(status, description, retry_after, body)
                              for _ in range(times)])

    def drop_next(self, method: str, times: int = 1) -> None:
        """Close the connection of the next ``times`` calls of ``method`` without answering."""
        self._inject(method, [_Injected(DROPPED, "", drop=True) for _ in range(times)])

    def garble_next(self, method: str, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with a malformed HTTP response (a
        broken proxy in front of Telegram), which aiohttp refuses to parse."""
        self._inject(method, [_Injected(DROPPED, "", garble=True) for _ in range(times)])

    # ------------------------------------------------------------------ HTTP

    async def _read(self, request: web.Request) -> tuple[dict[str, str], dict[str, _Upload]]:
        fields: dict[str, str] = dict(request.query)
        uploads: dict[str, _Upload] = {}
        if request.method != "POST":
            return fields, uploads
        if request.content_type == "application/json":
            body = await request.json()
            fields.update({key: value if isinstance(value, str) else json.dumps(value)
                           for key, value in body.items()})
            return fields, uploads
        for key, value in (await request.post()).items():
            if isinstance(value, web.FileField):
                uploads[key] = _Upload(value.file.read(), value.filename)
            else:
                fields[key] = str(value)
        return fields, uploads

    @staticmethod
    def _decode(fields: dict[str, str]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key, value in fields.items():
            if key in STRING_PARAMS:
                params[key] = value
                continue
            try:
                params[key] = json.loads(value)
            except ValueError:
                params[key] = value
        return params

    @staticmethod
    def _attach(params: dict[str, Any], uploads: dict[str, _Upload]) -> dict[str, _Upload]:
        """Uploads by the parameter that names them (``photo="attach://<part>"``)."""
        attached: dict[str, _Upload] = {}
        for key, value in params.items():
            if isinstance(value, str) and value.startswith("attach://"):
                upload = uploads.get(value.removeprefix("attach://"))
                if upload is not None:
                    attached[key] = upload
        for key, upload in uploads.items():  # a file posted directly under its parameter
            if key not in attached and not any(
                    value == f"attach://{key}" for value in params.values()):
                attached[key] = upload
        return attached

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        at = time.monotonic()
        method_name = request.match_info["method"]
        fields, uploads = await self._read(request)
        params = self._decode(fields)
        files = self._attach(params, uploads)
        status, payload, raw = 200, None, None
        injected: _Injected | None = None
        if request.match_info["token"] != self.token:
            status, payload = 401, {"ok": False, "error_code": 401,
                                    "description": "Unauthorized"}
        else:
            with self._state.lock:
                queue = self._state.injected.get(method_name.lower())
                if queue:
                    injected = queue.popleft()
            handler = self._handlers.get(method_name.lower())
            if injected is not None:
                status, raw = injected.status, injected.body
                payload = {"ok": False, "error_code": injected.status,
                           "description": injected.description}
                if injected.retry_after is not None:
                    payload["parameters"] = {"retry_after": injected.retry_after}
            elif handler is None:
                status, payload = 404, {"ok": False, "error_code": 404,
                                        "description": "Not Found: method not found"}
            else:
                try:
                    result = handler(params, files)
                    if asyncio.iscoroutine(result):
                        result = await result
                    payload = {"ok": True, "result": result}
                except ApiError as exc:
                    status = exc.status
                    payload = {"ok": False, "error_code": exc.status,
                               "description": exc.description}
                    if exc.parameters:
                        payload["parameters"] = exc.parameters
                except (ValueError, TypeError, AttributeError) as exc:  # malformed parameters
                    status = 400
                    payload = {"ok": False, "error_code": 400,
                               "description": f"Bad Request: {exc}"}
        record = RecordedCall(
            method=method_name, params=params,
            files={key: upload.data for key, upload in files.items()},
            filenames={key: upload.filename for key, upload in files.items()},
            at=at, status=status)
        with self._state.lock:
            self._state.calls.append(record)
        if injected is not None and injected.drop:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client: the socket is closed
        if injected is not None and injected.garble:
            if request.transport is not None:
                request.transport.write(GARBLED_RESPONSE)
                request.transport.close()
            return web.Response(status=500)  # never reaches the client: the socket is closed
        if raw is not None:
            return web.Response(status=status, text=raw, content_type="text/html")
        return web.json_response(payload, status=status)

    # ------------------------------------------------------------------ methods

    def _bot_user(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": "Smart Tuner",
                "username": "SmartTunerBot"}

    def _get_me(self, params: dict[str, Any], files: dict[str, _Upload]) -> dict[str, Any]:
        return {**self._bot_user(), "can_join_groups": True,
                "can_read_all_group_messages": False, "supports_inline_queries": False}

    def _true(self, params: dict[str, Any], files: dict[str, _Upload]) -> bool:
        return True

    async def _get_updates(self, params: dict[str, Any],
                           files: dict[str, _Upload]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        limit = min(max(int(params.get("limit") or UPDATES_LIMIT), 1), UPDATES_LIMIT)
        timeout = max(float(params.get("timeout") or 0), 0.0)
        assert self._updated is not None and self._stopping is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Cleared before reading the queue: a push after the read sets it again.
            self._updated.clear()
            with self._state.lock:
                updates = self._state.updates
                if offset < 0:  # the last -offset updates; all earlier ones are forgotten
                    del updates[:max(len(updates) + offset, 0)]
                elif offset > 0:  # confirming: everything before offset is forgotten
                    updates[:] = [u for u in updates if u["update_id"] >= offset]
                if updates:
                    return [dict(u) for u in updates[:limit]]
            remaining = deadline - loop.time()
            if remaining <= 0 or self._stopping.is_set():
                return []
            waiters = [asyncio.ensure_future(self._updated.wait()),
                       asyncio.ensure_future(self._stopping.wait())]
            try:
                await asyncio.wait(waiters, timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if offset < 0:
                offset = 0  # the trimming is done; later rounds only wait

    def _set_my_commands(self, params: dict[str, Any], files: dict[str, _Upload]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _bad_request("can't parse commands JSON object")
        for command in commands:
            name = str(command.get("command", ""))
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad_request("command description is empty or too long")
        with self._state.lock:
            self._state.commands = list(commands)
        return True

    def _chat_id(self, params: dict[str, Any]) -> int:
        chat_id = params.get("chat_id")
        if chat_id is None or chat_id == "":
            raise _bad_request("chat_id is empty")
        if not isinstance(chat_id, int) or isinstance(chat_id, bool):
            raise _bad_request("chat not found")
        return chat_id

    @staticmethod
    def _markup(params: dict[str, Any]) -> dict[str, Any] | None:
        markup = params.get("reply_markup")
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise _bad_request("can't parse reply keyboard markup JSON object")
        return markup

    def _new_message(self, chat_id: int, content: dict[str, Any],
                     markup: dict[str, Any] | None) -> dict[str, Any]:
        """A message the bot sent to ``chat_id``, remembered for later edits."""
        with self._state.lock:
            message = {"message_id": self._message_id(chat_id), "from": self._bot_user(),
                       "chat": self._chat(chat_id), "date": int(time.time()), **content}
            if markup is not None and markup.get("inline_keyboard"):
                message["reply_markup"] = markup
            self._state.messages[(chat_id, message["message_id"])] = message
        return dict(message)

    def _text(self, params: dict[str, Any]) -> str:
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _bad_request("message text is empty")
        visible = _visible(text, params.get("parse_mode"))
        if not visible.strip():
            raise _bad_request("message text is empty")
        if _utf16_length(visible) > MESSAGE_LIMIT:
            raise _bad_request("message is too long")
        return visible

    def _caption(self, params: dict[str, Any]) -> dict[str, Any]:
        caption = params.get("caption")
        if not caption:
            return {}
        visible = _visible(str(caption), params.get("parse_mode"))
        if _utf16_length(visible) > CAPTION_LIMIT:
            raise _bad_request("message caption is too long")
        return {"caption": visible} if visible.strip() else {}

    def _send_message(self, params: dict[str, Any],
                      files: dict[str, _Upload]) -> dict[str, Any]:
        chat_id = self._chat_id(params)
        text = self._text(params)
        return self._new_message(chat_id, {"text": text}, self._markup(params))

    def _upload(self, params: dict[str, Any], files: dict[str, _Upload],
                name: str) -> _Upload:
        upload = files.get(name)
        if upload is None:
            raise _bad_request(f"there is no {name} in the request")
        if not upload.data:
            raise _bad_request("file must be non-empty")
        return upload

    @staticmethod
    def _file_ids(kind: str, data: bytes, suffix: str = "") -> dict[str, Any]:
        digest = f"{abs(hash((kind, data))) % 10**12:012d}{suffix}"
        return {"file_id": f"{kind}-{digest}", "file_unique_id": f"u{digest}"}

    def _send_photo(self, params: dict[str, Any],
                    files: dict[str, _Upload]) -> dict[str, Any]:
        chat_id = self._chat_id(params)
        upload = self._upload(params, files, "photo")
        size = _png_size(upload.data) or _jpeg_size(upload.data)
        if size is None:
            raise _bad_request("IMAGE_PROCESS_FAILED")
        caption = self._caption(params)
        width, height = size
        longest = max(width, height, 1)
        # Telegram answers with the thumbnails it made (longest side 90, 320, 800, 1280)
        # and the largest size last.
        sizes = []
        for bound in (90, 320, 800, 1280):
            if bound < longest:
                scale = bound / longest
                sizes.append({**self._file_ids("photo", upload.data, f"-{bound}"),
                              "width": max(round(width * scale), 1),
                              "height": max(round(height * scale), 1),
                              "file_size": max(len(upload.data) * bound // longest, 1)})
        sizes.append({**self._file_ids("photo", upload.data), "width": width,
                      "height": height, "file_size": len(upload.data)})
        return self._new_message(chat_id, {"photo": sizes, **caption}, self._markup(params))

    def _send_audio(self, params: dict[str, Any],
                    files: dict[str, _Upload]) -> dict[str, Any]:
        chat_id = self._chat_id(params)
        upload = self._upload(params, files, "audio")
        caption = self._caption(params)
        audio = {**self._file_ids("audio", upload.data),
                 "duration": int(params.get("duration") or _wav_duration(upload.data)),
                 "file_name": upload.filename,
                 "mime_type": mimetypes.guess_type(upload.filename)[0]
                 or "application/octet-stream",
                 "file_size": len(upload.data)}
        for key in ("title", "performer"):
            if params.get(key):
                audio[key] = params[key]
        return self._new_message(chat_id, {"audio": audio, **caption}, self._markup(params))

    def _send_document(self, params: dict[str, Any],
                       files: dict[str, _Upload]) -> dict[str, Any]:
        chat_id = self._chat_id(params)
        upload = self._upload(params, files, "document")
        caption = self._caption(params)
        document = {**self._file_ids("document", upload.data), "file_name": upload.filename,
                    "mime_type": mimetypes.guess_type(upload.filename)[0]
                    or "application/octet-stream",
                    "file_size": len(upload.data)}
        return self._new_message(chat_id, {"document": document, **caption},
                                 self._markup(params))

    def _answer_callback_query(self, params: dict[str, Any],
                               files: dict[str, _Upload]) -> bool:
        with self._state.lock:
            known = params.get("callback_query_id") in self._state.callback_ids
        if not known:
            raise _bad_request("query is too old and response timeout expired or query ID "
                               "is invalid")
        if _utf16_length(str(params.get("text") or "")) > CALLBACK_TEXT_LIMIT:
            raise _bad_request("MESSAGE_TOO_LONG")
        return True

    def _edited(self, params: dict[str, Any]) -> tuple[int, int, dict[str, Any]] | None:
        """The bot's message an edit names, or ``None`` for an inline message."""
        if params.get("inline_message_id"):
            return None
        chat_id = self._chat_id(params)
        message_id = params.get("message_id")
        with self._state.lock:
            message = self._state.messages.get((chat_id, message_id))  # type: ignore[arg-type]
        if message is None or message["from"].get("id") != self.bot_id:
            raise _bad_request("message to edit not found")
        return chat_id, int(message_id), message  # type: ignore[arg-type]

    def _store_edit(self, chat_id: int, message_id: int, message: dict[str, Any],
                    changes: dict[str, Any], markup: dict[str, Any] | None) -> dict[str, Any]:
        new_markup = markup if markup and markup.get("inline_keyboard") else None
        if all(message.get(key) == value for key, value in changes.items()) \
                and message.get("reply_markup") == new_markup:
            raise _bad_request("message is not modified: specified new message content and "
                               "reply markup are exactly the same as a current content and "
                               "reply markup of the message")
        updated = {**message, **changes, "edit_date": int(time.time())}
        updated.pop("reply_markup", None)
        if new_markup is not None:
            updated["reply_markup"] = new_markup
        with self._state.lock:
            self._state.messages[(chat_id, message_id)] = updated
        return dict(updated)

    def _edit_message_text(self, params: dict[str, Any],
                           files: dict[str, _Upload]) -> dict[str, Any] | bool:
        text = self._text(params)
        edited = self._edited(params)
        if edited is None:
            return True
        chat_id, message_id, message = edited
        if "text" not in message:
            raise _bad_request("there is no text in the message to edit")
        return self._store_edit(chat_id, message_id, message, {"text": text},
                                self._markup(params))

    def _edit_message_reply_markup(self, params: dict[str, Any],
                                   files: dict[str, _Upload]) -> dict[str, Any] | bool:
        edited = self._edited(params)
        if edited is None:
            return True
        chat_id, message_id, message = edited
        return self._store_edit(chat_id, message_id, message, {}, self._markup(params))


def telegram() -> Iterator[TelegramStandIn]:
    """A started Telegram stand-in for ``TEST_TOKEN``; stopped after the test."""
    with TelegramStandIn(TEST_TOKEN) as standin:
        yield standin


if pytest is not None:
    telegram = pytest.fixture(telegram)


def main() -> None:
    """Serve the stand-in until SIGTERM or SIGINT (the compose smoke run's container)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token", default=TEST_TOKEN)
    options = parser.parse_args()
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    with TelegramStandIn(options.token, options.host, options.port) as standin:
        print(f"Telegram stand-in on {options.host}:{standin._port}", flush=True)
        stopped.wait()


if __name__ == "__main__":
    main()
