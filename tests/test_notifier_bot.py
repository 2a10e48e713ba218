"""The Telegram bot end to end: aiogram polling a Telegram Bot API stand-in over real HTTP,
commands answered from a real Redis, corrective commands obeyed by a real trainer that is
training in the background, and Alertmanager posting to the real webhook server.

Telegram itself cannot be reached from a test; the stand-in (tests/telegram_stand_in.py)
speaks its HTTP API, including its HTML checks and error answers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from services.core.bus import connect
from services.core.schemas import (
    ActionRecord,
    AttentionSnapshot,
    Command,
    Trigger,
    decode,
    encode,
)
from services.core.streams import Stream, stream_key
from services.diagnostics.reports import build_report
from services.notifier.reports import MESSAGES
from services.trainer.link import attach
from services.trainer.training import Trainer
from tests.conftest import make_small_config
from tests.notifier_harness import RunningNotifier, notifier_settings
from tests.telegram_stand_in import TEST_TOKEN, RecordedCall, TelegramStandIn

pytestmark = pytest.mark.slow

CHAT = 1001  # a private chat in the allow-list; its user (id 1001) is an admin
GROUP = -1002  # a group in the allow-list
MEMBER = 3003  # a group member who is not an admin
OTHER_ADMIN = 5555  # another admin, e.g. in the group
STRANGER = 999  # a private chat outside the allow-list
EN = MESSAGES["en"]


@dataclass
class System:
    telegram: TelegramStandIn
    notifier: RunningNotifier
    trainer: Trainer
    run_id: str
    client: object
    training: threading.Thread


def _texts(calls: list[RecordedCall]) -> list[str]:
    return [str(c.params.get("text") or c.params.get("caption") or "") for c in calls]


def _sent_after(telegram: TelegramStandIn, mark: float, chat_id: int,
                method: str = "sendMessage") -> list[RecordedCall]:
    return [c for c in telegram.calls(method, chat_id) if c.at > mark and c.status == 200]


def ask(system: System, text: str, chat_id: int = CHAT, user_id: int | None = None,
        until: str | None = None, method: str = "sendMessage", count: int = 1,
        timeout_s: float = 30.0) -> list[RecordedCall]:
    """Send ``text`` as a user and wait for ``count`` answers (containing ``until``)."""
    mark = time.monotonic()
    system.telegram.push_message(chat_id, text, user_id=user_id,
                                 chat_type="private" if chat_id > 0 else "group")

    def answered(_: list[RecordedCall]) -> bool:
        calls = _sent_after(system.telegram, mark, chat_id, method)
        hits = [c for c in calls if until is None or until in _texts([c])[0]]
        return len(hits) >= count

    system.telegram.wait_for(answered, timeout_s)
    return _sent_after(system.telegram, mark, chat_id, method)


@pytest.fixture(scope="module")
def system(small_corpus: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[System]:
    """A trainer training in the background, attached to Redis, and the notifier around it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the other core to the notifier and the stand-in
    runs = tmp_path_factory.mktemp("runs")
    run_id = f"bot-{uuid.uuid4().hex[:10]}"
    cfg = make_small_config()
    trainer = Trainer(cfg, small_corpus, runs / run_id, progress=False,
                      cache_dir=small_corpus / ".features", run_id=run_id)
    link = attach(trainer, redis_url, enqueue_scoring=False)
    training = threading.Thread(target=trainer.train, kwargs={"max_steps": 100_000},
                                daemon=True)
    training.start()
    client = connect(redis_url)
    snapshots = stream_key(run_id, Stream.ATTENTION)
    deadline = time.monotonic() + 120
    while not (client.xlen(snapshots) and trainer.checkpoints.entries()):
        assert time.monotonic() < deadline, "no snapshot and checkpoint in time"
        time.sleep(0.2)
    # The diagnostics worker's job, done inline: score the real snapshot.
    _, fields = client.xrange(snapshots)[0]
    report = build_report(decode(fields, AttentionSnapshot), worker="test")
    client.xadd(stream_key(run_id, Stream.DIAGNOSTICS), encode(report))
    telegram = TelegramStandIn(TEST_TOKEN).start()
    settings = notifier_settings(telegram, runs, chat_ids=(CHAT, GROUP),
                                 admin_ids=(CHAT, OTHER_ADMIN), language="en",
                                 report_every_steps=1_000_000)
    notifier = RunningNotifier(settings, redis_url, telegram).start()
    try:
        yield System(telegram, notifier, trainer, run_id, client, training)
    finally:
        trainer.request_stop()
        training.join(60)
        link.close()
        notifier.close()
        telegram.stop()
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- reading


def test_help_lists_every_command_and_marks_admin_ones(system: System) -> None:
    [reply] = ask(system, "/help")
    text = reply.params["text"]
    for command in ("/status", "/report", "/alignment", "/sample", "/actions", "/pause",
                    "/resume", "/stop", "/lr", "/ga", "/gate", "/spikeguard", "/skip",
                    "/rollback", "/help"):
        assert command in text
    assert EN["help_admin"].strip() in text
    assert reply.params["parse_mode"] == "HTML"


def test_bot_registered_its_command_menu(system: System) -> None:
    [menu] = system.telegram.calls("setMyCommands")
    names = [c["command"] for c in menu.params["commands"]]
    assert {"status", "lr", "stop", "sample"} <= set(names)


def test_status_shows_the_running_step(system: System) -> None:
    step = system.trainer.step
    [reply] = ask(system, "/status")
    text = reply.params["text"]
    assert system.run_id in text and "Gradient Norm" in text
    shown = int(text.split("· step ")[1].split()[0])
    assert shown >= step - 1
    assert "Success indicators" in text


def test_status_of_an_unknown_run(system: System) -> None:
    [reply] = ask(system, "/status no-such-run")
    assert "No run <code>no-such-run</code>" in reply.params["text"]


def test_report_has_losses_alignment_and_a_picture(system: System) -> None:
    mark = time.monotonic()
    replies = ask(system, "/report", until="Detailed report")
    text = next(t for t in _texts(replies) if "Detailed report" in t)
    assert "Attention Diagonality" in text and "Losses" in text
    photos = system.telegram.wait_for(
        lambda _: _sent_after(system.telegram, mark, CHAT, "sendPhoto"))
    photo = _sent_after(system.telegram, mark, CHAT, "sendPhoto")[0]
    assert photo.files["photo"].startswith(b"\x89PNG") and photos


def test_alignment_sends_the_png(system: System) -> None:
    [photo] = ask(system, "/alignment", method="sendPhoto")
    assert photo.files["photo"].startswith(b"\x89PNG")
    assert system.run_id in photo.params["caption"]


def test_actions_lists_the_tuner_decisions_latest_stage(system: System) -> None:
    trigger = Trigger(rule="grad_norm", metric="grad_norm", value=412.0, threshold=100.0,
                      window=8)
    command = Command(run_id=system.run_id, action="set_lr", value=5e-4, source="tuner",
                      reason=trigger)
    key = stream_key(system.run_id, Stream.ACTIONS)
    for stage in ("issued", "acked"):
        record = ActionRecord(run_id=system.run_id, action_id="act-1", stage=stage,
                              trigger=trigger, command=command)
        system.client.xadd(key, encode(record))
    replies = ask(system, "/actions 3", until="Latest tuner actions")
    text = next(t for t in _texts(replies) if "Latest tuner actions" in t)
    assert "grad_norm: grad_norm 412 (threshold 100) → set_lr" in text
    assert text.count("set_lr") == 1  # one line per decision, at its newest stage
    assert ask(system, "/actions 0", until="Usage")


def test_sample_speaks_with_the_latest_checkpoint(system: System) -> None:
    [audio] = ask(system, "/sample Hello there.", method="sendAudio", timeout_s=120)
    data = audio.files["audio"]
    assert data[:3] == b"ID3" or data[0] == 0xFF  # an MP3 stream
    assert len(data) > 1000
    assert audio.filenames["audio"].endswith(".mp3")
    assert system.run_id in audio.params["caption"] and "step" in audio.params["caption"]
    wait = [t for t in _texts(system.telegram.calls("sendMessage", CHAT)) if "Hello there." in t]
    assert wait  # the person is told it is coming


def test_unknown_command_points_to_help(system: System) -> None:
    [reply] = ask(system, "/frobnicate")
    assert reply.params["text"] == EN["unknown_command"]


# ---------------------------------------------------------------------------- access


def test_stranger_is_refused_politely_and_logged(system: System,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    before = system.client.xlen(stream_key(system.run_id, Stream.COMMANDS))
    with caplog.at_level(logging.INFO, logger="services.notifier.bot"):
        [reply] = ask(system, "/lr 1e-4", chat_id=STRANGER)
        system.telegram.push_message(STRANGER, "/status")
        registry = system.notifier.notifier.registry
        deadline = time.monotonic() + 10
        while registry.get_sample_value("smart_tuner_notifier_bot_refusals_unanswered_total",
                                        {"reason": "chat"}) != 1.0:
            assert time.monotonic() < deadline, "the second refusal was not rate-limited"
            time.sleep(0.05)
    assert reply.params["text"] == EN["refused_chat"]
    # One refusal a minute per chat: the second is logged and counted, not answered.
    assert len(system.telegram.calls("sendMessage", STRANGER)) == 1
    assert sum("999" in r.getMessage() and "allow-list" in r.getMessage()
               for r in caplog.records) == 2
    assert system.client.xlen(stream_key(system.run_id, Stream.COMMANDS)) == before
    registry = system.notifier.notifier.registry
    assert registry.get_sample_value("smart_tuner_notifier_bot_refusals_total",
                                     {"reason": "chat"}) >= 2


def test_non_admin_may_read_but_not_change(system: System) -> None:
    before = system.client.xlen(stream_key(system.run_id, Stream.COMMANDS))
    [reply] = ask(system, "/lr 1e-4", chat_id=GROUP, user_id=MEMBER)
    assert reply.params["text"] == EN["refused_admin"]
    [status] = ask(system, "/status", chat_id=GROUP, user_id=MEMBER)
    assert system.run_id in status.params["text"]
    assert system.client.xlen(stream_key(system.run_id, Stream.COMMANDS)) == before


# ---------------------------------------------------------------------------- commands


def _commands(system: System) -> list[Command]:
    return [decode(f, Command) for _, f in
            system.client.xrange(stream_key(system.run_id, Stream.COMMANDS))]


def test_lr_is_applied_and_the_ack_reported(system: System) -> None:
    replies = ask(system, "/lr 5e-4", until="Trainer ack", count=1)
    texts = _texts(replies)
    assert any("set_lr 5.0e-04" in t and "waiting" in t for t in texts)
    ack = next(t for t in texts if "Trainer ack" in t)
    assert "applied" in ack and "→ 5.0e-04" in ack
    command = _commands(system)[-1]
    assert (command.action, command.value, command.source) == ("set_lr", 5e-4, "bot")
    assert command.requested_by == f"telegram:{CHAT}@{CHAT}"
    assert command.expires_at is not None and command.expires_at > time.time()
    deadline = time.monotonic() + 30
    trainer = system.trainer
    while trainer.lr.value(trainer.step) != pytest.approx(5e-4):  # the trainer really uses it
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_ga_with_a_comma_decimal(system: System) -> None:
    replies = ask(system, "/ga 2,5", until="Trainer ack")
    ack = next(t for t in _texts(replies) if "Trainer ack" in t)
    assert "applied" in ack and "→ 2.5" in ack


@pytest.mark.parametrize(("text", "expected"), [
    ("/lr 1", "outside [1e-06, 0.01]"),
    ("/lr nan", "not a finite number"),
    ("/ga 1000", "outside [0, 50]"),
])
def test_out_of_bounds_values_are_refused_before_sending(system: System, text: str,
                                                         expected: str) -> None:
    before = len(_commands(system))
    [reply] = ask(system, text)
    assert expected in reply.params["text"] and "Not sent" in reply.params["text"]
    assert len(_commands(system)) == before


def test_skip_reaches_the_trainer_and_its_answer_comes_back(system: System) -> None:
    """The trainer of this rig has had no failed step: it answers why nothing was skipped."""
    replies = ask(system, "/skip 50", until="Trainer ack")
    command = _commands(system)[-1]
    assert (command.action, command.value) == ("skip_failed_batches", 50.0)
    ack = next(t for t in _texts(replies) if "Trainer ack" in t)
    assert "rejected" in ack and "nothing skipped" in ack
    [reply] = ask(system, "/skip 0")
    assert "outside [1, 10000]" in reply.params["text"]


def test_value_commands_need_a_number(system: System) -> None:
    [reply] = ask(system, "/lr fast")
    assert reply.params["text"] == EN["usage"].format(usage=EN["usage_lr"])


def test_pause_then_resume(system: System) -> None:
    replies = ask(system, "/pause", until="Trainer ack")
    assert "applied" in next(t for t in _texts(replies) if "Trainer ack" in t)
    deadline = time.monotonic() + 30
    while not system.trainer.paused:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    paused_at = system.trainer.step
    time.sleep(1.0)
    assert system.trainer.step == paused_at  # really paused
    replies = ask(system, "/resume", until="Trainer ack")
    assert "applied" in next(t for t in _texts(replies) if "Trainer ack" in t)
    deadline = time.monotonic() + 30
    while system.trainer.step == paused_at:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_rollback_answers_with_the_ack(system: System) -> None:
    replies = ask(system, "/rollback", until="Trainer ack")
    ack = next(t for t in _texts(replies) if "Trainer ack" in t)
    assert "applied" in ack or "rejected" in ack
    assert _commands(system)[-1].action == "rollback"


def test_webhook_alerts_reach_every_chat_once(system: System) -> None:
    payload = {
        "version": "4", "groupKey": "{}:{alertname=\"GradNormRedFlag\"}", "truncatedAlerts": 0,
        "status": "firing", "receiver": "telegram", "externalURL": "http://am:9093",
        "groupLabels": {"alertname": "GradNormRedFlag"},
        "commonLabels": {"alertname": "GradNormRedFlag", "severity": "critical"},
        "commonAnnotations": {}, "alerts": [{
            "status": "firing", "fingerprint": "f00d", "generatorURL": "http://prom",
            "startsAt": "2026-11-25T14:00:00.123456789Z", "endsAt": "0001-01-01T00:00:00Z",
            "labels": {"alertname": "GradNormRedFlag", "severity": "critical",
                       "run": system.run_id},
            "annotations": {"summary": "grad norm above 100",
                            "description": "pre-clip grad norm 412 for 1m"}}]}
    mark = time.monotonic()
    answer = httpx.post(f"{system.notifier.url}/alertmanager", json=payload, timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "delivered"
    for chat in (CHAT, GROUP):
        [message] = _sent_after(system.telegram, mark, chat)
        assert "GradNormRedFlag" in message.params["text"]
        assert "grad norm above 100" in message.params["text"]
    again = httpx.post(f"{system.notifier.url}/alertmanager", json=payload, timeout=10)
    assert again.json()["status"] == "duplicate"
    time.sleep(0.3)
    assert len(_sent_after(system.telegram, mark, CHAT)) == 1
    bad = httpx.post(f"{system.notifier.url}/alertmanager", json={"version": "3"}, timeout=10)
    assert bad.status_code == 422
    metrics = httpx.get(f"{system.notifier.url}/metrics", timeout=10).text
    assert 'smart_tuner_notifier_alerts_received_total{outcome="duplicate",status="firing"}' \
        ' 1.0' in metrics


# ---------------------------------------------------------------------------- /stop (last)


def test_stop_needs_the_askers_confirmation(system: System) -> None:
    [question] = ask(system, "/stop")
    buttons = question.params["reply_markup"]["inline_keyboard"][0]
    assert [b["text"] for b in buttons] == [EN["stop_yes"], EN["stop_no"]]
    yes = buttons[0]["callback_data"]
    before = len(_commands(system))
    # a non-admin may not press it, nor another admin; an unknown token has expired
    mark = time.monotonic()
    system.telegram.push_callback(CHAT, MEMBER, yes, message_id=1)
    system.telegram.push_callback(CHAT, OTHER_ADMIN, yes, message_id=1)
    system.telegram.push_callback(CHAT, CHAT, "stop:forged", message_id=1)
    answers = system.telegram.wait_for(
        lambda _: len([c for c in system.telegram.calls("answerCallbackQuery")
                       if c.at > mark]) >= 3)
    texts = [c.params.get("text") for c in answers
             if c.method == "answerCallbackQuery" and c.at > mark]
    assert EN["refused_admin"] in texts
    assert EN["confirm_other_user"] in texts and EN["confirm_expired"] in texts
    assert len(_commands(system)) == before and system.training.is_alive()
    # the asker confirms: the stop is sent, acked, and the trainer ends
    mark = time.monotonic()
    system.telegram.push_callback(CHAT, CHAT, yes, message_id=1)
    system.telegram.wait_for(lambda _: any("Trainer ack" in t for t in _texts(
        _sent_after(system.telegram, mark, CHAT))), 30)
    assert _commands(system)[-1].action == "stop"
    system.training.join(60)
    assert not system.training.is_alive()
    # a confirmation is good once
    mark = time.monotonic()
    system.telegram.push_callback(CHAT, CHAT, yes, message_id=1)
    system.telegram.wait_for(lambda _: any(
        c.params.get("text") == EN["confirm_expired"]
        for c in system.telegram.calls("answerCallbackQuery") if c.at > mark))


# ---------------------------------------------------------------------------- Russian


def test_russian_bot_answers_in_russian(telegram: TelegramStandIn, redis_url: str,
                                        tmp_path: Path) -> None:
    settings = notifier_settings(telegram, tmp_path, chat_ids=(CHAT,), language="ru")
    with RunningNotifier(settings, redis_url, telegram):
        ask_plain = System(telegram, None, None, "", None, None)  # type: ignore[arg-type]
        [help_reply] = ask(ask_plain, "/help")
        assert "команды" in help_reply.params["text"]
        [refusal] = ask(ask_plain, "/status", chat_id=STRANGER)
        assert refusal.params["text"] == MESSAGES["ru"]["refused_chat"]
        [unknown] = ask(ask_plain, "/что")
        assert unknown.params["text"] == MESSAGES["ru"]["unknown_command"]


def test_delivery_survives_a_429_on_a_reply(telegram: TelegramStandIn, redis_url: str,
                                            tmp_path: Path) -> None:
    settings = notifier_settings(telegram, tmp_path, chat_ids=(CHAT,), language="en")
    with RunningNotifier(settings, redis_url, telegram):
        telegram.fail_next("sendMessage", 429, retry_after=1)
        plain = System(telegram, None, None, "", None, None)  # type: ignore[arg-type]
        ask(plain, "/help")
        sends = telegram.calls("sendMessage", CHAT)
        assert [c.status for c in sends] == [429, 200]
        assert sends[1].at - sends[0].at >= 1.0

