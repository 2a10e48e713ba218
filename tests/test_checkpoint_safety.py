"""Reading checkpoints is safe: nothing in them runs code, and no reader touches a live run.

- Checkpoints load with ``torch.load(weights_only=True)``: a file that would run code when
  unpickled is refused before any of its code runs, with the way to convert a trusted
  one (``smart-tuner upgrade-checkpoint --trusted``), which keeps old runs usable.
- A reader of another process's checkpoints (the supervisor, /sample, synthesis) never
  writes, deletes or rewrites anything in the run folder: the trainer's checkpoint being
  written (a temp file) survives every reader.
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.launcher.supervisor import newest_step
from services.trainer.checkpoints import (
    MANIFEST_NAME,
    TMP_SUFFIX,
    CheckpointManager,
    UnsafeCheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    upgrade_checkpoint,
)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


def _state(step: int) -> dict[str, Any]:
    return {"step": step, "model": {"w": torch.ones(3)}, "rng": capture_rng_state(),
            "mel_mean": torch.zeros(4), "mel_std": torch.ones(4)}


def _old_format(step: int) -> dict[str, Any]:
    """What this project saved before 2026-12-02: numpy arrays in the RNG and the mel
    statistics, which only a full unpickle loads."""
    state = _state(step)
    state["rng"]["numpy"] = np.random.get_state()
    state["mel_mean"], state["mel_std"] = np.zeros(4, np.float32), np.ones(4, np.float32)
    return state


def test_a_checkpoint_that_runs_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    manager = CheckpointManager(tmp_path / "ckpts")
    manager.save({"step": 5, "model": {}, "evil": _Payload(marker)}, 5, healthy=True)
    assert not marker.exists()  # saving did not run it
    with pytest.raises(UnsafeCheckpointError, match="upgrade-checkpoint"):
        load_checkpoint(tmp_path / "ckpts")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tmp_path / "ckpts" / "ckpt-00000005.pt")
    with pytest.raises(UnsafeCheckpointError):  # not skipped like a damaged file
        CheckpointManager(tmp_path / "ckpts").latest()
    assert not marker.exists()


def test_what_the_project_saves_loads_weights_only_and_restores_every_stream(
        tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    manager = CheckpointManager(tmp_path)
    manager.save(_state(7), 7, healthy=True)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    state = torch.load(tmp_path / "ckpt-00000007.pt", weights_only=True)
    restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_an_old_checkpoint_converts_once_and_then_loads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints")
    manager.save(_old_format(3), 3, healthy=True)
    manager.save(_old_format(6), 6, healthy=False)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(run)
    # The command insists on being told the files are trusted.
    wide = {**os.environ, "COLUMNS": "400"}  # rich must not wrap the lines checked below
    refused = subprocess.run([sys.executable, "-m", "services.cli", "upgrade-checkpoint",
                              str(run)], capture_output=True, text=True, env=wide)
    assert refused.returncode == 2 and "--trusted" in refused.stdout
    done = subprocess.run([sys.executable, "-m", "services.cli", "upgrade-checkpoint",
                           "--trusted", str(run)], capture_output=True, text=True, env=wide)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(".pt: upgraded") == 2
    loaded = load_checkpoint(run)  # manifest sha256 and size follow the rewrite
    assert loaded.info.step == 6 and isinstance(loaded.state["mel_mean"], torch.Tensor)
    assert [e.healthy for e in CheckpointManager(run / "checkpoints").entries()] == [True, False]
    restore_rng_state(loaded.state["rng"])
    assert upgrade_checkpoint(run / "checkpoints" / "ckpt-00000006.pt") is False  # idempotent


def test_readers_never_touch_a_live_run_folder(tmp_path: Path, monkeypatch) -> None:
    """The trainer is writing its next checkpoint (a temp file) while the supervisor, the
    notifier's /sample and synthesis read the folder."""
    from services.notifier.sample import speak

    run = tmp_path / "run"
    folder = run / "checkpoints"
    CheckpointManager(folder).save(_state(4), 4, healthy=True)
    in_flight = folder / f".ckpt-00000008.pt.{os.getpid()}.abc{TMP_SUFFIX}"
    in_flight.write_bytes(b"half a checkpoint")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}

    assert newest_step(run) == 4
    assert [e.step for e in list_checkpoints(folder)] == [4]
    assert load_checkpoint(run).info.step == 4
    with pytest.raises(Exception):  # noqa: B017 - a weights dict of one tensor cannot speak
        speak(tmp_path, "run", "hello")

    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    assert after == before  # nothing written, deleted or rewritten, the temp file included
    assert MANIFEST_NAME in after and in_flight.name in after


def test_a_pickle_stream_is_what_the_payload_test_guards_against(tmp_path: Path) -> None:
    """The payload really runs code when fully unpickled (so the refusal above means
    something)."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "pwned"
