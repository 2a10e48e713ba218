"""Prometheus alerts: Alertmanager's webhook payload, deduplication and the Telegram report.

Alertmanager posts a group of alerts to the notifier's webhook (payload version 4). The
payload is parsed by ``AlertmanagerPayload``; ``AlertDeduplicator`` drops the alerts already
reported in the same state, because Alertmanager re-sends a group on every
``group_interval`` while anything in it changes, retries failed deliveries, and each member
of an HA pair sends its own copy; ``alerts_report`` renders the rest as one message in
Telegram's HTML parse mode. Pure logic: no I/O.

As in ``reports``, all the words live in a per-language table (``ALERT_MESSAGES``), every
value from the payload is escaped, and every tag pair opens and closes on one line. Values
from the payload are also flattened to one line and cut to a fixed length, so a hostile
payload can neither break the markup nor make the message arbitrarily long.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from services.notifier.reports import CRITICAL_MARK, INDENT, MET_MARK, Language, escape

WEBHOOK_VERSION = "4"  # the only payload version Alertmanager has sent since 0.7

AlertStatus = Literal["firing", "resolved"]

WARNING_MARK, INFO_MARK = "⚠️", "ℹ️"
RESOLVED_MARK = MET_MARK
ALERT_ICON = "🔔"
ELLIPSIS = "…"

# Severity label -> (sort rank, mark). An alert with a missing or unknown severity is still
# an alert someone configured, so it is shown as a warning rather than hidden among infos.
SEVERITIES: dict[str, tuple[int, str]] = {
    "critical": (0, CRITICAL_MARK),
    "warning": (1, WARNING_MARK),
    "info": (2, INFO_MARK),
}
DEFAULT_SEVERITY = "warning"

# Caps on what one report shows; the payload itself is never rejected for its size.
MAX_LABEL_CHARS = 100  # alertname, run, service, a group label's name or value
MAX_SUMMARY_CHARS = 300
MAX_DESCRIPTION_CHARS = 1000
MAX_GROUP_LABELS_SHOWN = 6
MAX_ALERTS_SHOWN = 20

# Unicode categories replaced by a space in data values: control characters, surrogates.
CONTROL_CATEGORIES = frozenset({"Cc", "Cs"})

DEFAULT_DEDUP_TTL_S = 3600.0
MAX_DEDUP_KEYS = 10_000

SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400

ALERT_MESSAGES: dict[Language, dict[str, str]] = {
    "ru": {
        "title": ALERT_ICON + " <b>Оповещения</b> · активны: {firing} · устранены: {resolved}",
        "group": " · {labels}",
        "run": " · запуск <code>{run}</code>",
        "service": " · сервис {service}",
        "unnamed": "без имени",
        "firing_since": "⏱ активно уже {duration} (с {since})",
        "resolved_after": "⏱ длилось {duration} ({since} – {until})",
        "resolved_since": "⏱ началось {since}",
        "more_alerts": ELLIPSIS + " и ещё оповещений: {count}",
        "truncated": WARNING_MARK + " Alertmanager не включил в сообщение ещё оповещений: "
                     "{count} (лимит max_alerts)",
        "duration_s": "{s} с",
        "duration_ms": "{m} мин {s:02d} с",
        "duration_hm": "{h} ч {m:02d} мин",
        "duration_dh": "{d} дн {h:02d} ч",
    },
    "en": {
        "title": ALERT_ICON + " <b>Alerts</b> · firing: {firing} · resolved: {resolved}",
        "group": " · {labels}",
        "run": " · run <code>{run}</code>",
        "service": " · service {service}",
        "unnamed": "unnamed",
        "firing_since": "⏱ firing for {duration} (since {since})",
        "resolved_after": "⏱ lasted {duration} ({since} – {until})",
        "resolved_since": "⏱ started {since}",
        "more_alerts": ELLIPSIS + " and {count} more alerts",
        "truncated": WARNING_MARK + " Alertmanager left out {count} more alerts of this group "
                     "(max_alerts limit)",
        "duration_s": "{s}s",
        "duration_ms": "{m}m {s:02d}s",
        "duration_hm": "{h}h {m:02d}m",
        "duration_dh": "{d}d {h:02d}h",
    },
}


# ---------------------------------------------------------------------------- payload


def _to_utc(value: datetime) -> datetime:
    """``value`` in UTC; a timestamp without an offset is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError(f"timestamp {value.isoformat()} is out of range in UTC") from exc


def _end_time(value: datetime | None) -> datetime | None:
    """``None`` for Go's zero time, which Alertmanager sends as the end of a firing alert."""
    return None if value is None or value.year == 1 else _to_utc(value)


class AlertmanagerAlert(BaseModel):
    """One alert of a webhook payload; fields not used here are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    status: AlertStatus
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: Annotated[datetime, AfterValidator(_to_utc)] = Field(alias="startsAt")
    ends_at: Annotated[datetime | None, AfterValidator(_end_time)] = Field(default=None,
                                                                           alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = Field(min_length=1)


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook payload, version 4; fields not used here are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    version: str
    group_key: str = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, ge=0, alias="truncatedAlerts")
    status: AlertStatus
    receiver: str = ""
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    alerts: list[AlertmanagerAlert] = Field(min_length=1)

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: object) -> object:
        # A different version may move or rename fields; better a clear refusal than a
        # report built from fields that mean something else.
        if value != WEBHOOK_VERSION:
            raise ValueError(f"unsupported Alertmanager webhook payload version {value!r}; "
                             f"expected {WEBHOOK_VERSION!r}")
        return value


# ---------------------------------------------------------------------------- deduplication

DedupKey = tuple[str, str, datetime]


def _dedup_key(alert: AlertmanagerAlert) -> DedupKey:
    return alert.fingerprint, alert.status, alert.starts_at


class AlertDeduplicator:
    """Remembers which alerts were reported, so each firing and each resolution goes out once.

    An alert is keyed by (fingerprint, status, startsAt): its resolution is a new key, and so
    is a later firing of the same fingerprint (it has a new startsAt). A key is forgotten
    ``ttl_s`` seconds after it was last seen; seeing it again (a re-sent group) restarts
    that time, so an alert re-sent every ``group_interval`` stays quiet however long its
    group keeps changing, while Alertmanager's ``repeat_interval`` reminder, longer than
    ``ttl_s``, still gets through. At most ``max_keys`` keys are kept: past that the least
    recently seen are dropped.
    """

    def __init__(self, ttl_s: float = DEFAULT_DEDUP_TTL_S,
                 clock: Callable[[], float] = time.time,
                 max_keys: int = MAX_DEDUP_KEYS) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._clock = clock
        # key -> when last seen; ordered from least to most recently seen.
        self._seen: OrderedDict[DedupKey, float] = OrderedDict()

    def __len__(self) -> int:
        """The number of keys remembered now (expired ones included until the next call)."""
        return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self.ttl_s:
                break
            del self._seen[key]

    def fresh(self, payload: AlertmanagerPayload) -> list[AlertmanagerAlert]:
        """The alerts of ``payload`` not reported yet in their current state, in payload order.

        Records every alert of the payload as seen (an alert listed twice in one payload is
        returned once).
        """
        now = self._clock()
        self._expire(now)
        result: list[AlertmanagerAlert] = []
        for alert in payload.alerts:
            key = _dedup_key(alert)
            if key in self._seen:
                self._seen.move_to_end(key)
            else:
                result.append(alert)
            self._seen[key] = now
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return result

    def forget(self, alerts: Iterable[AlertmanagerAlert]) -> None:
        """Forgets ``alerts``, e.g. after their report failed to send, so a retry is fresh."""
        for alert in alerts:
            self._seen.pop(_dedup_key(alert), None)


# ---------------------------------------------------------------------------- report


def _clean(value: str, limit: int) -> str:
    """``value`` on one line, without control characters, cut to ``limit`` and escaped.

    Control characters (newlines included) and lone surrogates, which Telegram cannot take,
    become spaces, and whitespace runs one space, so a value inside a tag pair cannot carry
    the pair across lines; the cut is made before escaping, so it never splits an HTML
    entity.
    """
    text = "".join(" " if unicodedata.category(char) in CONTROL_CATEGORIES else char
                   for char in value)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit - 1] + ELLIPSIS
    return escape(text)


def _severity(alert: AlertmanagerAlert) -> str:
    severity = alert.labels.get("severity", "").strip().lower()
    return severity if severity in SEVERITIES else DEFAULT_SEVERITY


def _sort_key(alert: AlertmanagerAlert) -> tuple[bool, int, datetime, str]:
    return (alert.status == "resolved", SEVERITIES[_severity(alert)][0], alert.starts_at,
            alert.labels.get("alertname", ""))


def _timestamp(value: datetime) -> str:
    # Built by hand: strftime drops the leading zeros of years before 1000 on some platforms.
    return value.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds") + " UTC"


def duration_text(seconds: float, language: Language) -> str:
    """A duration in the two largest units, e.g. ``3m 20s`` / ``3 мин 20 с``, ``2h 05m``.

    Under a minute only seconds (``45s``); from a day on, days and hours (``3d 04h``).
    Seconds are rounded down; a negative duration (clock skew) reads as zero.
    """
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be finite, got {seconds}")
    words = ALERT_MESSAGES[language]
    total = max(0, int(seconds))
    if total < SECONDS_PER_MINUTE:
        return words["duration_s"].format(s=total)
    if total < SECONDS_PER_HOUR:
        minutes, secs = divmod(total, SECONDS_PER_MINUTE)
        return words["duration_ms"].format(m=minutes, s=secs)
    if total < SECONDS_PER_DAY:
        hours, rest = divmod(total, SECONDS_PER_HOUR)
        return words["duration_hm"].format(h=hours, m=rest // SECONDS_PER_MINUTE)
    days, rest = divmod(total, SECONDS_PER_DAY)
    return words["duration_dh"].format(d=days, h=rest // SECONDS_PER_HOUR)


def _group_text(words: Mapping[str, str], labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    names = sorted(labels)[:MAX_GROUP_LABELS_SHOWN]
    shown = ", ".join(f"{_clean(name, MAX_LABEL_CHARS)}={_clean(labels[name], MAX_LABEL_CHARS)}"
                      for name in names)
    if len(labels) > len(names):
        shown += f", {ELLIPSIS}"
    return words["group"].format(labels=shown)


def _alert_lines(words: Mapping[str, str], alert: AlertmanagerAlert, language: Language,
                 now: datetime) -> list[str]:
    resolved = alert.status == "resolved"
    mark = RESOLVED_MARK if resolved else SEVERITIES[_severity(alert)][1]
    name = _clean(alert.labels.get("alertname", ""), MAX_LABEL_CHARS) or words["unnamed"]
    head = f"{mark} <b>{name}</b>"
    run = _clean(alert.labels.get("run", ""), MAX_LABEL_CHARS)
    if run:
        head += words["run"].format(run=run)
    service = _clean(alert.labels.get("service", ""), MAX_LABEL_CHARS)
    if service:
        head += words["service"].format(service=service)
    lines = [head]
    summary = _clean(alert.annotations.get("summary", ""), MAX_SUMMARY_CHARS)
    if summary:
        lines.append(INDENT + summary)
    description = _clean(alert.annotations.get("description", ""), MAX_DESCRIPTION_CHARS)
    if description:
        lines.append(INDENT + description)
    since = _timestamp(alert.starts_at)
    if not resolved:
        lasted = (now - alert.starts_at).total_seconds()
        lines.append(INDENT + words["firing_since"].format(
            duration=duration_text(lasted, language), since=since))
    elif alert.ends_at is not None:
        lasted = (alert.ends_at - alert.starts_at).total_seconds()
        lines.append(INDENT + words["resolved_after"].format(
            duration=duration_text(lasted, language), since=since,
            until=_timestamp(alert.ends_at)))
    else:  # resolved without an end time: only the start is known
        lines.append(INDENT + words["resolved_since"].format(since=since))
    return lines


def alerts_report(payload: AlertmanagerPayload, alerts: Sequence[AlertmanagerAlert],
                  language: Language, now: datetime | None = None) -> str:
    """One Telegram message for ``alerts`` (the fresh ones) of the group ``payload``.

    A title with the counts of firing and resolved alerts and the group's labels; then the
    firing alerts (critical, warning, info; the oldest first within a severity), then the
    resolved ones. Each alert shows its severity mark (✅ once resolved), name, run and
    service labels, summary and description, and how long it has been firing (since
    ``now``, default the current time) or how long it lasted. At most
    ``MAX_ALERTS_SHOWN`` alerts are listed, then a count of the rest; a note says when
    Alertmanager itself left alerts out (``truncatedAlerts``). Raises ``ValueError`` for no
    alerts: there is nothing to send.
    """
    if not alerts:
        raise ValueError("no alerts to report")
    words = ALERT_MESSAGES[language]
    now = datetime.now(UTC) if now is None else _to_utc(now)
    ordered = sorted(alerts, key=_sort_key)
    firing = sum(alert.status == "firing" for alert in ordered)
    lines = [words["title"].format(firing=firing, resolved=len(ordered) - firing)
             + _group_text(words, payload.group_labels)]
    for alert in ordered[:MAX_ALERTS_SHOWN]:
        lines.append("")
        lines.extend(_alert_lines(words, alert, language, now))
    hidden = len(ordered) - MAX_ALERTS_SHOWN
    if hidden > 0:
        lines.append("")
        lines.append(words["more_alerts"].format(count=hidden))
    if payload.truncated_alerts:
        lines.append("")
        lines.append(words["truncated"].format(count=payload.truncated_alerts))
    return "\n".join(lines)
