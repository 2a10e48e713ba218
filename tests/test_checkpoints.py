"""Checkpoint manager: atomic writes, integrity checks, pruning, fall-back and RNG state."""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.trainer.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    checkpoint_name,
    restore_rng_state,
)

LOGGER = "services.trainer.checkpoints"


def _training_state(step: int, seed: int = 0) -> dict[str, Any]:
    """A real model + Adam state after one optimisation step."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()
    return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _small_state(step: int) -> dict[str, Any]:
    return {"step": step, "weight": torch.full((2,), float(step))}


def _files_on_disk(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.startswith("ckpt-")}


def _assert_same(a: Any, b: Any) -> None:
    """Nested equality of state dicts, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_keeps_model_and_optimizer_tensors(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run")
    state = _training_state(step=100)
    info = manager.save(state, step=100, healthy=True, metrics={"loss": 0.5})

    loaded = manager.latest()
    assert loaded is not None
    _assert_same(state, loaded.state)
    assert loaded.info == info
    assert info.file == "ckpt-00000100.pt"
    assert info.size == (tmp_path / "run" / info.file).stat().st_size
    assert info.metrics == {"loss": 0.5}
    # The loaded state actually restores a model and its optimizer.
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(loaded.state["model"])
    torch.optim.Adam(model.parameters()).load_state_dict(loaded.state["optimizer"])


def test_manifest_records_each_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(1), step=1, healthy=True)
    manager.save(_small_state(2), step=2, healthy=False, metrics={"loss": float("nan")})

    raw = json.loads((tmp_path / MANIFEST_NAME).read_text(), parse_constant=float)
    entries = raw["checkpoints"]
    assert [e["file"] for e in entries] == [checkpoint_name(1), checkpoint_name(2)]
    assert set(entries[0]) == {"file", "step", "sha256", "size", "healthy", "metrics", "created",
                               "probe_score"}
    # A NaN metric (the typical unhealthy checkpoint) survives a reload of the manifest.
    reopened = CheckpointManager(tmp_path)
    assert math.isnan(reopened.entries()[1].metrics["loss"])
    assert [e.healthy for e in reopened.entries()] == [True, False]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    for step in (10, 20):
        manager.save(_training_state(step), step=step, healthy=True)
    assert {p.name for p in tmp_path.iterdir()} == {
        checkpoint_name(10), checkpoint_name(20), MANIFEST_NAME,
    }


def test_failed_write_keeps_previous_checkpoint_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(1), step=1, healthy=True)
    manifest_before = (tmp_path / MANIFEST_NAME).read_bytes()

    def half_write_then_crash(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        manager.save(_small_state(2), step=2, healthy=True)

    assert {p.name for p in tmp_path.iterdir()} == {checkpoint_name(1), MANIFEST_NAME}
    assert (tmp_path / MANIFEST_NAME).read_bytes() == manifest_before
    monkeypatch.undo()
    loaded = manager.latest()
    assert loaded is not None and loaded.info.step == 1


def test_prune_keeps_last_k_and_older_last_good(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(_small_state(100), step=100, healthy=True)
    for step in (200, 300, 400, 500):
        manager.save(_small_state(step), step=step, healthy=False)

    kept = {checkpoint_name(s) for s in (100, 400, 500)}
    assert _files_on_disk(tmp_path) == kept
    assert [e.step for e in manager.entries()] == [100, 400, 500]

    # A newer healthy checkpoint takes over as the last good; the old one goes.
    manager.save(_small_state(600), step=600, healthy=True)
    assert _files_on_disk(tmp_path) == {checkpoint_name(s) for s in (500, 600)}


def test_last_good_skips_unhealthy(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(_small_state(1), step=1, healthy=True)
    manager.save(_small_state(2), step=2, healthy=True)
    manager.save(_small_state(3), step=3, healthy=False)

    good = manager.last_good()
    latest = manager.latest()
    assert good is not None and good.info.step == 2 and good.state["step"] == 2
    assert latest is not None and latest.info.step == 3


def test_no_checkpoints_gives_none(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.latest() is None and manager.last_good() is None and manager.entries() == []
    manager.save(_small_state(1), step=1, healthy=False)
    assert manager.last_good() is None


def test_truncated_newest_falls_back_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_training_state(1), step=1, healthy=True)
    manager.save(_training_state(2), step=2, healthy=True)
    newest = tmp_path / checkpoint_name(2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = manager.latest()
    assert loaded is not None and loaded.info.step == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(checkpoint_name(2) in m and "truncated" in m for m in warnings), warnings
    assert any(f"{len(data) // 2} of {len(data)} bytes" in m for m in warnings)


def test_flipped_byte_is_a_sha256_mismatch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_training_state(1), step=1, healthy=True)
    manager.save(_training_state(2), step=2, healthy=True)
    newest = tmp_path / checkpoint_name(2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = manager.last_good()
    assert loaded is not None and loaded.info.step == 1
    assert any(checkpoint_name(2) in r.getMessage() and "sha256 mismatch" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        manager.load(newest)


def test_every_checkpoint_damaged_gives_none(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(1), step=1, healthy=True)
    (tmp_path / checkpoint_name(1)).write_bytes(b"")
    assert manager.latest() is None and manager.last_good() is None


def test_garbage_manifest_is_rebuilt_from_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    for step in (1, 2):
        manager.save(_small_state(step), step=step, healthy=True)
    (tmp_path / MANIFEST_NAME).write_bytes(b"\x00{not json at all")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rebuilt = CheckpointManager(tmp_path)
    assert any("manifest" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    assert [(e.step, e.healthy) for e in rebuilt.entries()] == [(1, False), (2, False)]
    latest = rebuilt.latest()
    assert latest is not None and latest.info.step == 2
    assert rebuilt.last_good() is None
    # The rebuilt manifest is written back, so the next start reads it without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        CheckpointManager(tmp_path)
    assert not caplog.records


def test_manifest_naming_a_foreign_file_counts_as_corrupt(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(1), step=1, healthy=True)
    victim = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    victim.write_text("keep me")
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["checkpoints"][0]["file"] = f"../{victim.name}"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))

    reopened = CheckpointManager(tmp_path, keep_last=1)
    reopened.save(_small_state(2), step=2, healthy=False)
    reopened.save(_small_state(3), step=3, healthy=False)
    assert victim.read_text() == "keep me"


def test_file_missing_from_manifest_is_loaded_as_not_healthy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(1), step=1, healthy=True)
    # A crash between the rename and the manifest write: the file is there, unrecorded.
    torch.save(_training_state(2), tmp_path / checkpoint_name(2))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        reopened = CheckpointManager(tmp_path)
    assert any(checkpoint_name(2) in r.getMessage() for r in caplog.records)
    latest = reopened.latest()
    assert latest is not None and latest.info.step == 2 and not latest.info.healthy
    _assert_same(latest.state, _training_state(2))
    good = reopened.last_good()
    assert good is not None and good.info.step == 1
    assert _files_on_disk(tmp_path) == {e.file for e in reopened.entries()}


def test_unlisted_unreadable_file_is_skipped(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(1), step=1, healthy=True)
    (tmp_path / checkpoint_name(2)).write_bytes(b"not a torch file")
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and latest.info.step == 1


def test_manifest_entry_without_file_is_dropped(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(1), step=1, healthy=True)
    manager.save(_small_state(2), step=2, healthy=True)
    (tmp_path / checkpoint_name(2)).unlink()
    reopened = CheckpointManager(tmp_path)
    assert [e.step for e in reopened.entries()] == [1]
    # And when a file vanishes after start-up, loading skips it.
    (tmp_path / checkpoint_name(1)).unlink()
    assert reopened.latest() is None


def test_stale_temp_file_removed_at_construction(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    CheckpointManager(tmp_path).save(_small_state(1), step=1, healthy=True)
    stale = tmp_path / f".{checkpoint_name(2)}.1234.abcd.tmp"
    stale.write_bytes(b"half a checkpoint")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        manager = CheckpointManager(tmp_path)
    assert not stale.exists()
    assert any(stale.name in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert [e.step for e in manager.entries()] == [1]


def test_saving_same_step_twice_keeps_one_entry(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_small_state(5), step=5, healthy=True)
    second = manager.save({"step": 5, "weight": torch.ones(3)}, step=5, healthy=False)

    assert manager.entries() == [second]
    assert _files_on_disk(tmp_path) == {checkpoint_name(5)}
    loaded = manager.latest()
    assert loaded is not None and torch.equal(loaded.state["weight"], torch.ones(3))
    assert [e.step for e in CheckpointManager(tmp_path).entries()] == [5]


def test_load_by_name_and_foreign_path(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run")
    info = manager.save(_small_state(7), step=7, healthy=True)
    assert manager.load(info.file).info == info

    foreign = tmp_path / "warm-start.pt"
    torch.save(_small_state(42), foreign)
    loaded = manager.load(foreign)
    assert loaded.info.step == 42 and not loaded.info.healthy

    torch.save({"no": "step"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'step'"):
        manager.load(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing"):
        manager.load(tmp_path / "absent.pt")


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="'step'"):
        manager.save({"weight": torch.ones(1)}, step=1, healthy=True)
    with pytest.raises(ValueError, match="non-negative"):
        manager.save(_small_state(-1), step=-1, healthy=True)
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None)
@given(
    keep_last=st.integers(min_value=1, max_value=4),
    saves=st.lists(st.tuples(st.integers(min_value=0, max_value=30), st.booleans()),
                   min_size=1, max_size=12),
)
def test_pruning_properties(keep_last: int, saves: list[tuple[int, bool]]) -> None:
    # A fresh directory per example: pytest's tmp_path is shared across hypothesis examples.
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        manager = CheckpointManager(directory, keep_last=keep_last)
        alive: dict[int, bool] = {}  # step -> healthy, of the checkpoints that should exist
        ever_saved: set[int] = set()
        for step, healthy in saves:
            manager.save(_small_state(step), step=step, healthy=healthy)
            alive[step] = healthy
            ever_saved.add(step)
            newest_healthy = max((s for s, h in alive.items() if h), default=None)

            on_disk = _files_on_disk(directory)
            entries = manager.entries()
            assert on_disk == {e.file for e in entries}
            assert len(on_disk) <= keep_last + 1
            newest = sorted(ever_saved, reverse=True)[:keep_last]
            assert {checkpoint_name(s) for s in newest} <= on_disk
            if newest_healthy is not None:
                assert checkpoint_name(newest_healthy) in on_disk
            alive = {e.step: e.healthy for e in entries}

        reopened = CheckpointManager(directory, keep_last=keep_last)
        assert reopened.entries() == manager.entries()
        latest = reopened.latest()
        assert latest is not None and latest.info.step == max(ever_saved)
        good = reopened.last_good()
        expected_good = max((e.step for e in entries if e.healthy), default=None)
        assert (good.info.step if good else None) == expected_good


def _draw() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_state_restores_python_numpy_and_torch() -> None:
    state = capture_rng_state()
    first = _draw()
    restore_rng_state(state)
    assert _draw() == first
    assert _draw() != first  # the generators really moved on


def test_rng_state_survives_a_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1, "rng": capture_rng_state()}, step=1, healthy=True)
    first = _draw()
    loaded = manager.latest()
    assert loaded is not None
    restore_rng_state(loaded.state["rng"])
    assert _draw() == first
