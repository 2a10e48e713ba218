"""The trainer killed with SIGKILL at a random step, under the supervisor; then a trainer
that crashes at every start.

Must hold: the supervisor restarts it; it resumes from the newest valid checkpoint; no
checkpoint file is ever corrupt; at most one checkpoint interval of steps is repeated. In a
crash loop the fourth consecutive restart stops the run and a critical alert is raised.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

from services.core.bus import connect
from services.core.indicators import CONSECUTIVE_RESTARTS_RED_FLAG
from services.core.schemas import Event, decode
from services.core.streams import Stream, stream_key
from services.launcher.supervisor import TrainerSupervisor
from services.launcher.up import critical_event
from services.trainer.checkpoints import CheckpointError, CheckpointManager

CHECKPOINT_EVERY = 5
MAX_STEPS = 20


def _command(data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "train", "--data", str(data), "--out",
            str(run), "--max-steps", str(MAX_STEPS), "--checkpoint-every",
            str(CHECKPOINT_EVERY), "--eval-every", "5", "--batch-size", "4", "--val-size", "4",
            "--resume", "--resume-from", "latest", "--no-telemetry", *extra]


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the process died
            continue
        if record.get("kind") == "step":
            steps.append(record["step"])
    return steps


def _corrupt_checkpoints(run: Path) -> int:
    """Temporary files left behind by a write, and checkpoint files that do not load."""
    # counted before a CheckpointManager is made: making one removes temporary files
    left_over = len(list((run / "checkpoints").glob("*.tmp*")))
    manager = CheckpointManager(run / "checkpoints")
    unreadable = 0
    for info in manager.entries():
        try:
            manager.load(run / "checkpoints" / info.file)
        except CheckpointError:
            unreadable += 1
    return left_over + unreadable


def test_trainer_sigkill_at_a_random_step(small_corpus, tmp_path, monkeypatch, chaos) -> None:
    monkeypatch.setattr("services.launcher.supervisor.BACKOFF_INITIAL_S", 0.01)
    row = chaos("trainer SIGKILL at a random step")
    run = tmp_path / "run"
    kill_at = random.Random(11).randint(CHECKPOINT_EVERY + 2, MAX_STEPS - 4)
    supervisor = TrainerSupervisor(_command(small_corpus, run), run,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(code=supervisor.run()),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not _steps(run) or max(_steps(run)) < kill_at:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process = supervisor.process
    assert process is not None
    saved_before = [info.step for info in CheckpointManager(run / "checkpoints").entries()]
    killed_after = max(_steps(run))
    os.kill(process.pid, signal.SIGKILL)
    row.fault = f"trainer SIGKILL at step {killed_after}"
    row.injected = 1
    thread.join(240)
    steps = _steps(run)
    first_run = steps[: steps.index(killed_after) + 1]
    resumed = steps[len(first_run):]
    # Measured before asserting: steps that never ran to the end, checkpoints left corrupt.
    row.lost = len(set(range(MAX_STEPS)) - set(steps)) + _corrupt_checkpoints(run)
    row.survived = int(result.get("code") == 0 and bool(resumed) and row.lost == 0)
    assert result.get("code") == 0 and supervisor.policy.total == 1
    assert resumed, "the trainer was not restarted"
    # from the newest valid checkpoint: at least the newest seen before the kill (one more
    # may have been saved in the instant between that look and the kill)
    assert resumed[0] % CHECKPOINT_EVERY == 0 and resumed[0] >= max(saved_before)
    assert killed_after + 1 - resumed[0] <= CHECKPOINT_EVERY  # at most one interval again
    assert resumed == list(range(resumed[0], MAX_STEPS))
    manager = CheckpointManager(run / "checkpoints")
    for info in manager.entries():  # none corrupt
        assert manager.load(run / "checkpoints" / info.file) is not None
    assert not list((run / "checkpoints").glob("*.tmp*"))


def test_crash_loop_stops_the_run_with_a_critical_alert(small_corpus, tmp_path, monkeypatch,
                                                        redis_url, run_id, chaos) -> None:
    monkeypatch.setattr("services.launcher.supervisor.BACKOFF_INITIAL_S", 0.01)
    row = chaos("trainer crash loop (stopped after the 4th crash)")
    run = tmp_path / "run"

    def give_up(policy) -> None:
        critical_event(redis_url, run_id, "trainer crashed repeatedly; run stopped",
                       {"restarts": policy.history})

    supervisor = TrainerSupervisor(
        _command(small_corpus, run, "--inject-fault", "crash:start=1"), run,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, on_give_up=give_up)
    code = supervisor.run()
    state = json.loads((run / "run_state.json").read_text())
    events = [decode(f, Event) for _, f in
              connect(redis_url).xrange(stream_key(run_id, Stream.EVENTS))]
    critical = [e for e in events if (e.event, e.severity) == ("critical", "critical")]
    # Measured before asserting. Each crash is a fault; handled as required means the
    # first three restarted (the run state's count) and the last stopped the run with
    # a critical event. Lost: the critical event, if it never reached Redis.
    row.injected = supervisor.policy.consecutive
    stopped = code != 0 and bool(critical)
    row.survived = min(state.get("consecutive_restarts", 0), CONSECUTIVE_RESTARTS_RED_FLAG) + (
        1 if stopped and row.injected > CONSECUTIVE_RESTARTS_RED_FLAG else 0)
    row.lost = 0 if critical else 1
    assert code != 0
    assert supervisor.policy.consecutive == CONSECUTIVE_RESTARTS_RED_FLAG + 1
    assert state["consecutive_restarts"] == CONSECUTIVE_RESTARTS_RED_FLAG  # 3 restarts
    assert [(e.event, e.severity) for e in events] == [("critical", "critical")]
