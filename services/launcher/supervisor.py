"""Keep the trainer running: restart it after a crash from the last good checkpoint.

Restarts are counted; a restart after which the trainer wrote a new checkpoint counts as a
recovery and resets the run of consecutive restarts. More than
``CONSECUTIVE_RESTARTS_RED_FLAG`` in a row (the plan's red flag) and the supervisor gives
up, says so on the events stream as a critical event, and exits non-zero.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.core.indicators import CONSECUTIVE_RESTARTS_RED_FLAG
from services.trainer.checkpoints import RUN_CHECKPOINT_SUBDIR, list_checkpoints

log = logging.getLogger(__name__)

# Exit codes of `smart-tuner train` that are an answer, not a crash: 0 done, 2 the
# indicators were not met with --until-indicators (see services/trainer/cli.py).
NORMAL_EXIT_CODES = frozenset({0, 2})
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
STOP_GRACE_S = 60.0

Verdict = Literal["done", "restart", "give_up"]


@dataclass
class RestartPolicy:
    """Pure restart decisions: what to do after the trainer process ended."""

    max_consecutive: int = CONSECUTIVE_RESTARTS_RED_FLAG
    consecutive: int = 0
    total: int = 0
    history: list[dict] = field(default_factory=list)

    def after_exit(self, exit_code: int, progressed: bool) -> Verdict:
        """Record one exit; ``progressed``: a checkpoint newer than at start was written."""
        if exit_code in NORMAL_EXIT_CODES:
            self.consecutive = 0
            return "done"
        self.consecutive = 1 if progressed else self.consecutive + 1
        self.total += 1
        self.history.append({"exit_code": exit_code, "progressed": progressed,
                             "consecutive": self.consecutive, "time": time.time()})
        return "give_up" if self.consecutive > self.max_consecutive else "restart"

    def backoff_s(self) -> float:
        """Wait before the next start: doubles with each consecutive crash."""
        return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** max(0, self.consecutive - 1))


def stop_process(process: subprocess.Popen, name: str, grace_s: float,
                 sig: int = signal.SIGTERM) -> None:
    """Send ``sig``, wait up to ``grace_s`` for a clean exit, then kill."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
        process.kill()
        process.wait()


def newest_step(run_dir: Path) -> int:
    """Step of the newest checkpoint listed in the run's manifest, -1 when none."""
    # Read-only: the trainer may be writing a checkpoint there right now.
    entries = list_checkpoints(run_dir / RUN_CHECKPOINT_SUBDIR)
    return entries[-1].step if entries else -1


class TrainerSupervisor:
    """Runs ``command`` (a `smart-tuner train ... --resume` line) until it ends normally."""

    def __init__(self, command: Sequence[str], run_dir: Path, env: dict[str, str] | None = None,
                 policy: RestartPolicy | None = None,
                 on_give_up: Callable[[RestartPolicy], None] | None = None,
                 on_restart: Callable[[RestartPolicy, int], None] | None = None):
        self.command = list(command)
        self.run_dir = Path(run_dir)
        self.env = env
        self.policy = policy or RestartPolicy()
        self.on_give_up = on_give_up
        self.on_restart = on_restart
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()

    def run(self) -> int:
        """Supervise until done, given up, or stopped; returns the final exit code."""
        while True:
            before = newest_step(self.run_dir)
            self.process = subprocess.Popen(self.command, env=self.env)
            code = self.process.wait()
            if self._stopping.is_set():
                return code
            verdict = self.policy.after_exit(code, newest_step(self.run_dir) > before)
            if verdict == "done":
                log.info("trainer finished (exit %d)", code)
                return code
            if verdict == "give_up":
                log.critical("trainer crashed %d times in a row; giving up",
                             self.policy.consecutive)
                if self.on_give_up is not None:
                    self.on_give_up(self.policy)
                return code if code > 0 else 1
            wait = self.policy.backoff_s()
            log.warning("trainer exited with %d; restart %d in a row in %.0f s", code,
                        self.policy.consecutive, wait)
            if self.on_restart is not None:
                self.on_restart(self.policy, code)
            if self._stopping.wait(wait):
                return code

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ask the trainer to stop cleanly (SIGINT: it checkpoints), kill it after grace."""
        self._stopping.set()
        if self.process is not None:
            stop_process(self.process, "trainer", grace_s, signal.SIGINT)
