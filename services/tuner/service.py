"""The tuner service: feed each run's window from Redis, run the policy, publish its decisions.

For every known run (the set ``RUNS_KEY``) it reads the metrics, diagnostics, acks and
events streams with a consumer group, updates that run's ``RunWindow`` message by message
(in stream-id order across the four streams) and asks ``policy.decide`` what to do.
Commands go to the run's commands stream, events to its events stream, and the audit trail
to its actions stream: "issued" at once, "acked" when the trainer answers, "measured"
``measure_after_steps`` steps after the ack.

Exactly-once effects over at-least-once delivery: each command publish is one Redis
transaction that also records its idempotency key (run, rule, action, trigger step,
generation) in a per-run hash, the policy memory (cooldowns, latches, in-flight commands)
and the pending action. A tuner killed after publishing re-reads its pending entries on
restart, finds the key (and a cooldown in the restored memory) and does not issue again.
One tuner consumer per group acts on a run at a time; a second one is a standby that
takes over what a dead one left pending (XAUTOCLAIM).

Supervised mode (``[supervised]`` in the tuner config): a command of a listed rule is not
sent but proposed, an action record of stage "proposed" kept pending in Redis like an issued
command (so a restarted tuner keeps it, and the policy sees it in flight). People answer on
the run's approvals stream (the bot's buttons, through ``RunStore.answer``): an approval
sends the command ("issued", then "acked" and "measured" as always), a rejection ends it as
"rejected"; no answer by the deadline applies or drops it as ``on_timeout`` says. The first
answer wins; any later one is ignored and recorded as an ``approval_ignored`` event.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core.bus import Consumer, Delivery, connect, entry_order
from services.core.consumer import BLOCK_MS, LoopSettings, RunStreamReader
from services.core.logging import setup_logging
from services.core.retention import DAY_S, SWEEP_EVERY_S, RetentionSweeper
from services.core.schemas import (
    MAX_NOTE_CHARS,
    VALUE_ACTIONS,
    Ack,
    ActionRecord,
    AlignmentReport,
    Approval,
    Command,
    Event,
    Expectation,
    Message,
    MetricsMessage,
    Proposal,
    Resolution,
    VerdictMessage,
    encode,
)
from services.core.settings import ConfigError, get_settings
from services.core.streams import (
    Stream,
    maxlen_for,
    stream_key,
    tuner_key,
)
from services.tuner.config import TunerConfig, load_tuner_config
from services.tuner.exporter import TunerMetrics, metrics_port_from_env, serve
from services.tuner.policy import (
    Decision,
    Measure,
    apply_decision,
    command_id_for,
    decide,
    measure_effect,
    propose_decision,
    resolve_proposal,
)
from services.tuner.state import PolicyMemory, RunWindow

log = logging.getLogger(__name__)

DEFAULT_GROUP = "tuner"
DEFAULT_CONSUMER = "tuner-1"
# Every stream of a run the tuner reads: adding one here is all it takes to read it.
INPUT_STREAMS = (Stream.METRICS, Stream.DIAGNOSTICS, Stream.ACKS, Stream.EVENTS,
                 Stream.VERDICT, Stream.APPROVALS)
# The tuner's own per-run keys (beside the run's streams, under the same prefix).
MEMORY_KEY = "memory"  # PolicyMemory JSON
ISSUED_KEY = "issued"  # hash: idempotency key -> command id (or "event")
ACTIONS_KEY = "pending-actions"  # hash: command id -> PendingAction JSON
ANSWERED_KEY = "answered"  # hash: proposal id -> Answered JSON (how it was resolved)
TIMEOUT_BY = "timeout"  # decided_by of a proposal nobody answered in time


class PendingAction(BaseModel):
    """An issued command awaiting its ack or its measurement (kept in Redis)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    record: ActionRecord  # the latest stage published
    measure: Measure | None = None
    ack_step: int | None = None


class Answered(BaseModel):
    """How a proposal was resolved (kept in Redis): later answers are judged against it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: Resolution
    by: str
    answer_id: str | None = Field(None, description="the answer that decided; None: timeout")


@dataclass
class _Outgoing:
    """One decision on its way out: its messages, and the pending action of a command."""

    decision: Decision
    marker: str  # the command id, or "event"
    messages: list[tuple[Stream, Message]]
    pending: PendingAction | None = None


def _note(decision: Decision) -> str:
    """The command's reason in words, for people reading the commands or actions stream."""
    t = decision.trigger
    text = (f"{decision.rule}: {t.metric} {t.value:.4g} vs threshold {t.threshold:g} "
            f"(window {t.window}) at step {decision.step}")
    return text[:MAX_NOTE_CHARS]


def _current(window: RunWindow, action: str) -> float | None:
    """The value the setting a value command moves has now (the "before" of a proposal)."""
    if action not in VALUE_ACTIONS:
        return None
    return {"set_lr": window.lr, "set_guided_attention_weight": window.ga_weight,
            "set_grad_clip": window.clip_threshold,
            "set_gate_positive_weight": window.gate_weight,
            "set_spike_guard": window.spike_guard}.get(action)  # skip_failed_batches: none


def _expected(measure: Measure | None, steps: int) -> Expectation | None:
    """The decision's measure as the effect a person is told to expect."""
    if measure is None:
        return None
    return Expectation(metric=measure.metric, before=measure.before, target=measure.target,
                       recovered_when=measure.recovered_when, within_steps=steps)


class TunerService:
    """The loop around the policy; ``run_once`` is one poll-and-handle round."""

    def __init__(self, client: redis.Redis, config: TunerConfig, group: str = DEFAULT_GROUP,
                 consumer: str = DEFAULT_CONSUMER, runs: Iterable[str] | None = None,
                 clock: Callable[[], float] = time.time, metrics: TunerMetrics | None = None,
                 retention: RetentionSweeper | None = None):
        self.client = client
        self.metrics = metrics or TunerMetrics()
        self.config = config
        self.clock = clock
        service = config.service
        settings = replace(LoopSettings(), poll_count=service.poll_count,
                           claim_idle_ms=service.claim_idle_ms,
                           claim_every_s=service.claim_every_s)
        # runs None: discover runs from RUNS_KEY; else watch only these (one-run tuner, tests).
        self.reader = RunStreamReader(client, group, consumer, INPUT_STREAMS, settings,
                                      runs=runs, on_run=self._add_run, on_drop=self._drop_run)
        # Least recently active first; bounded by service.max_runs (see _keep_bounded).
        self.windows: OrderedDict[str, RunWindow] = OrderedDict()
        self.pending: dict[str, dict[str, PendingAction]] = {}
        self.retention = retention
        self._last_sweep = -float("inf")
        # Counters (a Prometheus exporter can read these attributes).
        self.decisions_by_rule: Counter[str] = Counter()
        self.commands_issued = 0
        self.proposals_made = 0
        self.answers_ignored = 0
        self.events_emitted = 0
        self.duplicates_suppressed = 0
        self.records_by_stage: Counter[str] = Counter()
        self.handler_errors = 0

    @property
    def consumer(self) -> Consumer:
        """The reader's consumer (a fresh one after a stream was deleted under it)."""
        return self.reader.consumer

    @property
    def _stream_of(self) -> dict[str, tuple[str, Stream]]:
        """Stream key -> (run id, stream) of every stream read."""
        return self.reader.sources

    @property
    def dead_lettered(self) -> int:
        """Entries moved to the dead-letter stream by this service's consumer."""
        return self.consumer.dead_lettered

    # ------------------------------------------------------------------ runs

    def discover_runs(self) -> list[str]:
        """Start watching runs not seen before; returns their ids."""
        return self.reader.discover()

    def _add_run(self, run_id: str) -> None:
        """Load a newly found run's policy memory and pending actions (its streams are the
        reader's to add)."""
        memory = None
        raw = self.client.get(tuner_key(run_id, MEMORY_KEY))
        if raw is not None:
            try:
                memory = PolicyMemory.model_validate_json(raw)
            except ValidationError as error:
                log.warning("run %s: stored policy memory unreadable, starting fresh: %s",
                            run_id, error)
        self.windows[run_id] = RunWindow(run_id, self.config, memory)
        pending: dict[str, PendingAction] = {}
        for field, value in self.client.hgetall(tuner_key(run_id, ACTIONS_KEY)).items():
            try:
                action = PendingAction.model_validate_json(value)
            except ValidationError as error:
                log.warning("run %s: dropping unreadable pending action %r: %s",
                            run_id, field, error)
                continue
            pending[action.record.action_id] = action
        self.pending[run_id] = pending
        log.info("watching run %s (%d pending actions)", run_id, len(pending))
        self._keep_bounded(keep=run_id)

    def _drop_run(self, run_id: str) -> None:
        """Forget a run that left the runs set (retention expired it)."""
        self.windows.pop(run_id, None)
        self.pending.pop(run_id, None)

    def _window(self, run_id: str) -> RunWindow:
        """The run's window, loaded again from its stored memory if it was let go."""
        if run_id not in self.windows:
            self._add_run(run_id)
        self.windows.move_to_end(run_id)
        return self.windows[run_id]

    def _keep_bounded(self, keep: str) -> None:
        """Beyond ``max_runs`` windows, let go of the least recently active runs that have no
        pending action (those must stay: their deadlines and expiries are checked every
        round). Ended runs go first."""
        excess = len(self.windows) - self.config.service.max_runs
        if excess <= 0:
            return
        idle = [run_id for run_id in self.windows
                if run_id != keep and not self.pending.get(run_id)]
        idle.sort(key=lambda run_id: not self.windows[run_id].memory.ended)  # stable
        for run_id in idle[:excess]:
            # Saved first: it may have been changed by the batch being handled.
            pipe = self.client.pipeline(transaction=False)
            self._save_memory(pipe, run_id)
            pipe.execute()
            self._drop_run(run_id)

    # ------------------------------------------------------------------ the loop

    def run_once(self, block_ms: int = BLOCK_MS) -> int:
        """One round: the reader's next batch (its own pending entries first after a start or
        a failure, then stale ones, then new ones), handled; returns how many entries."""
        return self._round(self.reader.step(block_ms))

    def run_forever(self, stop_event: threading.Event, block_ms: int = BLOCK_MS) -> None:
        """Rounds until ``stop_event`` is set, each poll waiting up to ``block_ms``; the reader
        rides out Redis outages."""
        self.reader.settings = replace(self.reader.settings, block_ms=block_ms)
        self.reader.run(stop_event, self._round)

    def _round(self, deliveries: list[Delivery]) -> int:
        """Handle one batch, then settle proposals past their deadline and expire unanswered
        commands (every round, even idle). Answers in the batch come first: one given before
        the deadline wins even when the tuner reads it late."""
        handled = self._process(deliveries)
        now = self.clock()
        self._settle_due(now)
        self._expire(now)
        if self.retention is not None and now - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = now
            if self.retention.sweep():
                self.reader.discover()  # let go of the expired runs now
        self.metrics.dead_lettered(self.consumer.dead_lettered)
        return handled

    def _process(self, deliveries: list[Delivery]) -> int:
        """Handle entries in arrival order, save touched runs' memory, then ack them."""
        if not deliveries:
            return 0
        deliveries.sort(key=lambda delivery: entry_order(delivery.entry_id))
        touched: set[str] = set()
        for delivery in deliveries:
            run_id, _ = self._stream_of[delivery.key]
            try:
                self._handle(run_id, delivery.message)
            except redis.RedisError:
                raise  # not the message's fault: leave it pending and retry
            except Exception as error:  # a bug must not wedge the run on one entry
                self.handler_errors += 1
                log.exception("run %s: handling %s failed", run_id, delivery.entry_id)
                self.consumer.dead_letter(delivery.key, delivery.entry_id,
                                          encode(delivery.message),
                                          f"handler error: {type(error).__name__}: {error}")
            touched.add(run_id)
        pipe = self.client.pipeline(transaction=False)
        for run_id in touched & self.windows.keys():
            self._save_memory(pipe, run_id)
        by_key: dict[str, list[str]] = {}
        for delivery in deliveries:
            by_key.setdefault(delivery.key, []).append(delivery.entry_id)
        for key, ids in by_key.items():
            pipe.xack(key, self.consumer.group, *ids)
        pipe.execute()
        return len(deliveries)

    def _handle(self, run_id: str, message: Message) -> None:
        """Update the run's window with one message, then act on the policy's decisions."""
        if message.run_id != run_id:
            raise ValueError(f"message of run {message.run_id!r} in a stream of run {run_id!r}")
        window = self._window(run_id)
        if isinstance(message, MetricsMessage):
            window.observe_metrics(message)
            self._measure_due(run_id, window)
        elif isinstance(message, AlignmentReport):
            window.observe_report(message)
        elif isinstance(message, Ack):
            window.observe_ack(message)
            self._on_ack(run_id, message)
        elif isinstance(message, Event):
            window.observe_event(message)
        elif isinstance(message, VerdictMessage):
            window.observe_verdict(message)
        elif isinstance(message, Approval):
            # A person's answer is acted on however late it is read (unlike history).
            self._on_approval(run_id, window, message)
        # Catching up on old history updates the window but must not act on the past.
        if self.clock() - message.ts > self.config.service.max_lag_s:
            return
        decisions = decide(window, self.config)
        if decisions:
            self._act(run_id, window, decisions)

    # ------------------------------------------------------------------ publishing

    def _save_memory(self, pipe: redis.client.Pipeline, run_id: str) -> None:
        key = tuner_key(run_id, MEMORY_KEY)
        pipe.set(key, self.windows[run_id].memory.model_dump_json(),
                 ex=self.config.service.issued_ttl_s)

    def _xadd(self, pipe: redis.client.Pipeline, run_id: str, stream: Stream,
              message: Message) -> None:
        key = stream_key(run_id, stream)
        pipe.xadd(key, encode(message), maxlen=maxlen_for(key), approximate=True)

    def _outgoing(self, run_id: str, window: RunWindow, decision: Decision) -> _Outgoing:
        """The messages one decision becomes; records it in the window (cooldown, latch)."""
        if decision.action is None:
            assert decision.event is not None
            event = Event(run_id=run_id, event=decision.event.event,
                          severity=decision.event.severity, step=decision.step,
                          detail=decision.event.detail,
                          data={"rule": decision.rule, "source": "tuner",
                                "trigger": decision.trigger.model_dump(mode="json")})
            apply_decision(window, decision)
            return _Outgoing(decision, "event", [(Stream.EVENTS, event)])
        if self.config.supervised.needs_approval(decision.rule):
            return self._proposal(run_id, window, decision)
        command_id = command_id_for(run_id, decision)
        command = Command(run_id=run_id, command_id=command_id, action=decision.action,
                          value=decision.value, source="tuner", reason=decision.trigger,
                          requested_by=f"tuner:{decision.rule}", note=_note(decision),
                          expires_at=self.clock() + self.config.service.command_ttl_s)
        record = ActionRecord(run_id=run_id, action_id=command_id, stage="issued",
                              trigger=decision.trigger, command=command)
        apply_decision(window, decision, command_id, command.expires_at)
        return _Outgoing(decision, command_id,
                         [(Stream.COMMANDS, command), (Stream.ACTIONS, record)],
                         PendingAction(record=record, measure=decision.measure))

    def _proposal(self, run_id: str, window: RunWindow, decision: Decision) -> _Outgoing:
        """A command decision put to a person: its "proposed" record, no command yet."""
        assert decision.action is not None
        supervised = self.config.supervised
        command_id = command_id_for(run_id, decision)
        deadline = self.clock() + supervised.timeout_s
        # The command as it will go out; stamped afresh (time, expiry) when it does.
        command = Command(run_id=run_id, command_id=command_id, action=decision.action,
                          value=decision.value, source="tuner", reason=decision.trigger,
                          requested_by=f"tuner:{decision.rule}", note=_note(decision),
                          expires_at=deadline + self.config.service.command_ttl_s)
        proposal = Proposal(deadline=deadline, on_timeout=supervised.on_timeout,
                            current=_current(window, decision.action),
                            expected=_expected(decision.measure,
                                               self.config.service.measure_after_steps))
        record = ActionRecord(run_id=run_id, action_id=command_id, stage="proposed",
                              trigger=decision.trigger, command=command, proposal=proposal)
        propose_decision(window, decision, command_id, deadline)
        return _Outgoing(decision, command_id, [(Stream.ACTIONS, record)],
                         PendingAction(record=record, measure=decision.measure))

    def _act(self, run_id: str, window: RunWindow, decisions: list[Decision]) -> None:
        """Publish one ``decide`` call's decisions: all in one transaction, each only once.

        One transaction, because a pair such as rollback -> set_lr must never be half-sent
        by a tuner that dies in between; "only once", because the idempotency key of each
        decision is checked in the same transaction that publishes it.
        """
        outgoing = [self._outgoing(run_id, window, decision) for decision in decisions]
        fresh = self._publish_once(run_id, outgoing)
        for item, published in zip(outgoing, fresh, strict=True):
            decision = item.decision
            self.decisions_by_rule[decision.rule] += 1
            if not published:
                self.duplicates_suppressed += 1
                known = self.pending[run_id].get(item.marker)
                if decision.action is not None and (
                        known is None or known.record.stage not in ("issued", "proposed")):
                    # Published and already answered in an earlier life of this tuner.
                    window.memory.in_flight.pop(item.marker, None)
                log.info("run %s: %s was published before, not repeating", run_id,
                         decision.key)
                continue
            self.metrics.decided(run_id, decision.rule, decision.action)
            if decision.action is not None:
                assert item.pending is not None
                self.pending[run_id][item.marker] = item.pending
                stage = item.pending.record.stage
                if stage == "proposed":
                    self.proposals_made += 1
                else:
                    self.commands_issued += 1
                self.records_by_stage[stage] += 1
                log.info("run %s: %s -> %s %s (%s %.4g vs %g) as %s%s", run_id, decision.rule,
                         decision.action, "" if decision.value is None else decision.value,
                         decision.trigger.metric, decision.trigger.value,
                         decision.trigger.threshold, item.marker,
                         ", proposed: awaiting approval" if stage == "proposed" else "")
            else:
                assert decision.event is not None
                self.events_emitted += 1
                level = logging.INFO if decision.event.severity == "info" else logging.WARNING
                log.log(level, "run %s: %s %s: %s", run_id, decision.event.severity,
                        decision.event.event, decision.event.detail)

    def _publish_once(self, run_id: str, outgoing: list[_Outgoing]) -> list[bool]:
        """Publish what was not published before, with the memory; which ones were new."""
        issued = tuner_key(run_id, ISSUED_KEY)
        actions = tuner_key(run_id, ACTIONS_KEY)
        ttl = self.config.service.issued_ttl_s
        keys = [item.decision.key for item in outgoing]
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(issued)
                    fresh = [seen is None for seen in pipe.hmget(issued, keys)]
                    pipe.multi()
                    for item, new in zip(outgoing, fresh, strict=True):
                        if not new:
                            continue
                        pipe.hset(issued, item.decision.key, item.marker)
                        for stream, message in item.messages:
                            self._xadd(pipe, run_id, stream, message)
                        if item.pending is not None:
                            pipe.hset(actions, item.marker, item.pending.model_dump_json())
                            pipe.expire(actions, ttl)
                    pipe.expire(issued, ttl)
                    self._save_memory(pipe, run_id)
                    pipe.execute()
                    return fresh
                except redis.WatchError:
                    continue  # another writer touched the keys: look again

    def _write_stage(self, run_id: str, record: ActionRecord,
                     pending: PendingAction | None) -> None:
        """Publish a later stage of an action and update (or drop) it, atomically."""
        actions = tuner_key(run_id, ACTIONS_KEY)
        pipe = self.client.pipeline(transaction=True)
        self._xadd(pipe, run_id, Stream.ACTIONS, record)
        if pending is None:
            pipe.hdel(actions, record.action_id)
            self.pending[run_id].pop(record.action_id, None)
        else:
            pipe.hset(actions, record.action_id, pending.model_dump_json())
            self.pending[run_id][record.action_id] = pending
        pipe.execute()
        self.records_by_stage[record.stage] += 1

    def _on_ack(self, run_id: str, ack: Ack) -> None:
        """The "acked" record for one of our commands; applied ones wait to be measured."""
        pending = self.pending[run_id].get(ack.command_id)
        if pending is None or pending.record.stage != "issued":
            return  # not ours (bot, API) or a redelivered ack
        record = ActionRecord(run_id=run_id, action_id=pending.record.action_id,
                              stage="acked", trigger=pending.record.trigger,
                              command=pending.record.command, ack=ack,
                              **_supervision(pending.record))
        keep = ack.status == "applied" and pending.measure is not None
        self._write_stage(run_id, record, PendingAction(record=record, measure=pending.measure,
                                                        ack_step=ack.step) if keep else None)

    def _measure_due(self, run_id: str, window: RunWindow) -> None:
        """The "measured" record of every applied command now N steps old."""
        steps = self.config.service.measure_after_steps
        for pending in list(self.pending[run_id].values()):
            if pending.ack_step is None or pending.measure is None:
                continue
            if window.step < pending.ack_step + steps:
                continue
            effect = measure_effect(window, pending.measure, pending.ack_step, steps)
            record = ActionRecord(run_id=run_id, action_id=pending.record.action_id,
                                  stage="measured", trigger=pending.record.trigger,
                                  command=pending.record.command, ack=pending.record.ack,
                                  effect=effect, **_supervision(pending.record))
            self._write_stage(run_id, record, None)
            log.info("run %s: %s %s: %s %.4g -> %.4g (%s)", run_id, record.command.action,
                     record.action_id, effect.metric, effect.before, effect.after,
                     "recovered" if effect.recovered else "not recovered")

    # ------------------------------------------------------------------ supervision

    def _on_approval(self, run_id: str, window: RunWindow, approval: Approval) -> None:
        """A person's answer: resolves the proposal if it still waits; else it is ignored
        (and recorded), unless it is the very answer that resolved it, read again."""
        raw = self.client.hget(tuner_key(run_id, ANSWERED_KEY), approval.action_id)
        if raw is not None:
            answered = Answered.model_validate_json(raw)
            if answered.answer_id == approval.answer_id:
                return  # redelivered after a restart: already acted on
            self._ignore(run_id, window, approval,
                         f"already {answered.resolution.replace('_', ' ')} by {answered.by}")
            return
        pending = self.pending[run_id].get(approval.action_id)
        if pending is None or pending.record.stage != "proposed":
            self._ignore(run_id, window, approval, "no such proposal awaits an answer")
            return
        self._resolve(run_id, window, pending, "approved" if approval.approved else "rejected",
                      approval.by, approval.answer_id)

    def _settle_due(self, now: float) -> None:
        """Proposals past their deadline: applied or dropped, as each one said it would be."""
        for run_id, window in self.windows.items():
            for pending in list(self.pending[run_id].values()):
                proposal = pending.record.proposal
                if pending.record.stage != "proposed" or proposal is None \
                        or proposal.deadline > now:
                    continue
                resolution: Resolution = ("timeout_applied" if proposal.on_timeout == "apply"
                                          else "timeout_dropped")
                self._resolve(run_id, window, pending, resolution, TIMEOUT_BY, None)

    def _resolve(self, run_id: str, window: RunWindow, pending: PendingAction,
                 resolution: Resolution, by: str, answer_id: str | None) -> None:
        """End a proposal: send its command ("issued") or close it ("rejected", "dropped");
        the answer, the records, the pending action and the memory in one transaction."""
        old = pending.record
        now = self.clock()
        applied = resolution in ("approved", "timeout_applied")
        messages: list[tuple[Stream, Message]] = []
        if applied:
            command = old.command.model_copy(update={
                "ts": now, "expires_at": now + self.config.service.command_ttl_s})
            record = ActionRecord(run_id=run_id, action_id=old.action_id, stage="issued",
                                  trigger=old.trigger, command=command,
                                  proposal=old.proposal, resolution=resolution,
                                  decided_by=by)
            messages.append((Stream.COMMANDS, command))
            after: PendingAction | None = PendingAction(record=record, measure=pending.measure)
        else:
            stage = "rejected" if resolution == "rejected" else "dropped"
            record = ActionRecord(run_id=run_id, action_id=old.action_id, stage=stage,
                                  trigger=old.trigger, command=old.command,
                                  proposal=old.proposal, resolution=resolution,
                                  decided_by=by)
            after = None
        messages.append((Stream.ACTIONS, record))
        answered_key = tuner_key(run_id, ANSWERED_KEY)
        actions = tuner_key(run_id, ACTIONS_KEY)
        ttl = self.config.service.issued_ttl_s
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(answered_key)
                    if pipe.hexists(answered_key, old.action_id):
                        pipe.unwatch()
                        log.warning("run %s: proposal %s was resolved meanwhile", run_id,
                                    old.action_id)
                        self._reload_pending(run_id, old.action_id)
                        return
                    # In the memory saved below; idempotent, so a retried round is harmless.
                    resolve_proposal(window, old.trigger.rule, old.action_id,
                                     old.command.action, applied, record.command.expires_at)
                    pipe.multi()
                    pipe.hset(answered_key, old.action_id, Answered(
                        resolution=resolution, by=by, answer_id=answer_id).model_dump_json())
                    pipe.expire(answered_key, ttl)
                    for stream, message in messages:
                        self._xadd(pipe, run_id, stream, message)
                    if after is None:
                        pipe.hdel(actions, old.action_id)
                    else:
                        pipe.hset(actions, old.action_id, after.model_dump_json())
                    self._save_memory(pipe, run_id)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if after is None:
            self.pending[run_id].pop(old.action_id, None)
        else:
            self.pending[run_id][old.action_id] = after
            self.commands_issued += 1
        self.records_by_stage[record.stage] += 1
        log.info("run %s: proposal %s (%s %s) %s by %s", run_id, old.action_id,
                 old.command.action, "" if old.command.value is None else old.command.value,
                 resolution, by)

    def _reload_pending(self, run_id: str, action_id: str) -> None:
        """Take an action's pending state from Redis (another consumer changed it)."""
        raw = self.client.hget(tuner_key(run_id, ACTIONS_KEY), action_id)
        if raw is None:
            self.pending[run_id].pop(action_id, None)
        else:
            self.pending[run_id][action_id] = PendingAction.model_validate_json(raw)

    def _ignore(self, run_id: str, window: RunWindow, approval: Approval, why: str) -> None:
        """Record an answer that changed nothing, once per answer (an event, for the trail)."""
        verb = "approval" if approval.approved else "rejection"
        event = Event(run_id=run_id, event="approval_ignored", severity="info",
                      step=max(window.step, 0),
                      detail=f"{verb} of {approval.action_id} by {approval.by} ignored: {why}",
                      data={"source": "tuner", "action_id": approval.action_id,
                            "by": approval.by, "approved": approval.approved})
        issued = tuner_key(run_id, ISSUED_KEY)
        marker = f"answer:{approval.answer_id}"
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(issued)
                    if pipe.hexists(issued, marker):
                        pipe.unwatch()
                        return  # recorded before this entry was redelivered
                    pipe.multi()
                    pipe.hset(issued, marker, "ignored")
                    pipe.expire(issued, self.config.service.issued_ttl_s)
                    self._xadd(pipe, run_id, Stream.EVENTS, event)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        self.answers_ignored += 1
        log.info("run %s: answer %s of %s to %s ignored: %s", run_id, approval.answer_id,
                 approval.by, approval.action_id, why)

    def _expire(self, now: float) -> None:
        """Unanswered commands past expiry + grace stop blocking their rules."""
        grace = self.config.service.ack_grace_s
        for run_id, window in self.windows.items():
            expired = window.expire_in_flight(now, grace)
            stale = [p for p in self.pending[run_id].values()
                     if p.record.stage == "issued" and p.record.command.expires_at is not None
                     and p.record.command.expires_at + grace < now]
            if not expired and not stale:
                continue
            pipe = self.client.pipeline(transaction=True)
            for pending in stale:
                pipe.hdel(tuner_key(run_id, ACTIONS_KEY), pending.record.action_id)
                self.pending[run_id].pop(pending.record.action_id, None)
            self._save_memory(pipe, run_id)
            pipe.execute()
            for item in expired:
                log.warning("run %s: command %s (%s) was never acked; it no longer blocks "
                            "rule %s", run_id, item.command_id, item.action, item.rule)


def _supervision(record: ActionRecord) -> dict[str, object]:
    """The proposal, resolution and decider of an action, carried to its later records."""
    return {"proposal": record.proposal, "resolution": record.resolution,
            "decided_by": record.decided_by}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.tuner.service``: run the tuner until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m services.tuner.service",
                                     description="Smart Tuner policy service")
    parser.add_argument("--group", default=DEFAULT_GROUP, help="Redis consumer group")
    parser.add_argument("--consumer", default=DEFAULT_CONSUMER,
                        help="consumer name; keep it stable so a restart re-reads its pending")
    parser.add_argument("--run", action="append", dest="runs",
                        help="watch only this run (repeatable); default: every known run")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        config = load_tuner_config(settings.tuner_config)
    except ConfigError as error:
        print(f"tuner: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.redis_url is None:
        print("tuner: SMART_TUNER_REDIS_URL is required", file=sys.stderr)
        raise SystemExit(2)
    setup_logging(settings.log_level)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        port = metrics_port_from_env()
    except ConfigError as error:
        print(f"tuner: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics = TunerMetrics()
    if port is not None:
        serve(metrics, port)
    client = connect(settings.redis_url)
    service = TunerService(client, config, group=args.group, consumer=args.consumer,
                           runs=args.runs, metrics=metrics,
                           retention=RetentionSweeper(client, settings.retention_days * DAY_S))
    log.info("tuner %s/%s started (config %s)", args.group, args.consumer,
             settings.tuner_config)
    service.run_forever(stop)
    log.info("tuner stopped: %d commands issued, %d events, decisions %s",
             service.commands_issued, service.events_emitted, dict(service.decisions_by_rule))


if __name__ == "__main__":
    main()
