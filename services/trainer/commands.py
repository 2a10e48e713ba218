"""The trainer's side of corrective commands: read, check, apply between steps, ack once.

The trainer trusts no sender: every command is checked against the trainer's own bounds
(services.core.bounds), its run id and its expiry before anything changes, and every
command id gets exactly one ack (applied / rejected with the reason / expired / duplicate)
carrying the value before and after.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import redis

from services.core.bounds import check_command
from services.core.bus import CONNECTION_ERRORS, Consumer, Delivery, Publisher
from services.core.schemas import Ack, Command
from services.core.streams import Stream, stream_key
from services.trainer.training import Trainer

log = logging.getLogger(__name__)

GROUP = "trainer"
SEEN_LIMIT = 10_000  # command ids remembered for duplicate detection
RETRY_AFTER_ERROR_S = 2.0
MAX_COMMANDS_PER_STEP = 20
READ_BLOCK_MS = 500  # the reader thread's blocking read; also how fast it notices close()
# Between steps the trainer waits briefly for a command in flight, so that the tuner's answer
# to step k's metrics (a few ms away) is applied before step k+1 rather than k+2. The wait
# costs at most this share of a step's time, and never more than MAX_WAIT_S.
WAIT_FRACTION_OF_STEP = 0.01
MAX_WAIT_S = 0.02


class CommandHandler:
    """A ``TrainingController`` that applies the run's commands stream to a Trainer.

    All Redis I/O happens on a reader thread: it blocks on the stream (Redis answers a
    blocked read as soon as a command is written) and acks what the trainer has handled.
    The training thread only looks at an in-process inbox, so a slow or dead Redis never
    delays a step, and Redis's coarse timer for blocked reads (up to 100 ms) never either.

    In a distributed run only rank 0 has one (``link.attach``): it alone reads, decides
    and acks. What an applied command changes reaches the other ranks through the
    Trainer, which broadcasts rank 0's setter calls, pause and stop between steps, so
    every rank applies it at the same step and each command is still acked once.
    """

    def __init__(self, client: redis.Redis, run_id: str, publisher: Publisher,
                 consumer_name: str = "trainer", clock: Callable[[], float] = time.time):
        self.run_id = run_id
        self.publisher = publisher
        self.clock = clock
        self.consumer = Consumer(client, {stream_key(run_id, Stream.COMMANDS): Stream.COMMANDS},
                                 group=GROUP, name=consumer_name)
        self.seen: OrderedDict[str, str] = OrderedDict()
        self.acks: list[Ack] = []  # this process's acks, newest last (bounded)
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        # Held while one read's commands go into the inbox: the training thread, woken by
        # the first, waits for the rest of that read, so commands written together (the
        # tuner's rollback + set_lr) are applied at the same step.
        self._filling = threading.Lock()
        self._handled: queue.Queue[Delivery] = queue.Queue()  # to be acked by the reader
        self._rounds = 0  # completed reads; lets sync() wait for a read that started later
        self._round_done = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"commands-{run_id}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ reader thread

    def _read(self) -> None:
        pending_done = False
        while not self._stop.is_set():
            try:
                self._ack_handled()
                if not pending_done:
                    # Entries this consumer read before a crash but never acked.
                    self._fill(self.consumer.pending(MAX_COMMANDS_PER_STEP))
                    pending_done = True
                self._fill(self.consumer.poll(READ_BLOCK_MS, MAX_COMMANDS_PER_STEP))
                self._ack_handled()
            except CONNECTION_ERRORS as error:
                log.warning("commands stream unreachable (%s); retrying in %.0f s", error,
                            RETRY_AFTER_ERROR_S)
                self._stop.wait(RETRY_AFTER_ERROR_S)
            except Exception:  # never let the reader die silently: log, back off, go on
                log.exception("command reader failed; retrying")
                self._stop.wait(RETRY_AFTER_ERROR_S)
            with self._round_done:
                self._rounds += 1
                self._round_done.notify_all()

    def _fill(self, deliveries: list[Delivery]) -> None:
        with self._filling:
            for delivery in deliveries:
                self._inbox.put(delivery)

    def _ack_handled(self) -> None:
        while True:
            try:
                delivery = self._handled.get_nowait()
            except queue.Empty:
                return
            try:
                self.consumer.ack(delivery)
            except CONNECTION_ERRORS:
                self._handled.put(delivery)  # ack later; the command was applied already
                raise

    def sync(self, timeout_s: float = 5.0) -> bool:
        """Wait until the reader has finished a read that began after this call."""
        with self._round_done:
            target = self._rounds + 2
            return self._round_done.wait_for(lambda: self._rounds >= target, timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the reader thread (after acking what was handled, if Redis allows)."""
        self._stop.set()
        self._thread.join(timeout_s)
        try:
            self._ack_handled()
        except CONNECTION_ERRORS:
            log.warning("%d handled commands not acked: Redis unreachable",
                        self._handled.qsize())

    # ------------------------------------------------------------ training thread

    @staticmethod
    def wait_s(trainer: Trainer) -> float:
        """How long to wait for a command in flight: a small share of the last step."""
        return min(MAX_WAIT_S, WAIT_FRACTION_OF_STEP * trainer.last_step_seconds)

    def before_step(self, trainer: Trainer) -> None:
        """Apply the commands that arrived since the last step; never raises, never blocks
        for more than ``wait_s``."""
        wait = 0.0 if trainer.paused else self.wait_s(trainer)
        for index in range(MAX_COMMANDS_PER_STEP):
            try:
                delivery = self._inbox.get(timeout=wait) if wait > 0 else \
                    self._inbox.get_nowait()
            except queue.Empty:
                return
            if index == 0:
                with self._filling:  # the rest of the first command's read is in now
                    pass
            wait = 0.0  # only the first command is worth waiting for
            assert isinstance(delivery.message, Command)
            ack = self.apply(trainer, delivery.message)
            self.publisher.publish(Stream.ACKS, ack)
            self._handled.put(delivery)

    def apply(self, trainer: Trainer, command: Command) -> Ack:
        """Check and apply one command; returns its ack (also kept in ``self.acks``).

        A command whose handler fails (a checkpoint that cannot be read for a rollback, a
        disk error) is acked as rejected with the reason: the run goes on, and whoever sent
        it learns why."""
        try:
            ack = self._decide(trainer, command)
        except Exception as error:  # any failure becomes the command's answer
            log.exception("command %s %s failed", command.command_id[:12], command.action)
            ack = Ack(run_id=self.run_id, command_id=command.command_id,
                      action=command.action, status="rejected", step=trainer.step,
                      detail=f"failed: {type(error).__name__}: {error}"[:500])
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
            case "set_gate_positive_weight":
                before, after = trainer.set_gate_positive_weight(value, source)
                return reply("applied", "gate positive weight set", before, after)
            case "set_spike_guard":
                before, after = trainer.set_spike_guard(value, source)
                return reply("applied", "spike guard switched off" if after == 0
                             else "spike guard factor set", before, after)
            case "rollback":
                step = trainer.step
                info = trainer.rollback(source)
                if info is None:
                    return reply("rejected", "no healthy checkpoint to roll back to")
                exclusion = trainer.quarantine.last
                skipped = f"; {exclusion.describe()}" if exclusion is not None else ""
                return reply("applied", f"rolled back to {info.file}{skipped}", float(step),
                             float(info.step))
            case "skip_failed_batches":
                before = len(trainer.feed.excluded)
                exclusion = trainer.skip_failed_batches(value, source)
                if not exclusion.ids:
                    return reply("rejected", exclusion.describe())
                return reply("applied", exclusion.describe(), float(before),
                             float(len(trainer.feed.excluded)))
            case "checkpoint_now":
                info = trainer.checkpointing.try_save(trainer)
                if info is None:
                    return reply("rejected", "not saved: "
                                 f"{trainer.checkpointing.failures.last_error}")
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
