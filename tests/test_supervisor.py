"""The supervisor restarts a crashed trainer from its last good checkpoint, and gives up
after the plan's limit of consecutive restarts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from services.core.indicators import CONSECUTIVE_RESTARTS_RED_FLAG
from services.launcher.supervisor import RestartPolicy, TrainerSupervisor, newest_step
from services.trainer.checkpoints import CheckpointManager


def test_policy_counts_consecutive_crashes_and_resets_on_progress():
    policy = RestartPolicy()
    assert policy.after_exit(0, progressed=False) == "done"
    verdicts = [policy.after_exit(70, progressed=False)
                for _ in range(CONSECUTIVE_RESTARTS_RED_FLAG)]
    assert verdicts == ["restart"] * CONSECUTIVE_RESTARTS_RED_FLAG
    assert policy.consecutive == CONSECUTIVE_RESTARTS_RED_FLAG
    # a crash after the trainer made progress starts a new count
    assert policy.after_exit(-9, progressed=True) == "restart" and policy.consecutive == 1
    for _ in range(CONSECUTIVE_RESTARTS_RED_FLAG - 1):
        policy.after_exit(1, progressed=False)
    assert policy.after_exit(1, progressed=False) == "give_up"  # the 4th in a row
    assert policy.total == 2 * CONSECUTIVE_RESTARTS_RED_FLAG + 1
    assert policy.after_exit(2, progressed=False) == "done"  # "indicators not met" is no crash


def test_backoff_doubles_and_is_capped():
    policy = RestartPolicy()
    waits = []
    for _ in range(8):
        policy.after_exit(1, progressed=False)
        waits.append(policy.backoff_s())
    assert waits[:3] == [1.0, 2.0, 4.0] and max(waits) == 30.0


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_crash_loop_is_stopped_after_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("services.launcher.supervisor.BACKOFF_INITIAL_S", 0.01)
    counter = tmp_path / "starts"
    command = _script(tmp_path, f"""
import pathlib, sys
p = pathlib.Path({str(counter)!r})
p.write_text(str(int(p.read_text()) + 1 if p.exists() else 1))
sys.exit(70)
""")
    given_up = []
    supervisor = TrainerSupervisor(command, tmp_path / "run", on_give_up=given_up.append)
    assert supervisor.run() == 70
    assert int(counter.read_text()) == CONSECUTIVE_RESTARTS_RED_FLAG + 1  # 1 start + 3 restarts
    assert len(given_up) == 1 and given_up[0].consecutive == CONSECUTIVE_RESTARTS_RED_FLAG + 1


def test_a_normal_exit_is_not_restarted(tmp_path):
    command = _script(tmp_path, "import sys; sys.exit(0)")
    restarts = []
    supervisor = TrainerSupervisor(command, tmp_path / "run",
                                   on_restart=lambda p, c: restarts.append(c))
    assert supervisor.run() == 0 and restarts == []


@pytest.mark.slow
def test_real_trainer_crash_resumes_from_last_good_checkpoint(small_corpus, tmp_path,
                                                              monkeypatch):
    """`smart-tuner train` killed by an injected crash at step 7 (checkpoints every 5):
    the supervisor restarts it, it resumes at step 5, repeats at most one interval, and
    the run then finishes normally."""
    monkeypatch.setattr("services.launcher.supervisor.BACKOFF_INITIAL_S", 0.01)
    run = tmp_path / "run"
    marker = tmp_path / "crashed-once"
    # Crash once: the wrapper injects the fault only while the marker does not exist.
    command = _script(tmp_path, f"""
import pathlib, sys
from services.cli import main
marker = pathlib.Path({str(marker)!r})
args = ["smart-tuner", "train", "--data", {str(small_corpus)!r}, "--out", {str(run)!r},
        "--max-steps", "12", "--checkpoint-every", "5", "--eval-every", "5",
        "--batch-size", "4", "--val-size", "4", "--resume", "--resume-from", "last_good",
        "--no-telemetry"]
if not marker.exists():
    marker.write_text("1")
    args += ["--inject-fault", "crash:start=7"]
sys.argv = args
main()
""")
    supervisor = TrainerSupervisor(command, run)
    assert supervisor.run() == 0
    assert supervisor.policy.total == 1  # one crash, one restart
    state = json.loads((run / "run_state.json").read_text())
    assert state["restarts"] == 1 and state["clean_exit"]
    assert newest_step(run) == 12
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text()
             .splitlines() if json.loads(line)["kind"] == "step"]
    # steps 0-6 ran, the crash hit step 7, the restart resumed at 5: 5 and 6 ran twice
    assert steps == list(range(7)) + list(range(5, 12))
    for info in CheckpointManager(run / "checkpoints").entries():
        assert CheckpointManager(run / "checkpoints").load(run / "checkpoints" / info.file)
