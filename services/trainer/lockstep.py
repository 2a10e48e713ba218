"""Control between steps: the controllers' turn, pause and stop; in lockstep when distributed.

A single process polls its controllers (services.trainer.commands) and obeys its own
``paused`` and stop flags (``LocalControl``). Under torchrun only rank 0 hears commands;
between steps it broadcasts what its setters did, its pause and its stop to the other
ranks, which replay the setter calls through the same setters (``Lockstep``), so every
rank changes the same thing at the same step and the ranks never diverge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.trainer import distributed
from services.trainer.checkpoints import LoadedCheckpoint
from services.trainer.distributed import DistInfo

if TYPE_CHECKING:  # the Trainer composes a control; the control only calls back into it
    from services.trainer.training import Trainer

PAUSE_POLL_S = 0.2
STOP_REQUESTED = "stop_requested"


@dataclass
class SetterCall:
    """One run-time setter call on rank 0, for the other ranks to replay at the same step."""

    action: str  # a value setter's name (set_lr, ...) or rollback
    value: float | None
    source: str
    checkpoint: LoadedCheckpoint | None = None  # rollback: the state rank 0 restored


@dataclass
class ControlState:
    """What rank 0 broadcasts between steps; every rank's loop acts on it alone."""

    calls: list[SetterCall] = field(default_factory=list)
    paused: bool = False
    stop: bool = False
    stop_reason: str = STOP_REQUESTED


class LocalControl:
    """One process: the controllers act on the trainer directly, its live flags rule."""

    def share(self, call: SetterCall) -> None:
        """A setter was called; nobody else needs to know."""

    def between_steps(self, trainer: Trainer) -> None:
        """Let the controllers act between steps; while paused, keep polling them."""
        trainer.poll_controllers()
        if not trainer.paused:
            return
        trainer.lifecycle("paused", f"paused at step {trainer.step}")
        while trainer.paused and not trainer.stop_requested:
            time.sleep(PAUSE_POLL_S)
            trainer.poll_controllers()
        if not trainer.stop_requested:
            trainer.lifecycle("resumed", f"resumed at step {trainer.step}")

    def stopping(self, trainer: Trainer) -> bool:
        """Whether the loop stops before the next step."""
        return trainer.stop_requested

    def stop_reason(self) -> str:
        """Why the loop stopped when ``stopping`` said so."""
        return STOP_REQUESTED

    def stop_after_step(self, trainer: Trainer, reason: str) -> bool:
        """The loop itself decided to stop (``reason``); True: leave the loop now."""
        return True


class Lockstep(LocalControl):
    """A distributed run: every poll ends in rank 0's broadcast, and every rank acts on it.

    The loop reads only the broadcast state, never the live ``paused`` and stop flags,
    which a signal handler may change between the broadcast and the check on one rank
    but not on the others.
    """

    def __init__(self, dist: DistInfo):
        self.is_main = dist.is_main
        # Rank 0's setter calls since the last broadcast, and why it will stop.
        self._calls: list[SetterCall] = []
        self._stop_reason = STOP_REQUESTED
        self.agreed = ControlState()

    def share(self, call: SetterCall) -> None:
        """Rank 0: queue a setter call for the other ranks to replay."""
        if self.is_main:
            self._calls.append(call)

    def between_steps(self, trainer: Trainer) -> None:
        """Exchange the control state; while it says paused, every rank waits in the exchange."""
        agreed = self.exchange(trainer)
        if not agreed.paused or agreed.stop:
            return
        trainer.lifecycle("paused", f"paused at step {trainer.step}")
        while agreed.paused and not agreed.stop:
            time.sleep(PAUSE_POLL_S)
            agreed = self.exchange(trainer)
        if not agreed.stop:
            trainer.lifecycle("resumed", f"resumed at step {trainer.step}")

    def exchange(self, trainer: Trainer) -> ControlState:
        """Poll the controllers (rank 0), broadcast the outcome, replay it (other ranks).

        Only rank 0's controllers run: it alone hears commands, and whatever they change
        reaches the others as setter calls, so no rank changes anything on its own.
        """
        state: ControlState | None = None
        if self.is_main:
            trainer.poll_controllers()
            state = ControlState(calls=self._calls, paused=trainer.paused,
                                 stop=trainer.stop_requested, stop_reason=self._stop_reason)
            self._calls = []
        state = distributed.broadcast_object(state)
        assert state is not None
        if not self.is_main:
            for call in state.calls:
                replay(trainer, call)
            trainer.paused = state.paused
            if state.stop:
                trainer.request_stop()
        self.agreed = state
        return state

    def stopping(self, trainer: Trainer) -> bool:
        """What the last broadcast said: every rank agrees."""
        return self.agreed.stop

    def stop_reason(self) -> str:
        """Rank 0's reason, as broadcast."""
        return self.agreed.stop_reason

    def stop_after_step(self, trainer: Trainer, reason: str) -> bool:
        """The other ranks stop with rank 0 at the next broadcast, before a step."""
        self._stop_reason = reason
        trainer.request_stop()
        return False


def replay(trainer: Trainer, call: SetterCall) -> None:
    """Other ranks: make rank 0's setter call here, through the same setter."""
    match call.action:
        case "set_lr" | "set_guided_attention_weight" | "set_grad_clip" \
                | "set_gate_positive_weight" | "set_spike_guard":
            assert call.value is not None
            getattr(trainer, call.action)(call.value, call.source)
        case "rollback":
            trainer.rollback(call.source, checkpoint=call.checkpoint)
        case "skip_failed_batches":  # each rank leaves out its own failed batches
            assert call.value is not None
            trainer.skip_failed_batches(call.value, call.source)
        case _:  # pragma: no cover - both ends run the same code
            raise ValueError(f"unknown setter call {call.action!r}")


def make_control(dist: DistInfo) -> LocalControl:
    """Lockstep when distributed, else local."""
    return Lockstep(dist) if dist.distributed else LocalControl()
