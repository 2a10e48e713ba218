"""Notifier reports: contents, indicators, trends, actions, escaping, events and splitting."""

from __future__ import annotations

import html
import math
import re
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.indicators import (
    Verdict,
    evaluate_indicators,
    evaluate_inference,
    make_verdict,
)
from services.core.schemas import (
    Ack,
    ActionRecord,
    AlignmentReport,
    AlignmentScores,
    Command,
    Effect,
    Event,
    EventKind,
    Expectation,
    MetricsMessage,
    ProbeFailure,
    ProbeReport,
    Proposal,
    Trigger,
)
from services.notifier.reports import (
    MESSAGES,
    action_report,
    actions_report,
    escape,
    event_report,
    progress_report,
    split_message,
    status_report,
    trend_arrow,
    utf16_length,
)

RUN = "run-1"
LANGUAGES = ("ru", "en")
HOSTILE = "<script>&"


def metrics(**overrides: object) -> MetricsMessage:
    values: dict = dict(run_id=RUN, step=1200, loss=0.8123, mel=0.41234, mel_postnet=0.38,
                        gate=0.0312, guided_attention=0.0045, objective=0.8168, grad_norm=3.2,
                        lr=1e-3, guided_attention_weight=2.5, clip_threshold=1.0,
                        step_seconds=0.4, finite=True, skipped_steps=0)
    values.update(overrides)
    return MetricsMessage(**values)


def scores(diagonality: float, quality: float, entropy: float = 0.3) -> AlignmentScores:
    return AlignmentScores(diagonality=diagonality, monotonicity=0.9, focus=0.6, coverage=0.8,
                           entropy=entropy, quality=quality)


def alignment(step: int, value: AlignmentScores) -> AlignmentReport:
    return AlignmentReport(run_id=RUN, snapshot_id=f"s{step}", step=step, scores=value,
                           per_sample=[value])


def record(stage: str = "measured", detail: str = "", note: str = "") -> ActionRecord:
    trigger = Trigger(rule="grad_explosion", metric="grad_norm", value=412.5, threshold=100.0,
                      window=50)
    command = Command(run_id=RUN, command_id="c1", action="set_lr", value=5e-4, source="tuner",
                      reason=trigger, note=note)
    ack = None if stage == "issued" else Ack(
        run_id=RUN, command_id="c1", action="set_lr", status="applied", step=1100,
        before=1e-3, after=5e-4, detail=detail)
    effect = None if stage != "measured" else Effect(
        metric="grad_norm", before=412.5, after=3.2, steps=100, recovered=True)
    return ActionRecord(run_id=RUN, action_id="a1", stage=stage, trigger=trigger,
                        command=command, ack=ack, effect=effect)


def verdict(grad: float = 3.2, diagonality: float = 0.05, restarts: int = 0,
            loss: float = 0.8168, quality: float = 42.0, probes: ProbeReport | None = None,
            step: int = 1200, first_met_step: int | None = None) -> Verdict:
    """A verdict as the trainer publishes it, with how each value was measured."""
    checks = evaluate_indicators(grad, diagonality, restarts, loss, quality) + \
        evaluate_inference(math.nan if probes is None else probes.stop_percent,
                           math.nan if probes is None else probes.median_diagonality)
    checks = [c.model_copy(update={"measured": f"measured <{c.name}> at step {step}"})
              for c in checks]
    return make_verdict(step, checks, first_met_step)


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.split("\n") if needle in line)


def indicator(text: str, words: dict[str, str], name: str) -> str:
    """The indicator line of ``name`` (an Indicator.name), without its indentation."""
    label = words[f"indicator_{name}"]
    return next(line.strip() for line in text.split("\n")
                if re.match(rf"\s*[✅❌⏳] {re.escape(label)}:", line))


# ---------------------------------------------------------------------------- progress


@pytest.mark.parametrize("language", LANGUAGES)
def test_progress_report_numbers_indicators_and_trends(language: str) -> None:
    text = progress_report(RUN, metrics(), alignment(1200, scores(0.05, 42.0, entropy=0.5)),
                           alignment(1000, scores(0.20, 30.0, entropy=0.3)), [], verdict(),
                           language)
    words = MESSAGES[language]
    assert "Smart Tuner V2" in text
    assert "📊 Gradient Norm: 3.2 " in text
    assert "🎯" in text and "Attention Diagonality: 0.050" in text
    assert "LR: 1.0e-03" in text
    assert "2.5" in line_with(text, "LR:")
    assert "0.8168" in text and "0.4123" in text  # objective, mel at 4 significant digits
    # Trends: diagonality fell (bad), quality rose (good), entropy rose (bad: lower is
    # better), monotonicity unchanged (flat).
    assert "↓🔴" in line_with(text, "Attention Diagonality")
    assert "42.0%" in line_with(text, words["score_quality"])
    assert "↑🟢" in line_with(text, words["score_quality"])
    assert "↑🔴" in line_with(text, words["score_entropy"])
    assert line_with(text, words["score_monotonicity"]).endswith("→")
    # Indicators: grad norm 3.2 met, diagonality 0.05 not, restarts 0 met, loss met,
    # quality 42 not; the thresholds come from the indicators module.
    checks = {c.name: c for c in evaluate_indicators(3.2, 0.05, 0, 0.8168, 42.0)}
    grad = indicator(text, words, "grad norm (pre-clip)")
    assert grad.strip().startswith("✅")
    assert escape(f"< {checks['grad norm (pre-clip)'].threshold:g}") in grad
    diag = indicator(text, words, "diagonality")
    assert diag.strip().startswith("❌") and "0.05" in diag
    assert escape(f"> {checks['diagonality'].threshold:g}") in diag
    assert indicator(text, words, "restarts").startswith("✅")
    assert indicator(text, words, "quality %").startswith("❌")
    # The plan's five, then the inference indicator's two measures (pending: no probes);
    # each says how it was measured, escaped.
    assert words["verdict_header"].format(step=1200, met=3, total=7) in text
    assert "— <i>measured &lt;diagonality&gt; at step 1200</i>" in diag
    assert indicator(text, words, "probes stop %").startswith("⏳")
    assert words["no_probes"] in text
    assert words["no_actions"] in text


def test_progress_report_no_actions_wording() -> None:
    ru = progress_report(RUN, metrics(), None, None, [], None, "ru")
    en = progress_report(RUN, metrics(), None, None, [], None, "en")
    assert "🛠️ <b>Выполненные действия</b>" in ru and "Действий не было" in ru
    assert "No actions taken" in en


@pytest.mark.parametrize("language", LANGUAGES)
def test_progress_report_without_alignment_marks_pending(language: str) -> None:
    text = progress_report(RUN, metrics(grad_norm=float("nan"), finite=False, skipped_steps=2),
                           None, None, [], None, language)
    words = MESSAGES[language]
    assert words["no_alignment"] in text
    assert "Gradient Norm: NaN" in text
    assert words["no_verdict"] in text  # no evaluation yet: nothing is judged here
    assert words["non_finite"].format(skipped=2) in text
    judged = progress_report(RUN, metrics(), None, None, [], verdict(
        grad=math.nan, restarts=1, first_met_step=900), language)
    grad = indicator(judged, words, "grad norm (pre-clip)")
    assert grad.strip().startswith("⏳")
    assert indicator(judged, words, "restarts").startswith("❌")
    assert words["verdict_first_met"].format(step=900) in judged


@pytest.mark.parametrize("language", LANGUAGES)
def test_progress_report_lists_actions(language: str) -> None:
    words = MESSAGES[language]
    actions = [record("measured"), record("issued")]
    text = progress_report(RUN, metrics(), None, None, actions, None, language)
    lines = [line for line in text.split("\n") if "grad_explosion" in line]
    assert len(lines) == 2
    measured, issued = lines
    assert "412.5" in measured and "100" in measured and "set_lr" in measured
    assert "1.0e-03 → 5.0e-04" in measured
    assert words["action_ack"].format(status=words["status_applied"]) in measured
    assert "grad_norm 412.5 → 3.2" in measured and measured.endswith("✅")
    assert "→ 5.0e-04" in issued and words["action_no_ack"] in issued
    assert words["no_actions"] not in text


def test_progress_report_caps_actions() -> None:
    text = progress_report(RUN, metrics(), None, None, [record()] * 13, None, "en")
    assert text.count("grad_explosion") == 10
    assert "… and 3 earlier" in text


# ---------------------------------------------------------------------------- actions


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("stage", ["issued", "acked", "measured"])
def test_action_report_stages(language: str, stage: str) -> None:
    words = MESSAGES[language]
    text = action_report(record(stage, detail="lr lowered"), language)
    assert words[f"stage_{stage}"] in text
    assert "grad_explosion" in text and "412.5" in text and "100" in text and "50" in text
    assert "set_lr 5.0e-04" in text
    if stage == "issued":
        assert words["ack_pending"] in text and words["effect_pending"] in text
    else:
        assert words["status_applied"] in text and "1.0e-03 → 5.0e-04" in text
        assert "lr lowered" in text
    if stage == "measured":
        assert "412.5 → 3.2" in text and words["recovered_yes"] in text
        assert "100" in line_with(text, "📈")
    elif stage == "acked":
        assert words["effect_pending"] in text


DEADLINE = 1_764_079_509.0  # 14:05:09 UTC


def supervised(stage: str, resolution: str | None = None, by: str = "") -> ActionRecord:
    """``record(stage)`` of a supervised action: its proposal, and how it was decided."""
    base = record("issued" if stage in ("proposed", "rejected", "dropped") else stage)
    proposal = Proposal(deadline=DEADLINE, on_timeout="drop", current=1e-3,
                        expected=Expectation(metric="grad_norm", before=412.5, target=100.0,
                                             recovered_when="below", within_steps=100))
    return base.model_copy(update={"stage": stage, "proposal": proposal,
                                   "resolution": resolution, "decided_by": by})


@pytest.mark.parametrize("language", LANGUAGES)
def test_proposal_report(language: str) -> None:
    words = MESSAGES[language]
    text = action_report(supervised("proposed"), language)
    assert text.startswith(words["proposal_title"])
    assert RUN in text and "grad_explosion" in text and "412.5" in text
    assert "set_lr 1.0e-03 → 5.0e-04" in line_with(text, "⚙️")
    expected = line_with(text, "🎯")
    assert "grad_norm 412.5 → " in expected and words["expect_below"] + " 100" in expected
    assert "100" in expected.split(words["expect_below"])[1]
    deadline = line_with(text, "⏳")
    assert "14:05:09" in deadline and words["timeout_drop"] in deadline
    assert words["ack_pending"] not in text  # nothing is sent before an answer
    listing = actions_report(RUN, [supervised("proposed")], language)
    assert words["action_awaiting"].format(deadline="14:05:09") in listing


@pytest.mark.parametrize("language", LANGUAGES)
def test_supervised_action_says_how_it_was_decided(language: str) -> None:
    words = MESSAGES[language]
    rejected = action_report(supervised("rejected", "rejected", "telegram:7@7"), language)
    assert words["stage_rejected"] in rejected
    assert words["resolution_rejected"].format(by="telegram:7@7") in rejected
    assert words["ack_pending"] not in rejected and words["effect_pending"] not in rejected
    dropped = action_report(supervised("dropped", "timeout_dropped", "timeout"), language)
    assert words["resolution_timeout_dropped"] in dropped
    acked = action_report(supervised("acked", "approved", "<telegram:7@7>"), language)
    assert words["status_applied"] in acked and "&lt;telegram:7@7&gt;" in acked
    assert words["resolution_approved"].format(by="&lt;telegram:7@7&gt;") in acked
    listing = actions_report(RUN, [supervised("acked", "timeout_applied", "timeout")],
                             language)
    assert words["resolution_timeout_applied"] in listing
    assert words["action_ack"].format(status=words["status_applied"]) in listing
    # an unsupervised action reads as before
    assert words["resolution"].split("{")[0] not in action_report(record("acked"), language)


def test_html_escaping_of_data() -> None:
    assert escape(HOSTILE) == "&lt;script&gt;&amp;"
    progress = progress_report(HOSTILE, metrics(), None, None, [], None, "en")
    action = action_report(record(detail=HOSTILE, note=HOSTILE), "ru")
    event = event_report(Event(run_id=RUN, event="critical", severity="critical",
                               detail=HOSTILE, data={HOSTILE: HOSTILE}), "en")
    for text in (progress, action, event):
        assert "<script>" not in text and "&lt;script&gt;&amp;" in text
        assert not re.search(r"&(?!lt;|gt;|amp;)", text)


# ---------------------------------------------------------------------------- events


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", get_args(EventKind))
def test_every_event_kind_renders(language: str, kind: str) -> None:
    text = event_report(Event(run_id=RUN, event=kind, step=7, detail="why",
                              data={"restarts": 2, "extra": [1, 2]}), language)
    assert RUN in text and "why" in text and "7" in text
    assert MESSAGES[language]["key_restarts"] + ": 2" in text


@pytest.mark.parametrize("language", LANGUAGES)
def test_red_flag_recovery_and_finished_summary(language: str) -> None:
    words = MESSAGES[language]
    trigger = Trigger(rule="diag_collapse", metric="diagonality", value=0.05, threshold=0.1,
                      window=500)
    flag = event_report(Event(run_id=RUN, event="red_flag", severity="critical", step=9,
                              detail="attention collapsed",
                              data={"rule": "diag_collapse", "source": "tuner",
                                    "trigger": trigger.model_dump(mode="json")}), language)
    assert flag.startswith("🚨") and "diag_collapse" in flag and "0.05" in flag
    assert "500" in line_with(flag, "📍")
    recovered = event_report(Event(run_id=RUN, event="recovered", detail="ok"), language)
    assert recovered.startswith("✅")
    critical_stop = event_report(Event(run_id=RUN, event="stopped", severity="critical"),
                                 language)
    assert critical_stop.startswith("🚨")
    checks = evaluate_indicators(3.2, 0.8, 0, 0.5, 50.0)
    finished = event_report(Event(run_id=RUN, event="finished", step=10000, data={
        "all_indicators_met": False, "stop_reason": "max_steps",
        "indicators": [c.model_dump() for c in checks], "step": 10000}), language)
    assert words["summary_header"].format(met=4, total=5) in finished
    assert indicator(finished, words, "quality %").startswith("❌")
    assert f"{words['key_all_indicators_met']}: {words['no']}" in finished
    assert "max_steps" in finished


def test_message_tables_have_the_same_keys() -> None:
    assert MESSAGES["ru"].keys() == MESSAGES["en"].keys()


# ---------------------------------------------------------------------------- trends


def test_trend_arrow() -> None:
    assert trend_arrow(None, 0.5, True, 0.01) == ""
    assert trend_arrow(0.5, 0.505, True, 0.01) == "→"
    assert trend_arrow(0.4, 0.5, True, 0.01) == "↑🟢"
    assert trend_arrow(0.5, 0.4, True, 0.01) == "↓🔴"
    assert trend_arrow(0.5, 0.4, False, 0.01) == "↓🟢"
    assert trend_arrow(0.4, 0.5, False, 0.01) == "↑🔴"
    assert trend_arrow(float("nan"), 0.5, True, 0.01) == ""


# ---------------------------------------------------------------------------- splitting


def non_blank_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def test_split_short_message_is_one_chunk() -> None:
    text = progress_report(RUN, metrics(), None, None, [record()], None, "ru")
    assert split_message(text) == [text]
    assert split_message("") == [] and split_message("\n \n") == []


def test_split_cyrillic_and_emoji_by_utf16_units() -> None:
    line = "🚨 Диагональность упала 📉"  # each emoji is two UTF-16 units
    text = "\n".join([line] * 320)
    assert len(text) < utf16_length(text) and utf16_length(text) > 2 * 4096
    chunks = split_message(text)
    assert len(chunks) > 1
    assert all(0 < utf16_length(chunk) <= 4096 for chunk in chunks)
    assert "\n".join(chunks) == text


def test_split_overlong_line_strips_tags_and_keeps_entities_whole() -> None:
    line = "<b>" + "😀&ж>" * 50 + "</b>"
    chunks = split_message(f"head\n{line}\ntail", limit=40)
    assert chunks[0] == "head" and chunks[-1] == "tail"
    middle = chunks[1:-1]
    assert all(utf16_length(chunk) <= 40 for chunk in middle)
    assert "".join(html.unescape(chunk) for chunk in middle) == "😀&ж>" * 50
    assert all(escape(html.unescape(chunk)) == chunk for chunk in middle)


def test_split_rejects_tiny_limit() -> None:
    with pytest.raises(ValueError):
        split_message("abc", limit=4)


# At most 15 characters of at most 2 UTF-16 units each: no line exceeds the smallest limit.
LINE = st.text(alphabet=st.sampled_from(list("ab <>&жЖ😀🚨\u00e9 ")), max_size=15)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(LINE, max_size=40), limit=st.integers(min_value=30, max_value=200))
def test_split_property(lines: list[str], limit: int) -> None:
    text = "\n".join(lines)
    chunks = split_message(text, limit)
    assert all(chunk.strip() and utf16_length(chunk) <= limit for chunk in chunks)
    # No line is overlong (see LINE): text is only cut at newlines.
    assert non_blank_lines("\n".join(chunks)) == non_blank_lines(text)
    if all(line.strip() for line in lines):
        assert "\n".join(chunks) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab<>&ж😀\n")), max_size=400),
       limit=st.integers(min_value=5, max_value=60))
def test_split_property_with_overlong_lines(text: str, limit: int) -> None:
    chunks = split_message(text, limit)
    assert all(chunk.strip() and utf16_length(chunk) <= limit for chunk in chunks)


def probe_report(stop_percent: float = 50.0, diagonality: float = 0.55) -> ProbeReport:
    """Twelve probes; the failures are the ones that did not stop or overran."""
    failures = [ProbeFailure(probe_id="ru-long", kind="long sentence", stopped=False,
                             length_ratio=2.2, diagonality=0.41),
                ProbeFailure(probe_id="ru-short", kind="short phrase", stopped=True,
                             length_ratio=3.1, diagonality=0.6)]
    return ProbeReport(checkpoint_step=400, n=12, stop_percent=stop_percent,
                       median_diagonality=diagonality, median_quality=70.0,
                       relative_wer=0.12, seconds=9.5, failures=failures)


@pytest.mark.parametrize("language", LANGUAGES)
def test_progress_report_shows_the_inference_probes(language: str) -> None:
    words = MESSAGES[language]
    text = progress_report(RUN, metrics(), alignment(1200, scores(0.9, 88.0)), None, [],
                           verdict(diagonality=0.9, quality=88.0, probes=probe_report()),
                           language, probe_report())
    assert words["probes_header"].format(step=400) in text
    assert words["probes_summary"].format(stopped=10, n=12, diagonality="0.550") in text
    assert "+0.12" in line_with(text, "espeak-ng")
    assert "ru-long" in line_with(text, words["probes_not_stopped"])
    assert "ru-short" in line_with(text, words["probes_bad_length"].format(ratio="3.1"))
    # 50 % of probes stop (< 90) and 0.55 (< 0.7): both inference measures unmet.
    assert indicator(text, words, "probes stop %").strip().startswith("❌")
    assert indicator(text, words, "inference diagonality").strip().startswith("❌")
    spoken_verdict = verdict(diagonality=0.9, quality=88.0, probes=probe_report(100.0, 0.9))
    spoken = progress_report(RUN, metrics(), alignment(1200, scores(0.9, 88.0)), None, [],
                             spoken_verdict, language, probe_report(100.0, 0.9))
    assert indicator(spoken, words, "probes stop %").strip().startswith("✅")
    status = status_report(RUN, metrics(), alignment(1200, scores(0.9, 88.0)), None, 0,
                           language, spoken_verdict)
    assert words["status_verdict"].format(step=1200, met=7, total=7) in status
    assert words["no_verdict"] in status_report(RUN, metrics(), None, None, 0, language)


@pytest.mark.parametrize("language", LANGUAGES)
def test_probes_event_lists_what_failed(language: str) -> None:
    words = MESSAGES[language]
    report = probe_report()
    event = Event(run_id=RUN, event="probes", severity="warning", step=410,
                  detail="probes at step 400: 50% stop (10/12)",
                  data=report.model_dump(mode="json"))
    text = event_report(event, language)
    assert text.startswith(words["event_probes"])
    assert "probes at step 400: 50% stop (10/12)" in text
    assert "ru-long" in text and "ru-short" in text
    assert "checkpoint_step" not in text  # the data is shown as lines, not raw keys
