"""A run's Redis streams as the people-facing services see them: read state, send commands.

The control API and the Telegram bot both answer "what is the run doing" and both let a
person correct it; they do it through this one class, so a command from the bot is written,
and its ack awaited, exactly as one from the API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, Field

from services.core.bus import entry_order
from services.core.indicators import Verdict
from services.core.schemas import (
    SCHEMAS,
    Ack,
    ActionRecord,
    Approval,
    Command,
    Event,
    Message,
    MessageError,
    MetricsMessage,
    ProbeReport,
    VerdictMessage,
    decode,
    encode,
    probe_report,
)
from services.core.streams import (
    RUNS_KEY,
    Stream,
    alignment_png_key,
    approval_token_key,
    maxlen_for,
    stream_key,
    validate_run_id,
)

log = logging.getLogger(__name__)

ACK_BLOCK_MS = 500  # one blocking read of the acks stream; below any client socket timeout
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACTION_SCAN = 1000  # action records read to find the latest stage of the last N actions
PROBES_SCAN = 200  # events read back to find the newest probes event
APPROVAL_TOKEN_CHARS = 16  # hex digits of an approval button's token (fits callback data)
_APPROVAL_TOKEN = re.compile(rf"[0-9a-f]{{{APPROVAL_TOKEN_CHARS}}}")  # fullmatch: no "\n"

M = TypeVar("M", bound=Message)
_STREAM_OF: dict[type[Message], Stream] = {schema: stream for stream, schema in SCHEMAS.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RunSummary(BaseModel):
    """One known run, with where it is."""

    run_id: str
    last_step: int | None = Field(description="step of the newest metrics message, if any")
    last_event: Event | None = Field(description="the newest lifecycle or health event")


class StreamCounts(BaseModel):
    """Entries currently held in each of a run's streams (they are capped, see streams.py)."""

    metrics: int
    attention: int
    diagnostics: int
    commands: int
    acks: int
    actions: int
    events: int
    verdict: int


class RunStore:
    """Reads a run's streams and writes its commands; the only Redis access of its callers."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def ping(self) -> float:
        """Round trip of a PING in milliseconds; raises redis.ConnectionError if down."""
        started = time.perf_counter()
        self.client.ping()
        return (time.perf_counter() - started) * 1000

    def run_ids(self) -> list[str]:
        """The ids in the runs set that are valid run ids, sorted."""
        ids = []
        for member in self.client.smembers(RUNS_KEY):
            run_id = _text(member)
            try:
                ids.append(validate_run_id(run_id))
            except ValueError:
                log.warning("ignoring invalid run id %r in %s", run_id, RUNS_KEY)
        return sorted(ids)

    def exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is in the runs set (every publisher adds its run there)."""
        return bool(self.client.sismember(RUNS_KEY, run_id))

    @staticmethod
    def _decode(entries: list[Any], schema: type[M]) -> list[M]:
        """Parse stream entries, skipping (and logging) any that is not a valid message."""
        messages = []
        for entry_id, fields in entries:
            try:
                messages.append(decode(fields, schema))
            except MessageError as error:
                log.warning("skipping %s entry %s: %s", schema.__name__, _text(entry_id),
                            error.reason)
        return messages  # type: ignore[return-value]  # decode returns the schema's type

    def recent(self, run_id: str, schema: type[M], limit: int) -> list[M]:
        """The newest ``limit`` messages of the stream carrying ``schema``, newest last."""
        key = stream_key(run_id, _STREAM_OF[schema])
        return self._decode(self.client.xrevrange(key, count=limit), schema)[::-1]

    def newest_entry(self, run_id: str, stream: Stream) -> tuple[str, dict[Any, Any]] | None:
        """The newest entry of one of the run's streams, undecoded: (entry id, fields)."""
        newest = self.client.xrevrange(stream_key(run_id, stream), count=1)
        return (_text(newest[0][0]), newest[0][1]) if newest else None

    def latest(self, run_id: str, schema: type[M]) -> M | None:
        """The newest message of the stream carrying ``schema``."""
        newest = self.recent(run_id, schema, 1)
        return newest[0] if newest else None

    def _newest_entries(self) -> list[tuple[str, list[Any], list[Any]]]:
        """Each known run with its newest metrics entry and newest event entry (raw), in one
        round trip."""
        run_ids = self.run_ids()
        pipe = self.client.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.xrevrange(stream_key(run_id, Stream.METRICS), count=1)
            pipe.xrevrange(stream_key(run_id, Stream.EVENTS), count=1)
        replies = pipe.execute()
        return [(run_id, replies[2 * index], replies[2 * index + 1])
                for index, run_id in enumerate(run_ids)]

    def summaries(self) -> list[RunSummary]:
        """Every known run with its last step and last event, in one round trip."""
        summaries = []
        for run_id, metrics_entries, event_entries in self._newest_entries():
            metrics = self._decode(metrics_entries, MetricsMessage)
            events = self._decode(event_entries, Event)
            summaries.append(RunSummary(run_id=run_id,
                                        last_step=metrics[0].step if metrics else None,
                                        last_event=events[0] if events else None))
        return summaries

    def most_recent_run(self) -> str | None:
        """The run whose newest metrics or event entry is the newest of all runs, if any.

        Stream entry ids start with the writer's Redis time in milliseconds, so they order
        runs by activity without trusting any client's clock.
        """
        best: tuple[tuple[int, int], str] | None = None
        for run_id, *newest in self._newest_entries():
            for reply in newest:
                if reply:
                    key = entry_order(_text(reply[0][0]))
                    if best is None or key > best[0]:
                        best = (key, run_id)
        return None if best is None else best[1]

    def counts(self, run_id: str) -> StreamCounts:
        """XLEN of each of the run's streams."""
        # The fields name the streams counted (the approvals stream is not one of them, so
        # the API's answer keeps its shape).
        streams = [Stream(name) for name in StreamCounts.model_fields]
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream_key(run_id, stream))
        lengths = pipe.execute()
        return StreamCounts(**{stream.value: n for stream, n in zip(streams, lengths,
                                                                      strict=True)})

    def latest_actions(self, run_id: str, limit: int) -> list[ActionRecord]:
        """The newest stage of each of the last ``limit`` tuner actions, oldest first.

        Every action is written once per stage (issued, acked, measured); a person wants
        each decision once, as far as it has got.
        """
        newest: dict[str, ActionRecord] = {}
        for record in reversed(self.recent(run_id, ActionRecord, ACTION_SCAN)):
            if record.action_id not in newest:
                newest[record.action_id] = record
                if len(newest) == limit:
                    break
        return sorted(newest.values(), key=lambda record: record.ts)

    def latest_action(self, run_id: str, action_id: str) -> ActionRecord | None:
        """The newest record of one action (its current stage), or None if not among the
        last ``ACTION_SCAN`` records."""
        for record in reversed(self.recent(run_id, ActionRecord, ACTION_SCAN)):
            if record.action_id == action_id:
                return record
        return None

    def approval_token(self, run_id: str, action_id: str, ttl_s: float) -> str:
        """A short token standing for (run, action), kept ``ttl_s`` seconds; the same pair
        always gets the same token, so a redelivered proposal does not make a new one.

        Buttons carry the token, never the ids themselves: callback data is 64 bytes at most
        and comes back from the client, so it is looked up, not trusted.
        """
        digest = hashlib.sha256(f"{validate_run_id(run_id)}|{action_id}".encode())
        token = digest.hexdigest()[:APPROVAL_TOKEN_CHARS]
        self.client.set(approval_token_key(token),
                        json.dumps({"run_id": run_id, "action_id": action_id}),
                        ex=max(1, int(ttl_s)))
        return token

    def approval_target(self, token: str) -> tuple[str, str] | None:
        """The (run id, action id) a token stands for; None when malformed or expired."""
        if not _APPROVAL_TOKEN.fullmatch(token):
            return None
        raw = self.client.get(approval_token_key(token))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return validate_run_id(str(data["run_id"])), str(data["action_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("approval token %s holds %r; ignoring it", token, raw)
            return None

    def answer(self, approval: Approval) -> str:
        """XADD a person's answer to a proposal to its run's approvals stream (the tuner
        reads it there); returns the entry id."""
        key = stream_key(approval.run_id, Stream.APPROVALS)
        return _text(self.client.xadd(key, encode(approval), maxlen=maxlen_for(key),
                                      approximate=True))

    def latest_probes(self, run_id: str) -> ProbeReport | None:
        """The newest ``probes`` event's report: how the newest probed checkpoint speaks."""
        for event in reversed(self.recent(run_id, Event, PROBES_SCAN)):
            if event.event == "probes":
                return probe_report(event)
        return None

    def latest_verdict(self, run_id: str) -> Verdict | None:
        """The trainer's newest verdict on the success indicators (None before the first
        evaluation). Every surface shows this one; none re-derives it from metrics."""
        message = self.latest(run_id, VerdictMessage)
        return None if message is None else message.verdict

    def restarts(self, run_id: str) -> int:
        """Restarts of the run, as its newest ``run_started`` event reports them (0 if none)."""
        for event in reversed(self.recent(run_id, Event, 200)):
            if event.event == "run_started":
                value = event.data.get("restarts", 0)
                return value if isinstance(value, int) and value >= 0 else 0
        return 0

    def last_id(self, run_id: str, stream: Stream) -> str:
        """Id of the newest entry of a stream, ``0-0`` when empty: where to read on from."""
        newest = self.client.xrevrange(stream_key(run_id, stream), count=1)
        return _text(newest[0][0]) if newest else "0-0"

    def publish(self, command: Command) -> str:
        """XADD ``command`` to its run's commands stream; returns the entry id."""
        key = stream_key(command.run_id, Stream.COMMANDS)
        return _text(self.client.xadd(key, encode(command), maxlen=maxlen_for(key),
                                      approximate=True))

    def wait_for_ack(self, run_id: str, command_id: str, after_id: str,
                     timeout_s: float) -> Ack | None:
        """The ack of ``command_id`` written after ``after_id``, or None after ``timeout_s``."""
        key = stream_key(run_id, Stream.ACKS)
        deadline = time.monotonic() + timeout_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            reply = self.client.xread({key: after_id}, count=100,
                                      block=min(ACK_BLOCK_MS, left_ms))
            for _, entries in reply or []:
                after_id = _text(entries[-1][0])
                for ack in self._decode(entries, Ack):
                    if ack.command_id == command_id:
                        return ack
        return None

    def submit(self, command: Command, wait_s: float = 0.0) -> tuple[str, Ack | None]:
        """Write ``command`` and, with ``wait_s``, wait that long for the trainer's ack.

        Returns the commands-stream entry id and the ack (None when not awaited or late).
        The caller has validated the command (schema and ``bounds.check_command``).
        """
        after_id = self.last_id(command.run_id, Stream.ACKS) if wait_s else "0-0"
        stream_id = self.publish(command)
        ack = (self.wait_for_ack(command.run_id, command.command_id, after_id, wait_s)
               if wait_s else None)
        return stream_id, ack

    def stored_png(self, run_id: str) -> bytes | None:
        """The alignment PNG stored by the diagnostics worker, if there is a valid one."""
        data = self.client.get(alignment_png_key(run_id))
        if data is None:
            return None
        if not data.startswith(PNG_SIGNATURE):
            log.warning("%s does not hold a PNG; ignoring it", alignment_png_key(run_id))
            return None
        return data
