"""Versioned message schemas for every stream of the bus (services/core/streams.py).

Every message carries ``v`` (the schema version) and ``run_id``. On the wire a message is
one stream entry with a single field ``data`` holding its JSON (NaN and infinities are
written as JSON5-style constants, because a non-finite gradient norm is a fact worth
sending). A message that does not parse, has an unknown version or an unknown kind is never
acted on: the consumer moves it to the dead-letter stream with the reason.
"""

from __future__ import annotations

import base64
import time
import uuid
import zlib
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.core.indicators import Verdict
from services.core.streams import RUN_ID_PATTERN, Stream

SCHEMA_VERSION = 1
WIRE_FIELD = "data"

# Attention snapshots: a few samples of at most this many cells each. The bound protects
# every consumer from a hostile or broken producer (and from decompression bombs).
MAX_ATTENTION_CELLS = 2_000_000
MAX_SNAPSHOT_SAMPLES = 16
ZLIB_ENCODING = "f16-zlib-b64"
RAW_ENCODING = "f16-b64"
# Diffuse attention (early training) barely compresses and inflates slower than it copies:
# below this saving the matrix is sent uncompressed.
MIN_COMPRESSION_SAVING = 0.25

RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN)]
FiniteOrNot = float  # pydantic floats accept nan/inf; named for readers of the schemas


class MessageError(ValueError):
    """A stream entry that is not a valid message; ``reason`` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Message(BaseModel):
    """Fields common to every message."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    kind: str
    run_id: RunId
    ts: float = Field(default_factory=time.time, description="unix time of creation")


class MetricsMessage(Message):
    """One optimizer step of the trainer."""

    kind: Literal["metrics"] = "metrics"
    step: int = Field(ge=0)
    loss: FiniteOrNot = Field(description="what is back-propagated: mel + postnet mel + gate "
                              "+ guided attention weight x guided attention")
    mel: FiniteOrNot
    mel_postnet: FiniteOrNot
    gate: FiniteOrNot
    guided_attention: FiniteOrNot
    objective: FiniteOrNot = Field(description="mel + postnet mel + gate: the model's loss "
                                   "without the auxiliary attention term, the one held to "
                                   "the plan's 'loss < 1' (a command to the guided attention "
                                   "weight cannot move it)")
    grad_norm: FiniteOrNot = Field(description="global L2 norm before clipping, unscaled")
    lr: float = Field(ge=0)
    guided_attention_weight: float = Field(ge=0)
    clip_threshold: float = Field(gt=0)
    step_seconds: float = Field(ge=0)
    finite: bool
    skipped_steps: int = Field(ge=0)
    # Optional: trainers before the gate knob existed did not send it.
    gate_positive_weight: float | None = Field(default=None, gt=0)
    # Optional: trainers before the spike guard existed did not send these.
    spike_guard: float | None = Field(default=None, ge=0, description="the spike guard's "
                                      "factor (0: off): a step whose pre-clip norm exceeds "
                                      "it x the recent median is not applied")
    guarded: bool | None = Field(default=None, description="this step's gradients were "
                                 "finite but the spike guard withheld the update")
    guarded_steps: int | None = Field(default=None, ge=0, description="steps withheld by "
                                      "the spike guard so far in this run")


class AttentionSample(BaseModel):
    """One utterance's attention matrix [decoder steps, tokens], float16, base64.

    Compressed with zlib when that saves at least a quarter (a sharp, trained alignment is
    mostly zeros and shrinks ~14x); sent raw otherwise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, int]
    input_length: int = Field(ge=1)
    output_length: int = Field(ge=1)
    encoding: Literal["f16-zlib-b64", "f16-b64"] = ZLIB_ENCODING
    data: str

    @model_validator(mode="after")
    def _check(self) -> AttentionSample:
        rows, cols = self.shape
        if rows < 1 or cols < 1 or rows * cols > MAX_ATTENTION_CELLS:
            raise ValueError(f"attention shape {self.shape} out of bounds "
                             f"(1..{MAX_ATTENTION_CELLS} cells)")
        if self.output_length > rows or self.input_length > cols:
            raise ValueError(f"lengths ({self.output_length}, {self.input_length}) exceed "
                             f"shape {self.shape}")
        return self

    @classmethod
    def from_array(cls, attention: np.ndarray, input_length: int, output_length: int
                   ) -> AttentionSample:
        """Encode a [T, N] matrix."""
        matrix = np.ascontiguousarray(attention, dtype=np.float16)
        raw = matrix.tobytes()
        compressed = zlib.compress(raw, level=1)
        encoding = ZLIB_ENCODING
        if len(compressed) > (1 - MIN_COMPRESSION_SAVING) * len(raw):
            compressed, encoding = raw, RAW_ENCODING
        return cls(shape=matrix.shape, input_length=input_length, output_length=output_length,
                   encoding=encoding, data=base64.b64encode(compressed).decode("ascii"))

    def to_array(self) -> np.ndarray:
        """Decode to float32 [T, N]; raises MessageError on bad base64, zlib or size."""
        return self.to_float16().astype(np.float32)

    def to_float16(self) -> np.ndarray:
        """Decode to a read-only float16 [T, N] view of the payload (no conversion copy)."""
        expected = self.shape[0] * self.shape[1] * 2
        try:
            payload = base64.b64decode(self.data, validate=True)
            if self.encoding == RAW_ENCODING:
                raw, tail = payload, b""
            else:
                decompressor = zlib.decompressobj()
                raw = decompressor.decompress(payload, expected + 1)
                tail = decompressor.unconsumed_tail
        except (ValueError, zlib.error) as error:
            raise MessageError(f"attention payload undecodable: {error}") from error
        if len(raw) != expected or tail:
            raise MessageError(f"attention payload has {len(raw)} bytes, shape {self.shape} "
                               f"needs {expected}")
        return np.frombuffer(raw, dtype=np.float16).reshape(self.shape)


class AttentionSnapshot(Message):
    """A few validation samples' attention at one step, for the diagnostics worker."""

    kind: Literal["attention"] = "attention"
    snapshot_id: str = Field(min_length=1, max_length=128)
    step: int = Field(ge=0)
    samples: list[AttentionSample] = Field(min_length=1, max_length=MAX_SNAPSHOT_SAMPLES)


class AlignmentScores(BaseModel):
    """The six scores of services.diagnostics.metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    diagonality: float = Field(ge=0, le=1)
    monotonicity: float = Field(ge=0, le=1)
    focus: float = Field(ge=0, le=1)
    coverage: float = Field(ge=0, le=1)
    entropy: float = Field(ge=0, le=1)
    quality: float = Field(ge=0, le=100)


class AlignmentReport(Message):
    """Scores of one snapshot: batch means and per sample."""

    kind: Literal["diagnostics"] = "diagnostics"
    snapshot_id: str = Field(min_length=1, max_length=128)
    step: int = Field(ge=0)
    scores: AlignmentScores
    per_sample: list[AlignmentScores]
    worker: str = ""


class ProbeFailure(BaseModel):
    """One inference probe that did not stop at a sane length."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    probe_id: str = Field(max_length=64)
    kind: str = Field(max_length=64)
    stopped: bool
    length_ratio: FiniteOrNot
    diagonality: FiniteOrNot


class ProbeReport(BaseModel):
    """The inference probes of one checkpoint: the data of a ``probes`` event."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    checkpoint_step: int = Field(ge=0)
    n: int = Field(ge=1)
    stop_percent: float = Field(ge=0, le=100)
    median_diagonality: FiniteOrNot
    median_quality: FiniteOrNot
    relative_wer: float | None = None
    seconds: float = Field(ge=0)
    failures: list[ProbeFailure] = Field(default_factory=list, max_length=64)


CommandAction = Literal["set_lr", "set_guided_attention_weight", "set_grad_clip", "rollback",
                        "checkpoint_now", "pause", "resume", "stop",
                        "set_gate_positive_weight", "set_spike_guard", "skip_failed_batches"]
VALUE_ACTIONS = frozenset({"set_lr", "set_guided_attention_weight", "set_grad_clip",
                           "set_gate_positive_weight", "set_spike_guard",
                           "skip_failed_batches"})
CommandSource = Literal["tuner", "bot", "api", "test"]
MAX_NOTE_CHARS = 280


class Trigger(BaseModel):
    """Why a command was issued: which metric crossed which threshold over which window."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    rule: str
    metric: str
    value: FiniteOrNot
    threshold: float
    window: int = Field(ge=0, description="steps the condition was evaluated over")


# A command the trainer has not applied by then is stale (the situation it answered has
# moved on): the default expiry of every command, whoever sends it.
COMMAND_TTL_S = 300.0


class Command(Message):
    """A corrective command for the trainer."""

    kind: Literal["command"] = "command"
    command_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1,
                            max_length=64)
    action: CommandAction
    value: float | None = None
    source: CommandSource
    reason: Trigger | None = None
    requested_by: str = Field(default="", max_length=128, description="who, e.g. a chat id")
    note: str = Field(default="", max_length=MAX_NOTE_CHARS, description="why, in words")
    expires_at: float | None = Field(default=None, description="unix time; stale after this")

    @model_validator(mode="after")
    def _check(self) -> Command:
        if self.action in VALUE_ACTIONS and self.value is None:
            raise ValueError(f"{self.action} needs a value")
        if self.action not in VALUE_ACTIONS and self.value is not None:
            raise ValueError(f"{self.action} takes no value")
        return self


AckStatus = Literal["applied", "rejected", "expired", "duplicate"]


class Ack(Message):
    """The trainer's answer to one command, sent exactly once per command id."""

    kind: Literal["ack"] = "ack"
    command_id: str
    action: str
    status: AckStatus
    step: int = Field(ge=0)
    before: float | None = None
    after: float | None = None
    detail: str = ""


class Effect(BaseModel):
    """What a corrective action measurably did, N steps after it was applied."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    metric: str
    before: FiniteOrNot
    after: FiniteOrNot
    steps: int = Field(ge=0)
    recovered: bool


class Expectation(BaseModel):
    """What a command should do: which metric recovers, from what, past which target, and
    how many steps after the ack it is measured."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    metric: str
    before: FiniteOrNot
    target: float
    recovered_when: Literal["below", "above"]
    within_steps: int = Field(ge=1)


OnTimeout = Literal["apply", "drop"]


class Proposal(BaseModel):
    """A supervised decision asking a person first: until when, and what silence means."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    deadline: float = Field(description="unix time; unanswered by then, on_timeout decides")
    on_timeout: OnTimeout
    current: float | None = Field(default=None, description="the setting's value when "
                                  "proposed (the 'before' of the change)")
    expected: Expectation | None = None


# How a proposal ended: a person's answer, or the timeout applying or dropping it.
Resolution = Literal["approved", "rejected", "timeout_applied", "timeout_dropped"]


class ActionRecord(Message):
    """Audit trail of one tuner decision: trigger -> command -> ack -> measured effect.

    Under supervision it starts as "proposed" (no command sent); an approval (or a timeout
    with on_timeout "apply") continues with "issued", a rejection ends it as "rejected" and a
    timeout with on_timeout "drop" as "dropped". Every later record carries the proposal,
    its resolution and who decided.
    """

    kind: Literal["action"] = "action"
    action_id: str
    stage: Literal["proposed", "issued", "acked", "measured", "rejected", "dropped"]
    trigger: Trigger
    command: Command
    ack: Ack | None = None
    effect: Effect | None = None
    proposal: Proposal | None = None
    resolution: Resolution | None = None
    decided_by: str = Field(default="", max_length=128, description="who answered (or "
                            "'timeout')")


class Approval(Message):
    """A person's answer to a proposal, written by the bot (or any client) via RunStore."""

    kind: Literal["approval"] = "approval"
    answer_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1,
                           max_length=64)
    action_id: str = Field(min_length=1, max_length=64)
    approved: bool
    by: str = Field(min_length=1, max_length=128, description="who, e.g. telegram:<user>")


EventKind = Literal["run_started", "checkpoint_saved", "restart", "red_flag", "recovered",
                    "indicators_met", "paused", "resumed", "finished", "stopped",
                    "events_dropped", "critical", "probes", "approval_ignored",
                    "checkpoint_failed", "checkpoint_recovered"]
Severity = Literal["info", "warning", "critical"]


class Event(Message):
    """A lifecycle or health event."""

    kind: Literal["event"] = "event"
    event: EventKind
    severity: Severity = "info"
    step: int | None = Field(default=None, ge=0)
    detail: str = Field(default="", max_length=4000)
    data: dict[str, Any] = Field(default_factory=dict)


def probe_report(event: Event) -> ProbeReport | None:
    """The report a ``probes`` event carries; None for any other event or malformed data."""
    if event.event != "probes":
        return None
    try:
        return ProbeReport.model_validate(event.data)
    except ValidationError:
        return None


class VerdictMessage(Message):
    """The trainer's verdict on every success indicator, published with each evaluation."""

    kind: Literal["verdict"] = "verdict"
    verdict: Verdict


SCHEMAS: dict[Stream, type[Message]] = {
    Stream.METRICS: MetricsMessage,
    Stream.ATTENTION: AttentionSnapshot,
    Stream.DIAGNOSTICS: AlignmentReport,
    Stream.COMMANDS: Command,
    Stream.ACKS: Ack,
    Stream.ACTIONS: ActionRecord,
    Stream.EVENTS: Event,
    Stream.VERDICT: VerdictMessage,
    Stream.APPROVALS: Approval,
}

# A stream entry larger than this is refused unread (attention snapshots are the largest).
MAX_WIRE_BYTES = 8 * 1024 * 1024


def encode(message: Message) -> dict[str, str]:
    """The stream entry fields for ``message``."""
    return {WIRE_FIELD: message.model_dump_json()}


def decode(fields: dict[Any, Any], schema: type[Message]) -> Message:
    """Parse a stream entry as ``schema``; raises MessageError with a one-line reason."""
    raw = fields.get(WIRE_FIELD, fields.get(WIRE_FIELD.encode()))
    if raw is None:
        raise MessageError(f"no {WIRE_FIELD!r} field (fields: {sorted(map(str, fields))[:5]})")
    if len(raw) > MAX_WIRE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes exceeds {MAX_WIRE_BYTES}")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise MessageError(f"invalid {schema.__name__}: {where}: {first['msg']} "
                           f"({error.error_count()} error(s))") from error
