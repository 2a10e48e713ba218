"""Redis key and stream names: the one place that spells them.

Each run has its own set of streams, so runs never read each other's commands. Stream
lengths are capped (approximate MAXLEN, which Redis trims cheaply) so a week-long run keeps
Redis memory bounded; the caps are generous enough for every consumer to keep up.
"""

from __future__ import annotations

import re
from enum import StrEnum

PREFIX = "smart-tuner"
# Also a pydantic/FastAPI pattern (Rust regex: ``$`` is the end of the text there); in Python
# it is only ever used with ``fullmatch``, since ``re.match``'s ``$`` accepts "run\n".
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_RUN_ID = re.compile(RUN_ID_PATTERN)

RUNS_KEY = f"{PREFIX}:runs"  # a Redis set of known run ids
DEAD_LETTER_STREAM = f"{PREFIX}:dead-letter"  # one for all runs: a bad message may have no run


class Stream(StrEnum):
    """The per-run streams."""

    METRICS = "metrics"
    ATTENTION = "attention"
    DIAGNOSTICS = "diagnostics"
    COMMANDS = "commands"
    ACKS = "acks"
    ACTIONS = "actions"
    EVENTS = "events"
    VERDICT = "verdict"
    APPROVALS = "approvals"  # people's answers to the tuner's supervised proposals


# Approximate caps: ~10 hours of 1 step/s metrics; snapshots are big, so fewer of them.
MAXLEN: dict[Stream, int] = {
    Stream.METRICS: 50_000,
    Stream.ATTENTION: 500,
    Stream.DIAGNOSTICS: 10_000,
    Stream.COMMANDS: 10_000,
    Stream.ACKS: 10_000,
    Stream.ACTIONS: 10_000,
    Stream.EVENTS: 10_000,
    Stream.VERDICT: 10_000,
    Stream.APPROVALS: 10_000,
}
DEAD_LETTER_MAXLEN = 10_000


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is safe inside a key name, else raise ValueError."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r}: 1-64 of [A-Za-z0-9_.-], not starting "
                         "with a punctuation mark")
    return run_id


def stream_key(run_id: str, stream: Stream) -> str:
    """The Redis key of one of a run's streams, e.g. ``smart-tuner:run42:metrics``."""
    return f"{PREFIX}:{validate_run_id(run_id)}:{stream.value}"


def maxlen_for(key: str) -> int:
    """The approximate cap of the stream at ``key``."""
    if key == DEAD_LETTER_STREAM:
        return DEAD_LETTER_MAXLEN
    suffix = key.rsplit(":", 1)[-1]
    try:
        return MAXLEN[Stream(suffix)]
    except ValueError:
        raise ValueError(f"{key!r} is not a Smart Tuner stream") from None


def diagnostics_done_key(run_id: str, snapshot_id: str) -> str:
    """The marker that a snapshot's alignment report was published (idempotent publish)."""
    return f"{PREFIX}:{validate_run_id(run_id)}:diagnostics-done:{snapshot_id}"


def alignment_png_key(run_id: str) -> str:
    """The latest rendered attention picture of a run (PNG bytes)."""
    return f"{PREFIX}:{validate_run_id(run_id)}:alignment-png"


def alignment_png_meta_key(run_id: str) -> str:
    """What the picture at ``alignment_png_key`` shows (JSON: snapshot id, step, sample)."""
    return f"{alignment_png_key(run_id)}:meta"


def tuner_key(run_id: str, name: str) -> str:
    """A key the tuner keeps for one run, e.g. ``smart-tuner:run42:tuner:memory``."""
    return f"{PREFIX}:{validate_run_id(run_id)}:tuner:{name}"


def approval_token_key(token: str) -> str:
    """What an approval button's short token stands for (JSON: run id, action id)."""
    return f"{PREFIX}:approval-token:{token}"
