"""The trainer's side of corrective commands: read, check, apply between steps, ack once.

The trainer trusts no sender: every command is checked against the trainer's own bounds
(services.core.bounds), its run id and its expiry before anything changes, and every
command id gets exactly one ack (applied / rejected with the reason / expired / duplicate)
carrying the value before and after.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import redis

from services.core.bounds import check_command
from services.core.bus import CONNECTION_ERRORS, Consumer, Publisher
from services.core.schemas import Ack, Command
from services.core.streams import Stream, stream_key
from services.trainer.training import Trainer

log = logging.getLogger(__name__)

GROUP = "trainer"
SEEN_LIMIT = 10_000  # command ids remembered for duplicate detection
RETRY_AFTER_ERROR_S = 2.0
MAX_COMMANDS_PER_STEP = 20
# Between steps the handler waits briefly for a command in flight, so that the tuner's answer
# to step k's metrics (a few ms away) is applied before step k+1 rather than k+2. The wait
# costs at most this share of a step's time, and never more than MAX_WAIT_MS.
WAIT_FRACTION_OF_STEP = 0.01
MAX_WAIT_MS = 20
STEP_TIME_SMOOTHING = 0.2  # weight of the newest step in the moving average


class CommandHandler:
    """A ``TrainingController`` that applies the run's commands stream to a Trainer."""

    def __init__(self, client: redis.Redis, run_id: str, publisher: Publisher,
                 consumer_name: str = "trainer", clock: Callable[[], float] = time.time):
        self.run_id = run_id
        self.publisher = publisher
        self.clock = clock
        self.consumer = Consumer(client, {stream_key(run_id, Stream.COMMANDS): Stream.COMMANDS},
                                 group=GROUP, name=consumer_name)
        self.seen: OrderedDict[str, str] = OrderedDict()
        self.acks: list[Ack] = []  # this process's acks, newest last (bounded)
        self._retry_at = 0.0
        self._pending_done = False
        self._last_call: float | None = None
        self.step_seconds = 0.0  # moving average of the time between two calls

    def wait_ms(self) -> int | None:
        """How long this poll may wait for a command: a small share of a step, or not at all."""
        budget = int(WAIT_FRACTION_OF_STEP * self.step_seconds * 1000)
        return min(MAX_WAIT_MS, budget) if budget >= 1 else None  # Redis: BLOCK 0 = forever

    def before_step(self, trainer: Trainer) -> None:
        """Apply whatever commands arrived since the last step; never raise, never block."""
        now = time.monotonic()
        if self._last_call is not None and not trainer.paused:
            elapsed = now - self._last_call
            self.step_seconds = elapsed if not self.step_seconds else (
                STEP_TIME_SMOOTHING * elapsed + (1 - STEP_TIME_SMOOTHING) * self.step_seconds)
        self._last_call = now
        if now < self._retry_at:
            return
        try:
            deliveries = []
            if not self._pending_done:
                # Entries this consumer read before a crash but never acked.
                deliveries = self.consumer.pending(MAX_COMMANDS_PER_STEP)
                self._pending_done = True
            wait = None if trainer.paused else self.wait_ms()
            deliveries += self.consumer.poll(block_ms=wait, count=MAX_COMMANDS_PER_STEP)
            for delivery in deliveries:
                assert isinstance(delivery.message, Command)
                ack = self.apply(trainer, delivery.message)
                self.publisher.publish(Stream.ACKS, ack)
                self.consumer.ack(delivery)
        except CONNECTION_ERRORS as error:
            log.warning("commands stream unreachable (%s); retrying in %.0f s", error,
                        RETRY_AFTER_ERROR_S)
            self._retry_at = now + RETRY_AFTER_ERROR_S

    def apply(self, trainer: Trainer, command: Command) -> Ack:
        """Check and apply one command; returns its ack (also kept in ``self.acks``)."""
        ack = self._decide(trainer, command)
        if ack.status != "duplicate":
            self.seen[command.command_id] = ack.status
            while len(self.seen) > SEEN_LIMIT:
                self.seen.popitem(last=False)
        self.acks = [*self.acks[-99:], ack]
        log_fn = log.info if ack.status == "applied" else log.warning
        log_fn("command %s %s from %s: %s %s", command.command_id[:12], command.action,
               command.source, ack.status, ack.detail)
        return ack

    def _decide(self, trainer: Trainer, command: Command) -> Ack:
        def reply(status: str, detail: str = "", before: float | None = None,
                  after: float | None = None) -> Ack:
            return Ack(run_id=self.run_id, command_id=command.command_id,
                       action=command.action, status=status, step=trainer.step,
                       before=before, after=after, detail=detail)

        if command.command_id in self.seen:
            return reply("duplicate", f"already {self.seen[command.command_id]}")
        if command.run_id != self.run_id:
            return reply("rejected", f"command for run {command.run_id!r} reached run "
                                     f"{self.run_id!r}")
        if command.expires_at is not None and command.expires_at < self.clock():
            return reply("expired", f"expired {self.clock() - command.expires_at:.1f} s ago")
        reason = check_command(command)
        if reason is not None:
            return reply("rejected", reason)
        source = f"{command.source}:{command.requested_by}" if command.requested_by \
            else command.source
        value = command.value
        match command.action:
            case "set_lr":
                before, after = trainer.set_lr(value, source)
                return reply("applied", "learning rate set", before, after)
            case "set_guided_attention_weight":
                before, after = trainer.set_guided_attention_weight(value, source)
                return reply("applied", "guided attention weight set", before, after)
            case "set_grad_clip":
                before, after = trainer.set_grad_clip(value, source)
                return reply("applied", "clip threshold set", before, after)
            case "rollback":
                step = trainer.step
                info = trainer.rollback(source)
                if info is None:
                    return reply("rejected", "no healthy checkpoint to roll back to")
                return reply("applied", f"rolled back to {info.file}", float(step),
                             float(info.step))
            case "checkpoint_now":
                info = trainer.save_checkpoint()
                return reply("applied", f"saved {info.file}"
                             f" ({'healthy' if info.healthy else 'not healthy'})",
                             None, float(info.step))
            case "pause":
                if trainer.paused:
                    return reply("rejected", "already paused")
                trainer.paused = True
                return reply("applied", "paused", 0.0, 1.0)
            case "resume":
                if not trainer.paused:
                    return reply("rejected", "not paused")
                trainer.paused = False
                return reply("applied", "resumed", 1.0, 0.0)
            case "stop":
                trainer.request_stop()
                trainer.paused = False
                return reply("applied", "stopping after this step with a checkpoint")
        return reply("rejected", f"unknown action {command.action!r}")  # pragma: no cover
