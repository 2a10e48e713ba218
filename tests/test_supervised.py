"""Supervised mode (issue 12): the tuner proposes, a person answers, silence applies or drops.

The tuner runs against the real Redis with the real rules; answers arrive on the run's
approvals stream as the bot writes them (``RunStore.answer``). The bot's side, buttons
pressed through the Telegram stand-in, is at the end of the file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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
    MetricsMessage,
    decode,
    encode,
)
from services.core.streams import PREFIX, RUNS_KEY, Stream, stream_key, tuner_key
from services.tuner import policy
from services.tuner.config import (
    COMMAND_RULES,
    TunerConfig,
    TunerConfigError,
    load_tuner_config,
)
from services.tuner.service import ACTIONS_KEY, TunerService

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


@pytest.fixture
def client(redis_url: str, run_id: str) -> Iterator[redis.Redis]:
    """A client; the run's keys and its RUNS_KEY membership are removed afterwards."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    keys = list(connection.scan_iter(match=f"{PREFIX}:{run_id}:*"))
    if keys:
        connection.delete(*keys)
    connection.srem(RUNS_KEY, run_id)
    connection.close()


def tuner(client: redis.Redis, run_id: str, config: TunerConfig,
          clock: Clock | None = None) -> TunerService:
    """A tuner on its own group, watching only ``run_id``."""
    return TunerService(client, config, group=f"tuner-{run_id}", consumer="tuner-1",
                        runs=[run_id], clock=clock or time.time)


def publish(client: redis.Redis, run_id: str, stream: Stream, message: Message) -> None:
    client.xadd(stream_key(run_id, stream), encode(message))


def step_metrics(run_id: str, step: int, grad: float, lr: float = 1e-3) -> MetricsMessage:
    return MetricsMessage(run_id=run_id, step=step, loss=2.0, mel=1.0, mel_postnet=1.0,
                          gate=0.1, guided_attention=0.1, objective=2.0 - step * 0.01,
                          grad_norm=grad, lr=lr, guided_attention_weight=1.0,
                          clip_threshold=1.0, step_seconds=1.0, finite=True, skipped_steps=0)


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
