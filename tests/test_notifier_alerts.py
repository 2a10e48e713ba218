"""Notifier alerts: Alertmanager payloads, deduplication, the alert report and durations."""

from __future__ import annotations

import copy
import html
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.notifier.alerts import (
    ALERT_MESSAGES,
    MAX_ALERTS_SHOWN,
    MAX_DESCRIPTION_CHARS,
    MAX_LABEL_CHARS,
    AlertDeduplicator,
    AlertmanagerPayload,
    alerts_report,
    duration_text,
)
from services.notifier.reports import split_message

LANGUAGES = ("ru", "en")
HOSTILE = "<script>alert('x')</script> & co"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time: the endsAt of a firing alert
NOW = datetime(2024, 5, 1, 10, 3, 20, tzinfo=UTC)
STARTS = "2024-05-01T10:00:00.123456789Z"  # 3m 19.88s before NOW, nanosecond fraction
TAG = re.compile(r"<(/?)([a-z]+)>")
ALLOWED_TAGS = {"b", "code"}
ENTITY = re.compile(r"&(?!lt;|gt;|amp;)")


def alert(name: str = "GradExplosion", severity: str = "warning", status: str = "firing",
          fingerprint: str = "3c8a1f0e9b2d4c11", starts: str = STARTS, ends: str = ZERO_TIME,
          run: str | None = "run-1", **annotations: str) -> dict[str, Any]:
    """One alert as Alertmanager 0.25+ puts it in a webhook payload."""
    labels = {"alertname": name, "severity": severity, "instance": "tuner:9100",
              "job": "smart-tuner"}
    if run is not None:
        labels["run"] = run
    return {
        "status": status,
        "labels": labels,
        "annotations": annotations or {"summary": f"{name} on {run}",
                                       "description": "grad norm 412.5 > 100 for 5m"},
        "startsAt": starts,
        "endsAt": ends,
        "generatorURL": "http://prometheus:9090/graph?g0.expr=grad_norm+%3E+100&g0.tab=1",
        "fingerprint": fingerprint,
    }


def payload(*alerts: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A version 4 webhook body around ``alerts``."""
    body: dict[str, Any] = {
        "version": "4",
        "groupKey": '{}:{alertname="GradExplosion"}',
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": "telegram",
        "groupLabels": {"alertname": "GradExplosion"},
        "commonLabels": {"job": "smart-tuner"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }
    body.update(overrides)
    return body


def parse(body: dict[str, Any]) -> AlertmanagerPayload:
    """Parsed as the webhook receives it: from JSON text."""
    return AlertmanagerPayload.model_validate_json(json.dumps(body))


def report(body: dict[str, Any], language: str = "en") -> str:
    parsed = parse(body)
    return alerts_report(parsed, parsed.alerts, language, now=NOW)


def assert_balanced(text: str) -> None:
    """Every line's tags are known, nested and closed on that line; ``&`` only in entities."""
    for line in text.split("\n"):
        stack: list[str] = []
        for match in TAG.finditer(line):
            closing, name = match.groups()
            assert name in ALLOWED_TAGS, line
            if closing:
                assert stack and stack.pop() == name, line
            else:
                stack.append(name)
        assert not stack, line
        assert "<" not in TAG.sub("", line) and ">" not in TAG.sub("", line), line
        assert not ENTITY.search(line), line


def alert_lines(text: str) -> list[str]:
    """The head line of each alert (the line with the bold name)."""
    return [line for line in text.split("\n") if "<b>" in line and "🔔" not in line]


# ---------------------------------------------------------------------------- parsing


def test_parses_a_real_payload() -> None:
    parsed = parse(payload(alert(), alert("Down", "critical", "resolved", "ffee",
                                          starts="2024-05-01T09:00:00Z",
                                          ends="2024-05-01T11:05:00.5+01:00")))
    firing, resolved = parsed.alerts
    assert parsed.version == "4" and parsed.group_labels == {"alertname": "GradExplosion"}
    assert firing.starts_at == datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert firing.ends_at is None  # the zero time means "not ended"
    assert firing.labels["run"] == "run-1" and firing.fingerprint == "3c8a1f0e9b2d4c11"
    # An offset is converted to UTC.
    assert resolved.ends_at == datetime(2024, 5, 1, 10, 5, 0, 500000, tzinfo=UTC)


def test_ignores_unknown_fields() -> None:
    body = payload(alert())
    body["futureField"] = {"x": 1}
    body["alerts"][0]["silencedBy"] = ["abc"]
    parsed = parse(body)
    assert parsed.alerts[0].labels["alertname"] == "GradExplosion"


@pytest.mark.parametrize("version", ["5", "3", 4, None])
def test_rejects_other_versions_by_name(version: object) -> None:
    with pytest.raises(ValidationError) as error:
        parse(payload(alert(), version=version))
    assert "version" in str(error.value) and repr(version) in str(error.value)


def test_rejects_empty_alerts_and_unknown_status() -> None:
    with pytest.raises(ValidationError, match="alerts"):
        parse(payload())
    bad = alert()
    bad["status"] = "pending"
    with pytest.raises(ValidationError, match="status"):
        parse(payload(bad))


def test_rejects_timestamp_out_of_range() -> None:
    # Before year 1 once in UTC: a clear validation error, not an OverflowError later.
    with pytest.raises(ValidationError, match="out of range"):
        parse(payload(alert(starts="0001-01-01T00:00:00+05:00")))


# ---------------------------------------------------------------------------- report


@pytest.mark.parametrize("language", LANGUAGES)
def test_orders_by_state_then_severity(language: str) -> None:
    body = payload(
        alert("Resolved", "critical", "resolved", "f1", ends="2024-05-01T10:01:00Z"),
        alert("Info", "info", fingerprint="f2"),
        alert("Warn", "warning", fingerprint="f3"),
        alert("Crit", "critical", fingerprint="f4"),
        alert("NoSeverity", "", fingerprint="f5"),
    )
    heads = alert_lines(report(body, language))
    names = [re.search(r"<b>(.*?)</b>", line).group(1) for line in heads]
    # An unknown severity is treated as a warning; it started at the same time as Warn, so
    # the name breaks the tie.
    assert names == ["Crit", "NoSeverity", "Warn", "Info", "Resolved"]
    marks = [line.split(" ")[0] for line in heads]
    assert marks == ["🚨", "⚠️", "⚠️", "ℹ️", "✅"]  # a resolved critical is ✅, not 🚨


@pytest.mark.parametrize("language", LANGUAGES)
def test_title_counts_and_group_labels(language: str) -> None:
    body = payload(alert(fingerprint="a"), alert(fingerprint="b"),
                   alert(status="resolved", fingerprint="c", ends="2024-05-01T10:01:00Z"))
    title = report(body, language).split("\n")[0]
    words = ALERT_MESSAGES[language]
    assert title.startswith(words["title"].format(firing=2, resolved=1))
    assert title.endswith("alertname=GradExplosion")


def test_english_and_russian_words() -> None:
    body = payload(alert(), alert("Down", "critical", "resolved", "ffee",
                                  starts="2024-05-01T09:00:00Z", ends="2024-05-01T10:05:00Z"))
    en, ru = report(body, "en"), report(body, "ru")
    assert en != ru
    assert "firing: 1" in en and "resolved: 1" in en
    assert "firing for 3m 19s (since 2024-05-01 10:00:00 UTC)" in en
    assert "lasted 1h 05m" in en and "run <code>run-1</code>" in en
    assert "активны: 1" in ru and "устранены: 1" in ru
    assert "активно уже 3 мин 19 с" in ru and "длилось 1 ч 05 мин" in ru
    assert "запуск <code>run-1</code>" in ru
    assert not re.search(r"[а-яА-Я]", en)
    assert "firing" not in ru and "lasted" not in ru


@pytest.mark.parametrize("language", LANGUAGES)
def test_alert_contents(language: str) -> None:
    body = payload(alert(summary="Gradient explosion", description="grad norm 412.5 > 100"))
    body["alerts"][0]["labels"]["service"] = "trainer"
    text = report(body, language)
    head = alert_lines(text)[0]
    assert head.startswith("⚠️ <b>GradExplosion</b>")
    assert "<code>run-1</code>" in head and "trainer" in head
    assert "  Gradient explosion" in text.split("\n")
    assert "  grad norm 412.5 &gt; 100" in text.split("\n")


def test_alert_without_run_or_annotations() -> None:
    text = report(payload(alert(run=None, summary=""), alert("", fingerprint="x", run="")))
    assert "<code>" not in text
    assert "<b>unnamed</b>" in text
    assert "GradExplosion on" not in text  # no default summary: the annotation was empty


@pytest.mark.parametrize("language", LANGUAGES)
def test_escapes_hostile_values(language: str) -> None:
    body = payload(alert(HOSTILE, run=HOSTILE, summary=HOSTILE, description=HOSTILE),
                   groupLabels={HOSTILE: HOSTILE})
    body["alerts"][0]["labels"]["service"] = HOSTILE
    text = report(body, language)
    assert "<script>" not in text and "</script>" not in text
    escaped = "&lt;script&gt;alert('x')&lt;/script&gt; &amp; co"
    # name, run, service, summary, description, group label name and value
    assert text.count(escaped) == 7
    assert_balanced(text)


def test_multiline_values_stay_on_one_line() -> None:
    name = "Grad\nExplosion"
    text = report(payload(alert(name, run="run\n-1\t", description="line one\n\nline two\x00")))
    assert "<b>Grad Explosion</b>" in text and "<code>run -1</code>" in text
    assert "  line one line two" in text.split("\n")
    assert "\x00" not in text
    assert_balanced(text)


def test_truncates_long_values() -> None:
    long_text = "x" * 10_000
    text = report(payload(alert("A" * 500, run="r" * 500, description=long_text)))
    lines = text.split("\n")
    description = next(line for line in lines if "xxx" in line)
    assert description == "  " + "x" * (MAX_DESCRIPTION_CHARS - 1) + "…"
    assert f"<b>{'A' * (MAX_LABEL_CHARS - 1)}…</b>" in text
    assert f"<code>{'r' * (MAX_LABEL_CHARS - 1)}…</code>" in text
    assert len(text) < 2 * MAX_DESCRIPTION_CHARS


def test_truncation_never_splits_an_entity() -> None:
    text = report(payload(alert(description="&" * 5000)))
    description = next(line for line in text.split("\n") if "&amp;" in line)
    assert description.endswith("&amp;…")
    assert html.unescape(description.strip()) == "&" * (MAX_DESCRIPTION_CHARS - 1) + "…"


def test_caps_alerts_and_notes_truncated_alerts() -> None:
    alerts = [alert(f"A{i}", fingerprint=f"f{i}") for i in range(MAX_ALERTS_SHOWN + 5)]
    text = report(payload(*alerts, truncatedAlerts=7), "en")
    assert len(alert_lines(text)) == MAX_ALERTS_SHOWN
    assert "… and 5 more alerts" in text
    assert "left out 7 more alerts" in text
    ru = report(payload(alert(), truncatedAlerts=7), "ru")
    assert "ещё оповещений: 7" in ru and "ещё оповещений: 5" not in ru
    assert "left out" not in report(payload(alert()), "en")


def test_resolved_alert_durations() -> None:
    text = report(payload(
        alert("Done", status="resolved", starts="2024-05-01T08:00:00Z",
              ends="2024-05-01T10:05:30.999Z"),
        alert("Skewed", status="resolved", fingerprint="s", starts="2024-05-01T10:00:00Z",
              ends="2024-05-01T09:59:00Z")), "en")
    assert "lasted 2h 05m (2024-05-01 08:00:00 UTC – 2024-05-01 10:05:30 UTC)" in text
    assert "lasted 0s" in text  # an end before the start (clock skew) is not negative
    assert "firing for" not in text


def test_firing_duration_uses_now() -> None:
    parsed = parse(payload(alert(starts="2024-05-01T07:00:00Z")))
    later = alerts_report(parsed, parsed.alerts, "en", now=NOW + timedelta(days=2))
    assert "firing for 3h 03m" in alerts_report(parsed, parsed.alerts, "en", now=NOW)
    assert "firing for 2d 03h" in later
    naive = alerts_report(parsed, parsed.alerts, "en", now=NOW.replace(tzinfo=None))
    assert "firing for 3h 03m" in naive  # a naive ``now`` is UTC


def test_reports_only_the_given_alerts() -> None:
    parsed = parse(payload(alert(fingerprint="a"), alert("Other", fingerprint="b")))
    text = alerts_report(parsed, parsed.alerts[1:], "en", now=NOW)
    assert "Other" in text and "<b>GradExplosion</b>" not in text
    assert "firing: 1" in text


def test_no_alerts_is_an_error() -> None:
    parsed = parse(payload(alert()))
    with pytest.raises(ValueError, match="no alerts"):
        alerts_report(parsed, [], "en", now=NOW)


def test_message_tables_have_the_same_keys() -> None:
    assert ALERT_MESSAGES["ru"].keys() == ALERT_MESSAGES["en"].keys()


@pytest.mark.parametrize("language", LANGUAGES)
def test_report_tags_balanced(language: str) -> None:
    alerts = [alert(f"A{i}", sev, status, f"f{i}", ends=ZERO_TIME if status == "firing"
                    else "2024-05-01T10:02:00Z", summary="s <b>", description="d & </b>")
              for i, (sev, status) in enumerate([("critical", "firing"), ("info", "resolved"),
                                                 ("warning", "firing")])]
    text = report(payload(*alerts, truncatedAlerts=1), language)
    assert_balanced(text)
    # split_message cuts only at newlines, so each chunk stays balanced too.
    for chunk in split_message(text, limit=80):
        assert_balanced(chunk)


# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("seconds", "en", "ru"), [
    (0, "0s", "0 с"),
    (45.9, "45s", "45 с"),
    (60, "1m 00s", "1 мин 00 с"),
    (200, "3m 20s", "3 мин 20 с"),
    (3599, "59m 59s", "59 мин 59 с"),
    (2 * 3600 + 5 * 60 + 59, "2h 05m", "2 ч 05 мин"),
    (3 * 86400 + 4 * 3600, "3d 04h", "3 дн 04 ч"),
    (-5, "0s", "0 с"),
])
def test_duration_text(seconds: float, en: str, ru: str) -> None:
    assert duration_text(seconds, "en") == en
    assert duration_text(seconds, "ru") == ru


def test_duration_text_rejects_non_finite() -> None:
    with pytest.raises(ValueError):
        duration_text(float("nan"), "en")


# ---------------------------------------------------------------------------- deduplication


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def fingerprints(alerts: list) -> list[str]:
    return [a.fingerprint for a in alerts]


def test_same_payload_twice_is_not_fresh() -> None:
    dedup = AlertDeduplicator(clock=FakeClock())
    body = payload(alert(fingerprint="a"), alert(fingerprint="b"))
    assert fingerprints(dedup.fresh(parse(body))) == ["a", "b"]
    assert dedup.fresh(parse(copy.deepcopy(body))) == []


def test_new_alert_in_a_resent_group_is_fresh() -> None:
    dedup = AlertDeduplicator(clock=FakeClock())
    dedup.fresh(parse(payload(alert(fingerprint="a"))))
    again = dedup.fresh(parse(payload(alert(fingerprint="a"), alert(fingerprint="b"))))
    assert fingerprints(again) == ["b"]


def test_duplicate_within_one_payload_is_returned_once() -> None:
    dedup = AlertDeduplicator(clock=FakeClock())
    assert len(dedup.fresh(parse(payload(alert(), alert())))) == 1


def test_resolution_and_refire_are_fresh() -> None:
    dedup = AlertDeduplicator(clock=FakeClock())
    dedup.fresh(parse(payload(alert(fingerprint="a"))))
    resolved = parse(payload(alert(fingerprint="a", status="resolved",
                                   ends="2024-05-01T10:10:00Z")))
    assert fingerprints(dedup.fresh(resolved)) == ["a"]
    assert dedup.fresh(resolved) == []
    refire = parse(payload(alert(fingerprint="a", starts="2024-05-01T11:00:00Z")))
    assert fingerprints(dedup.fresh(refire)) == ["a"]
    # The same instant written differently (another offset, fraction) is the same key.
    same = parse(payload(alert(fingerprint="a", starts="2024-05-01T14:00:00.000+03:00")))
    assert dedup.fresh(same) == []


def test_ttl_expiry() -> None:
    clock = FakeClock()
    dedup = AlertDeduplicator(ttl_s=600, clock=clock)
    body = parse(payload(alert()))
    assert len(dedup.fresh(body)) == 1
    clock.now += 599
    assert dedup.fresh(body) == []  # seen again: remembered for another 600 s from now
    clock.now += 599
    assert dedup.fresh(body) == []
    clock.now += 600
    assert len(dedup.fresh(body)) == 1
    # Expired keys are dropped, not just ignored.
    clock.now += 601
    dedup.fresh(parse(payload(alert(fingerprint="other"))))
    assert len(dedup) == 1


def test_key_cap_bounds_memory() -> None:
    clock = FakeClock()
    dedup = AlertDeduplicator(clock=clock, max_keys=50)
    for i in range(200):
        clock.now += 1
        dedup.fresh(parse(payload(alert(fingerprint=f"f{i}"))))
        assert len(dedup) <= 50
    assert len(dedup) == 50
    # The oldest were evicted (fresh again); the newest are still remembered.
    assert len(dedup.fresh(parse(payload(alert(fingerprint="f0"))))) == 1
    assert dedup.fresh(parse(payload(alert(fingerprint="f199")))) == []


def test_key_cap_evicts_the_least_recently_seen() -> None:
    clock = FakeClock()
    dedup = AlertDeduplicator(ttl_s=100, clock=clock, max_keys=2)
    first, second = parse(payload(alert(fingerprint="a"))), parse(payload(alert(fingerprint="b")))
    dedup.fresh(first)
    clock.now += 10
    dedup.fresh(second)
    clock.now += 10
    assert dedup.fresh(first) == []  # "a" seen again: now the most recent
    clock.now += 10
    dedup.fresh(parse(payload(alert(fingerprint="c"))))  # over the cap: "b" goes
    assert dedup.fresh(first) == []
    assert fingerprints(dedup.fresh(second)) == ["b"]


def test_default_key_cap() -> None:
    dedup = AlertDeduplicator(clock=FakeClock())
    many = parse(payload(*[alert(fingerprint=f"f{i}") for i in range(10_050)]))
    assert len(dedup.fresh(many)) == 10_050
    assert len(dedup) == 10_000


def test_forget_makes_alerts_fresh_again() -> None:
    dedup = AlertDeduplicator(clock=FakeClock())
    body = parse(payload(alert(fingerprint="a"), alert(fingerprint="b")))
    sent = dedup.fresh(body)
    dedup.forget(sent[:1])  # say the report of "a" failed to send
    assert fingerprints(dedup.fresh(body)) == ["a"]


@pytest.mark.parametrize(("ttl_s", "max_keys"), [(0, 10), (-1, 10), (60, 0)])
def test_deduplicator_rejects_bad_settings(ttl_s: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        AlertDeduplicator(ttl_s=ttl_s, max_keys=max_keys)


# ---------------------------------------------------------------------------- property

TEXT = st.text(max_size=300)
LABELS = st.dictionaries(TEXT, TEXT, max_size=4)


@settings(max_examples=150, deadline=None)
@given(name=TEXT, severity=TEXT, run=TEXT, service=TEXT, summary=TEXT,
       description=st.text(max_size=3000), extra=LABELS, group=LABELS,
       status=st.sampled_from(["firing", "resolved"]), language=st.sampled_from(LANGUAGES))
def test_arbitrary_text_never_breaks_the_report(
        name: str, severity: str, run: str, service: str, summary: str, description: str,
        extra: dict[str, str], group: dict[str, str], status: str, language: str) -> None:
    item = alert(name, severity, status, ends="2024-05-01T10:02:00Z", run=run,
                 summary=summary, description=description)
    item["labels"] = {**extra, "alertname": name, "severity": severity, "run": run,
                      "service": service}
    item["annotations"].update(extra)
    text = report(payload(item, groupLabels=group), language)
    assert_balanced(text)
    lines = text.split("\n")
    # Data cannot add lines: a title, a blank line, the head, summary, description, time.
    assert len(lines) <= 6
    # Nor make a line arbitrarily long (each character escapes to at most 5).
    assert all(len(line) <= 5 * (MAX_DESCRIPTION_CHARS + 7 * MAX_LABEL_CHARS) + 200
               for line in lines)
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text)


def test_control_characters_and_lone_surrogates_are_dropped() -> None:
    # Telegram cannot take a lone surrogate (not encodable as UTF-8); a Python caller can
    # still pass one, so the report must not carry it.
    body = payload(alert("bad\ud800name\x07", description="a\x1bb\u2028c"))
    parsed = AlertmanagerPayload.model_validate(body)
    text = alerts_report(parsed, parsed.alerts, "en", now=NOW)
    assert "<b>bad name</b>" in text and "  a b c" in text.split("\n")
    text.encode("utf-8")  # raises on a surrogate
