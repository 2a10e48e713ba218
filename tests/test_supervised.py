"""Supervised mode (issue 12): the tuner proposes, a person answers, silence applies or drops.

The tuner runs against the real Redis with the real rules; answers arrive on the run's
approvals stream as the bot writes them (``RunStore.answer``). The bot's side, buttons
pressed through the Telegram stand-in, is at the end of the file.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from services.core.runstore import RunStore
from services.core.schemas import (
    Ack,
    ActionRecord,
    Approval,
    Command,
    Event,
    Message,
    Proposal,
    Trigger,
    decode,
    encode,
)
from services.core.streams import RUNS_KEY, Stream, stream_key, tuner_key
from services.notifier.planner import ReportPlanner
from services.notifier.reports import MESSAGES
from services.tuner import policy
from services.tuner.config import (
    COMMAND_RULES,
    TunerConfig,
    TunerConfigError,
    load_tuner_config,
)
from services.tuner.service import ACTIONS_KEY, TunerService
from tests.notifier_harness import RunningNotifier, notifier_settings
from tests.telegram_stand_in import RecordedCall, TelegramStandIn
from tests.test_tuner_service import publish, step_metrics

TIMEOUT_S = 60.0


def supervised_config(on_timeout: str = "apply", **supervised: object) -> TunerConfig:
    """Small windows (a handful of messages fire grad_norm), supervision on."""
    return TunerConfig.model_validate({
        "grad_norm": {"window": 5, "min_above": 3, "cooldown_steps": 50,
                      "recover_window": 10},
        "service": {"metrics_window": 60, "measure_after_steps": 5},
        "supervised": {"enabled": True, "timeout_s": TIMEOUT_S, "on_timeout": on_timeout,
                       **supervised},
    })


class Clock:
    """A settable clock for the tuner (deadlines without waiting for them)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def tuner(client: redis.Redis, run_id: str, config: TunerConfig,
          clock: Clock | None = None) -> TunerService:
    """A tuner on its own group, watching only ``run_id``."""
    return TunerService(client, config, group=f"tuner-{run_id}", consumer="tuner-1",
                        runs=[run_id], clock=clock or time.time)


def explode(client: redis.Redis, run_id: str, steps: range) -> None:
    for step in steps:
        publish(client, run_id, Stream.METRICS, step_metrics(run_id, step, grad=500.0))


def read(client: redis.Redis, run_id: str, stream: Stream, schema: type[Message]) -> list:
    return [decode(fields, schema) for _, fields in client.xrange(stream_key(run_id, stream))]


def drive(service: TunerService, rounds: int = 3) -> None:
    for _ in range(rounds):
        service.run_once(block_ms=10)


def stages(client: redis.Redis, run_id: str) -> list[str]:
    return [r.stage for r in read(client, run_id, Stream.ACTIONS, ActionRecord)]


def answer(client: redis.Redis, run_id: str, action_id: str, approved: bool,
           by: str = "telegram:1001@1001") -> Approval:
    """An answer written the way the bot writes it."""
    approval = Approval(run_id=run_id, action_id=action_id, approved=approved, by=by)
    RunStore(client).answer(approval)
    return approval


def proposed(client: redis.Redis, run_id: str) -> ActionRecord:
    """The one proposal of the run so far."""
    [record] = [r for r in read(client, run_id, Stream.ACTIONS, ActionRecord)
                if r.stage == "proposed"]
    return record


# ---------------------------------------------------------------------------- settings


def test_settings_default_off_and_name_a_bad_rule(tmp_path: Path) -> None:
    default = TunerConfig().supervised
    assert not default.enabled and not default.needs_approval("grad_norm")
    assert default.timeout_s == 600.0 and default.on_timeout == "apply"
    assert "restarts" not in default.rules and "grad_norm" in default.rules
    bad = tmp_path / "tuner.toml"
    bad.write_text('[supervised]\nenabled = true\nrules = ["grad_norm", "gradnorm"]\n')
    with pytest.raises(TunerConfigError, match=r"supervised\.rules.*gradnorm"):
        load_tuner_config(bad)
    bad.write_text('[supervised]\non_timeout = "ask again"\n')
    with pytest.raises(TunerConfigError, match=r"supervised\.on_timeout"):
        load_tuner_config(bad)


def test_rule_names_are_the_policys_command_rules() -> None:
    """The config spells the rule names (the policy imports it); they must be the policy's."""
    names = {rule.__name__.lstrip("_") for rule in policy._COMMAND_RULES}
    assert names | {policy.RULE_RESTARTS} == COMMAND_RULES


# ---------------------------------------------------------------------------- the tuner


def test_a_supervised_rule_proposes_instead_of_commanding(client: redis.Redis,
                                                          run_id: str) -> None:
    explode(client, run_id, range(10))
    service = tuner(client, run_id, supervised_config())
    before = time.time()
    drive(service)
    assert read(client, run_id, Stream.COMMANDS, Command) == []
    record = proposed(client, run_id)
    assert stages(client, run_id) == ["proposed"]
    assert record.command.action == "set_lr" and record.command.value == pytest.approx(5e-4)
    assert record.trigger.rule == "grad_norm" and record.trigger.value == 500.0
    proposal = record.proposal
    assert proposal is not None and proposal.on_timeout == "apply"
    assert proposal.deadline == pytest.approx(before + TIMEOUT_S, abs=30)
    assert proposal.current == pytest.approx(1e-3)
    expected = proposal.expected
    assert expected is not None and (expected.metric, expected.target) == ("grad_norm", 100.0)
    assert expected.recovered_when == "below" and expected.within_steps == 5
    # the red flag itself is not a command: it goes out at once
    assert [e.event for e in read(client, run_id, Stream.EVENTS, Event)] == ["red_flag"]
    # the proposal is in flight: more bad steps do not propose again
    explode(client, run_id, range(10, 30))
    drive(service)
    assert stages(client, run_id) == ["proposed"]
    assert service.proposals_made == 1 and service.commands_issued == 0
    assert client.hlen(tuner_key(run_id, ACTIONS_KEY)) == 1


def test_an_unsupervised_rule_still_commands(client: redis.Redis, run_id: str) -> None:
    explode(client, run_id, range(10))
    drive(tuner(client, run_id, supervised_config(rules=["plateau"])))
    assert [c.action for c in read(client, run_id, Stream.COMMANDS, Command)] == ["set_lr"]
    assert stages(client, run_id) == ["issued"]


def test_approval_sends_the_command_and_the_trail_goes_on(client: redis.Redis,
                                                          run_id: str) -> None:
    explode(client, run_id, range(10))
    service = tuner(client, run_id, supervised_config())
    drive(service)
    record = proposed(client, run_id)
    approval = answer(client, run_id, record.action_id, approved=True)
    drive(service, 1)
    [command] = read(client, run_id, Stream.COMMANDS, Command)
    assert command.command_id == record.action_id
    assert (command.action, command.value) == ("set_lr", record.command.value)
    assert command.expires_at is not None and command.expires_at > time.time()
    issued = read(client, run_id, Stream.ACTIONS, ActionRecord)[-1]
    assert (issued.stage, issued.resolution, issued.decided_by) == (
        "issued", "approved", approval.by)
    publish(client, run_id, Stream.ACKS, Ack(run_id=run_id, command_id=command.command_id,
                                             action="set_lr", status="applied", step=9,
                                             before=1e-3, after=5e-4))
    drive(service, 1)
    for step in range(30, 36):
        publish(client, run_id, Stream.METRICS, step_metrics(run_id, step, 2.0, lr=5e-4))
    drive(service, 2)
    trail = read(client, run_id, Stream.ACTIONS, ActionRecord)
    assert [r.stage for r in trail] == ["proposed", "issued", "acked", "measured"]
    assert all(r.resolution == "approved" and r.proposal is not None for r in trail[1:])
    # the answer read again (a restart) does nothing; a second answer is ignored, recorded
    second = answer(client, run_id, record.action_id, approved=False, by="telegram:5555@-2")
    for again in (approval, second):
        client.xadd(stream_key(run_id, Stream.APPROVALS), encode(again))
    drive(service, 1)
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == 1
    ignored = [e for e in read(client, run_id, Stream.EVENTS, Event)
               if e.event == "approval_ignored"]
    assert len(ignored) == 1 and ignored[0].data["by"] == second.by
    assert "already approved by telegram:1001@1001" in ignored[0].detail
    assert service.answers_ignored == 1


def test_rejection_sends_nothing_and_the_rule_cools_down(client: redis.Redis,
                                                         run_id: str) -> None:
    explode(client, run_id, range(10))
    service = tuner(client, run_id, supervised_config())
    drive(service)
    record = proposed(client, run_id)
    answer(client, run_id, record.action_id, approved=False)
    drive(service, 1)
    assert read(client, run_id, Stream.COMMANDS, Command) == []
    rejected = read(client, run_id, Stream.ACTIONS, ActionRecord)[-1]
    assert (rejected.stage, rejected.resolution) == ("rejected", "rejected")
    assert rejected.decided_by == "telegram:1001@1001"
    assert client.hlen(tuner_key(run_id, ACTIONS_KEY)) == 0
    # still exploding, but within the cooldown (50 steps from the rejection): no proposal
    explode(client, run_id, range(10, 55))
    drive(service)
    assert stages(client, run_id) == ["proposed", "rejected"]
    # after the cooldown the rule may ask again
    explode(client, run_id, range(55, 65))
    drive(service)
    assert stages(client, run_id) == ["proposed", "rejected", "proposed"]
    assert read(client, run_id, Stream.COMMANDS, Command) == []


@pytest.mark.parametrize("on_timeout", ["apply", "drop"])
def test_no_answer_by_the_deadline(client: redis.Redis, run_id: str, on_timeout: str) -> None:
    explode(client, run_id, range(10))
    clock = Clock()
    service = tuner(client, run_id, supervised_config(on_timeout), clock)
    drive(service)
    record = proposed(client, run_id)
    clock.now += TIMEOUT_S - 1
    drive(service, 1)
    assert stages(client, run_id) == ["proposed"]  # not yet
    clock.now += 2
    drive(service, 1)
    last = read(client, run_id, Stream.ACTIONS, ActionRecord)[-1]
    assert last.decided_by == "timeout"
    commands = read(client, run_id, Stream.COMMANDS, Command)
    if on_timeout == "apply":
        assert (last.stage, last.resolution) == ("issued", "timeout_applied")
        assert [c.command_id for c in commands] == [record.action_id]
        assert commands[0].expires_at == pytest.approx(clock.now + 300.0)
    else:
        assert (last.stage, last.resolution) == ("dropped", "timeout_dropped")
        assert commands == []
    # a late answer changes nothing and is recorded as ignored
    answer(client, run_id, record.action_id, approved=True)
    drive(service, 1)
    assert len(read(client, run_id, Stream.COMMANDS, Command)) == len(commands)
    [ignored] = [e for e in read(client, run_id, Stream.EVENTS, Event)
                 if e.event == "approval_ignored"]
    assert "timeout" in ignored.detail


def test_a_restarted_tuner_keeps_the_pending_proposal(client: redis.Redis,
                                                      run_id: str) -> None:
    explode(client, run_id, range(10))
    clock = Clock()
    first = tuner(client, run_id, supervised_config(), clock)
    drive(first)
    record = proposed(client, run_id)
    del first  # the tuner is gone; its proposal is in Redis
    second = tuner(client, run_id, supervised_config(), clock)
    explode(client, run_id, range(10, 20))
    drive(second)
    assert stages(client, run_id) == ["proposed"]  # in flight in the restored memory
    assert second.pending[run_id][record.action_id].record.stage == "proposed"
    answer(client, run_id, record.action_id, approved=True)
    drive(second, 1)
    assert [c.command_id for c in read(client, run_id, Stream.COMMANDS, Command)] == [
        record.action_id]
    assert stages(client, run_id) == ["proposed", "issued"]


def test_a_restart_after_the_deadline_settles_the_proposal(client: redis.Redis,
                                                           run_id: str) -> None:
    explode(client, run_id, range(10))
    clock = Clock()
    drive(tuner(client, run_id, supervised_config("drop"), clock))
    clock.now += TIMEOUT_S + 1
    drive(tuner(client, run_id, supervised_config("drop"), clock), 1)
    assert stages(client, run_id) == ["proposed", "dropped"]
    assert read(client, run_id, Stream.COMMANDS, Command) == []


# ---------------------------------------------------------------------------- the bot

CHAT = 1001  # a private chat in the allow-list; its user (1001) is an admin
GROUP = -1002  # a group in the allow-list
MEMBER = 3003  # a group member who is not an admin
OTHER_ADMIN = 5555
SENDS = ("sendMessage", "sendPhoto", "sendAudio", "sendDocument")


def _proposal_call(telegram: TelegramStandIn, chat_id: int, run_id: str) -> RecordedCall:
    """The bot's message to ``chat_id`` with the buttons of a proposal about ``run_id``
    (waits for it; the feed reports every run of the shared Redis)."""
    def find(_: list[RecordedCall]) -> RecordedCall | None:
        return next((c for c in telegram.calls("sendMessage", chat_id)
                     if c.status == 200 and c.params.get("reply_markup")
                     and run_id in str(c.params.get("text"))), None)

    telegram.wait_for(find, 30)
    call = find([])
    assert call is not None
    return call


def _message_id(telegram: TelegramStandIn, chat_id: int, call: RecordedCall) -> int:
    """The id the stand-in gave the bot's message ``call``: ids run in one sequence per chat
    for the bot's messages and the users' (none pushed to the chat before this)."""
    sent = [c for c in telegram.calls(None, chat_id)
            if c.method in SENDS and c.status == 200 and c.at <= call.at]
    return len(sent)


def _press(telegram: TelegramStandIn, chat_id: int, user_id: int, data: str,
           message_id: int) -> RecordedCall:
    """Press a button; returns the bot's answerCallbackQuery to that press."""
    mark = time.monotonic()
    telegram.push_callback(chat_id, user_id, data, message_id)

    def answered(_: list[RecordedCall]) -> RecordedCall | None:
        return next((c for c in telegram.calls("answerCallbackQuery") if c.at > mark), None)

    telegram.wait_for(answered, 30)
    call = answered([])
    assert call is not None
    return call


def _sent_text(telegram: TelegramStandIn, chat_id: int, *parts: str,
               after: float = 0.0) -> str:
    """The first text sent to ``chat_id`` after ``after`` that contains every part (waits)."""
    def find(_: list[RecordedCall]) -> str | None:
        return next((str(c.params["text"]) for c in telegram.calls("sendMessage", chat_id)
                     if c.at > after and c.status == 200
                     and all(part in str(c.params.get("text")) for part in parts)), None)

    telegram.wait_for(find, 30)
    text = find([])
    assert text is not None
    return text


def _propose(client: redis.Redis, run_id: str) -> tuple[TunerService, ActionRecord]:
    """A supervised tuner that has just proposed lowering the LR of an exploding run."""
    client.sadd(RUNS_KEY, run_id)
    explode(client, run_id, range(10))
    service = tuner(client, run_id, supervised_config())
    drive(service)
    return service, proposed(client, run_id)


def test_admin_approves_with_the_button(client: redis.Redis, run_id: str,
                                        telegram: TelegramStandIn, redis_url: str,
                                        tmp_path: Path) -> None:
    words = MESSAGES["en"]
    settings = notifier_settings(telegram, tmp_path, chat_ids=(CHAT, GROUP),
                                 admin_ids=(CHAT, OTHER_ADMIN), language="en",
                                 report_every_steps=1_000_000)
    store = RunStore(client)
    with RunningNotifier(settings, redis_url, telegram):
        service, record = _propose(client, run_id)
        call = _proposal_call(telegram, CHAT, run_id)
        text = call.params["text"]
        assert "The tuner proposes a change" in text and run_id in text
        assert "grad_norm — grad_norm = 500, threshold 100" in text
        assert "set_lr 1.0e-03 → 5.0e-04" in text
        assert "grad_norm 500 → below 100 within 5 steps" in text
        assert "without an answer the change will be applied" in text
        buttons = call.params["reply_markup"]["inline_keyboard"][0]
        assert [b["text"] for b in buttons] == [words["approve"], words["reject"]]
        approve = buttons[0]["callback_data"]
        assert approve.startswith("approve:") and len(approve.encode()) <= 64
        assert record.action_id not in approve  # a token, looked up, not the ids
        assert _proposal_call(telegram, GROUP, run_id)  # every allowed chat is asked
        message_id = _message_id(telegram, CHAT, call)

        # a non-admin's press is refused with an alert and writes nothing
        refused = _press(telegram, GROUP, MEMBER, approve, message_id=1)
        assert refused.params["text"] == words["refused_admin"]
        assert refused.params["show_alert"] is True
        assert client.xlen(stream_key(run_id, Stream.APPROVALS)) == 0
        # a forged token is unknown
        forged = _press(telegram, CHAT, CHAT, "approve:0123456789abcdef", message_id)
        assert forged.params["text"] == words["approval_unknown"]

        # the admin approves: the answer goes to the tuner, the message says who decided
        mark = time.monotonic()
        answered = _press(telegram, CHAT, CHAT, approve, message_id)
        assert answered.params["text"] == words["approval_sent"]
        [approval] = read(client, run_id, Stream.APPROVALS, Approval)
        assert (approval.action_id, approval.approved, approval.by) == (
            record.action_id, True, f"telegram:{CHAT}@{CHAT}")
        telegram.wait_for(lambda _: any(c.at > mark for c in
                                        telegram.calls("editMessageText", CHAT)), 30)
        [edit] = [c for c in telegram.calls("editMessageText", CHAT) if c.at > mark]
        assert edit.status == 200 and edit.params["message_id"] == message_id
        assert "Approved by @tester" in edit.params["text"]
        assert "set_lr 1.0e-03 → 5.0e-04" in edit.params["text"]
        assert not edit.params.get("reply_markup")  # the buttons are gone

        # the tuner sends the command; the trail goes on as without supervision
        drive(service, 1)
        [command] = read(client, run_id, Stream.COMMANDS, Command)
        assert command.command_id == record.action_id and command.action == "set_lr"
        publish(client, run_id, Stream.ACKS, Ack(run_id=run_id, command_id=command.command_id,
                                                 action="set_lr", status="applied", step=9,
                                                 before=1e-3, after=5e-4))
        drive(service, 1)
        assert stages(client, run_id) == ["proposed", "issued", "acked"]
        acked = _sent_text(telegram, CHAT, "trainer answered", run_id)
        assert f"Decision: approved (telegram:{CHAT}@{CHAT})" in acked

        # another admin pressing later is told it is decided; nothing more is written
        late = _press(telegram, GROUP, OTHER_ADMIN, approve, message_id=1)
        assert late.params["text"] == words["approval_decided"].format(
            resolution=f"approved (telegram:{CHAT}@{CHAT})")
        assert client.xlen(stream_key(run_id, Stream.APPROVALS)) == 1
        # /actions shows the decision and how the proposal was decided
        latest = store.latest_actions(run_id, 5)
        assert [r.stage for r in latest] == ["acked"]
        mark = time.monotonic()
        telegram.push_message(CHAT, f"/actions {run_id}")
        listing = _sent_text(telegram, CHAT, "Latest tuner actions", after=mark)
        assert f"approved (telegram:{CHAT}@{CHAT}) · ack: applied" in listing


def test_admin_rejects_in_russian(client: redis.Redis, run_id: str,
                                  telegram: TelegramStandIn, redis_url: str,
                                  tmp_path: Path) -> None:
    words = MESSAGES["ru"]
    settings = notifier_settings(telegram, tmp_path, chat_ids=(CHAT,), admin_ids=(CHAT,),
                                 language="ru", report_every_steps=1_000_000)
    with RunningNotifier(settings, redis_url, telegram):
        service, record = _propose(client, run_id)
        call = _proposal_call(telegram, CHAT, run_id)
        assert "Тюнер предлагает изменение" in call.params["text"]
        assert "set_lr 1.0e-03 → 5.0e-04" in call.params["text"]
        reject = call.params["reply_markup"]["inline_keyboard"][0][1]
        assert reject["text"] == words["reject"]
        mark = time.monotonic()
        answered = _press(telegram, CHAT, CHAT, reject["callback_data"],
                          _message_id(telegram, CHAT, call))
        assert answered.params["text"] == words["approval_sent"]
        telegram.wait_for(lambda _: any(c.at > mark for c in
                                        telegram.calls("editMessageText", CHAT)), 30)
        drive(service, 1)
        assert read(client, run_id, Stream.COMMANDS, Command) == []
        assert stages(client, run_id) == ["proposed", "rejected"]
        # the end of the proposal is reported too
        _sent_text(telegram, CHAT, run_id, words["stage_rejected"],
                   f"отклонено (telegram:{CHAT}@{CHAT})")
        assert record.action_id in {r.action_id for r in RunStore(client).latest_actions(
            run_id, 5)}


# ---------------------------------------------------------------------------- the planner


def test_the_planner_asks_at_once_and_reports_the_end() -> None:
    """A proposal is a notice with buttons at once; a rejected or dropped one is reported;
    an approved one goes on as an issued command (reported with its ack)."""
    trigger = Trigger(rule="grad_norm", metric="grad_norm", value=500.0, threshold=100.0,
                      window=5)
    command = Command(run_id="run-1", command_id="a1", action="set_lr", value=5e-4,
                      source="tuner", reason=trigger)
    proposal = Proposal(deadline=time.time() + 60, on_timeout="apply", current=1e-3)

    def stage(name: str, action_id: str = "a1", **extra: object) -> ActionRecord:
        return ActionRecord(run_id="run-1", action_id=action_id, stage=name, trigger=trigger,
                            command=command, proposal=proposal, **extra)

    clock = Clock()
    planner = ReportPlanner("en", 1000, 3600.0, issued_grace_s=10.0, clock=clock)
    [notice] = planner.observe(stage("proposed"))
    assert notice.proposal == "a1" and "The tuner proposes a change" in notice.text
    assert planner.observe(stage("proposed")) == []  # redelivered
    assert planner.observe(stage("issued", resolution="approved", decided_by="x")) == []
    assert planner.observe(stage("proposed")) == []  # late: the action is past it
    assert len(planner.observe(stage("proposed", "a2"))) == 1
    [rejected] = planner.observe(stage("rejected", "a2", resolution="rejected",
                                       decided_by="telegram:1@1"))
    assert rejected.proposal is None and "rejected (telegram:1@1)" in rejected.text
    clock.now += 11
    [late] = planner.tick()  # the approved command is reported as issued without an ack
    assert "command issued" in late.text and "approved (x)" in late.text


def test_the_api_answers_a_proposal_the_way_the_bot_does(client: redis.Redis, run_id: str,
                                                         redis_url: str) -> None:
    """POST /runs/{run}/approvals/{action}: bearer token, only a proposal awaiting an
    answer, written to the approvals stream that the tuner reads (real HTTP, real tuner)."""
    import httpx

    from services.tuner.api import create_app
    from tests.test_api import serve

    client.sadd(RUNS_KEY, run_id)  # a trainer's first publish puts it there
    explode(client, run_id, range(10))
    service = tuner(client, run_id, supervised_config())
    drive(service)
    record = proposed(client, run_id)
    token = "api-token-0123456789abcdef"
    auth = {"Authorization": f"Bearer {token}"}
    path = f"/runs/{run_id}/approvals/{record.action_id}"
    with serve(create_app(redis.Redis.from_url(redis_url), token)) as base, \
            httpx.Client(base_url=base, timeout=10) as http:
        assert http.post(path, json={"approved": True}).status_code == 401
        assert http.post(f"/runs/{run_id}/approvals/nope", headers=auth,
                         json={"approved": True}).status_code == 404
        assert http.post(path, headers=auth, json={"approved": "yes please"}
                         ).status_code == 422
        accepted = http.post(path, headers=auth, json={"approved": True})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["approval"]["by"] == "api"
        drive(service, 1)
        [command] = read(client, run_id, Stream.COMMANDS, Command)
        assert command.command_id == record.action_id
        # decided: no longer a proposal awaiting an answer
        assert http.post(path, headers=auth, json={"approved": False}).status_code == 404
