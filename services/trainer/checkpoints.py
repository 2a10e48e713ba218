"""Checkpoints of a run: atomic writes, integrity checks, pruning, resume and roll-back.

A checkpoint is written to a temporary file in the run directory, fsynced and renamed into
place, so a crash leaves the old set plus at most one complete new file, never half a
checkpoint under a final name. The manifest ``checkpoints.json`` records each file's sha256
and size; loading checks them and falls back to an older checkpoint when one is damaged.
Pruning keeps the newest ``keep_last`` files and always the newest healthy one, the
roll-back target when training diverges.

One manager writes to a directory at a time: construction removes leftover temp files,
which would include those of another live writer, and the manifest is read only then. So
only the trainer builds one; every other reader (synthesis, the notifier's /sample, the
supervisor, warm starts) uses ``load_checkpoint`` and ``list_checkpoints``, which write,
delete and rewrite nothing. Loading takes tensors and plain data only
(``weights_only=True``): a checkpoint cannot run code; older files convert once with
``upgrade_checkpoint``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoints.json"
MANIFEST_VERSION = 1
TMP_SUFFIX = ".tmp"
_CHECKPOINT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
_HASH_CHUNK_BYTES = 1 << 20


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of ``step``, e.g. ``ckpt-00001200.pt``."""
    return f"ckpt-{step:08d}.pt"


def _step_of(name: str) -> int | None:
    # Only names this module writes count: ``ckpt-000000001.pt`` would parse to step 1 but
    # is not the name of step 1, and pruning must never touch a file it did not name.
    match = _CHECKPOINT_RE.match(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if checkpoint_name(step) == name else None


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be trusted; the message says why."""


class UnsafeCheckpointError(CheckpointError):
    """A sound checkpoint that holds Python objects beyond tensors and plain data: loading
    it would run code. Not skipped like a damaged file (it is not damaged, and skipping it
    would resume or roll back to an older one, or to nothing): the message says how to
    convert it once (``smart-tuner upgrade-checkpoint``)."""


class CheckpointInfo(BaseModel):
    """One manifest entry: which file, its step, its integrity record and its health."""

    # An unhealthy checkpoint is typically one with a NaN loss: keep NaN/inf in the JSON
    # instead of pydantic's default null, which would not validate back as a float.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    file: str
    step: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    healthy: bool
    metrics: dict[str, float] = Field(default_factory=dict)
    created: datetime
    # How well it speaks unseen text (services/trainer/probes.py ProbeSummary.score),
    # recorded when its probe pass finishes; None until then, or with probes off.
    probe_score: float | None = None


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    version: int = MANIFEST_VERSION
    checkpoints: list[CheckpointInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> _Manifest:
        if self.version != MANIFEST_VERSION:
            raise ValueError(f"unknown manifest version {self.version}")
        steps = [entry.step for entry in self.checkpoints]
        if len(set(steps)) != len(steps):
            raise ValueError("duplicate steps")
        for entry in self.checkpoints:
            # Pruning deletes the files the manifest names: a name other than our own
            # (``../something``) must never get that far.
            if entry.file != checkpoint_name(entry.step):
                raise ValueError(f"entry {entry.file!r} does not match step {entry.step}")
        return self


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint that passed validation: its manifest entry and the loaded state."""

    info: CheckpointInfo
    state: dict[str, Any]


def _digest(path: Path) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Windows cannot open a directory; there the rename
    # is as durable as NTFS makes it.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> tuple[str, int]:
    """Write via a temp file in the same directory, fsync, rename; returns (sha256, size)."""
    # Same directory, so os.replace is a rename within one file system and atomic. O_EXCL
    # with 0o666 honours the umask, unlike mkstemp's 0o600, so other services can read.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        record = _digest(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return record


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _needs_globals(error: pickle.UnpicklingError) -> bool:
    """Whether weights-only loading refused a sound file for the Python objects it holds
    (a damaged file fails on its bytes instead)."""
    return "Unsupported global" in str(error)


def _validate(path: Path, info: CheckpointInfo) -> dict[str, Any]:
    """Load ``path`` after checking it against ``info``; raises CheckpointError saying why."""
    if not path.is_file():
        raise CheckpointError("missing")
    size = path.stat().st_size
    if size < info.size:
        raise CheckpointError(f"truncated: {size} of {info.size} bytes")
    if size > info.size:
        raise CheckpointError(f"size mismatch: {size} bytes, manifest says {info.size}")
    if _digest(path)[0] != info.sha256:
        raise CheckpointError("sha256 mismatch")
    try:
        # weights_only: tensors and plain data only, so a checkpoint from elsewhere cannot
        # run code when it is loaded (synthesize --checkpoint, the notifier's /sample).
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _needs_globals(exc):
            raise CheckpointError(f"unreadable: {_first_line(exc)}") from exc
        raise UnsafeCheckpointError(
            "holds Python objects beyond tensors and plain data (written before 2026-12-02, "
            "or by something else), which would run code when loaded; if you trust where it "
            f"came from, convert it once: smart-tuner upgrade-checkpoint {path}") from exc
    except Exception as exc:  # a damaged file can fail in the zip, pickle or tensor layer
        raise CheckpointError(f"unreadable: {_first_line(exc)}") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError("not a checkpoint: expected a dict with a 'step' key")
    return state


def _kept_steps(healthy_by_step: dict[int, bool], keep_last: int,
                probe_scores: dict[int, float] | None = None) -> set[int]:
    """The newest ``keep_last`` steps, the newest healthy one (the roll-back target) and
    the best-speaking one (highest probe score, newest on a tie)."""
    newest_first = sorted(healthy_by_step, reverse=True)
    kept = set(newest_first[:keep_last])
    last_good = next((step for step in newest_first if healthy_by_step[step]), None)
    if last_good is not None:
        kept.add(last_good)
    if probe_scores:
        kept.add(max(probe_scores, key=lambda step: (probe_scores[step], step)))
    return kept


def _probe_scores(entries: dict[int, CheckpointInfo]) -> dict[int, float]:
    return {step: entry.probe_score for step, entry in entries.items()
            if entry.probe_score is not None}


class CheckpointManager:
    """Atomic, verified, pruned checkpoints ``ckpt-{step:08d}.pt`` in one run directory."""

    def __init__(self, directory: Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_temp_files()
        self._entries: dict[int, CheckpointInfo] = {}
        self._reconcile(self._read_manifest())

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives: ``<directory>/checkpoints.json``."""
        return self.directory / MANIFEST_NAME

    def entries(self) -> list[CheckpointInfo]:
        """The manifest entries, oldest step first."""
        return [self._entries[step] for step in sorted(self._entries)]

    def save(
        self,
        state: dict[str, Any],
        step: int,
        healthy: bool,
        metrics: dict[str, float] | None = None,
    ) -> CheckpointInfo:
        """Write ``state`` as the checkpoint of ``step`` atomically, record it, then prune.

        ``healthy`` marks a checkpoint fit to roll back to. Saving a step again replaces
        its file and entry. ``state`` must contain ``"step"``, which loading requires.
        """
        if step < 0:
            raise ValueError("step must be non-negative")
        if "step" not in state:
            raise ValueError("state must contain 'step' (loading rejects a state without it)")
        name = checkpoint_name(step)
        sha256, size = _atomic_write(self.directory / name, lambda fh: torch.save(state, fh))
        info = CheckpointInfo(
            file=name,
            step=step,
            sha256=sha256,
            size=size,
            healthy=healthy,
            metrics=dict(metrics or {}),
            created=datetime.now(UTC),
        )
        candidates = {**self._entries, step: info}
        kept = _kept_steps({s: e.healthy for s, e in candidates.items()}, self.keep_last,
                           _probe_scores(candidates))
        self._entries = {s: e for s, e in candidates.items() if s in kept}
        # Manifest first, deletions after: a crash in between leaves stray files, which the
        # next construction adopts and the next save prunes, never entries without files.
        self._write_manifest()
        for pruned in sorted(set(candidates) - kept):
            (self.directory / candidates[pruned].file).unlink(missing_ok=True)
            logger.info("pruned checkpoint %s", candidates[pruned].file)
        return info

    def latest(self) -> LoadedCheckpoint | None:
        """The newest checkpoint that passes validation, or None; damaged ones are skipped."""
        return self._first_valid(self.entries())

    def record_probe_score(self, step: int, score: float, unhealthy: bool = False) -> bool:
        """Note how checkpoint ``step`` speaks (``unhealthy``: it may no longer serve as the
        rollback target); False when it was pruned meanwhile."""
        entry = self._entries.get(step)
        if entry is None:
            return False
        update: dict[str, Any] = {"probe_score": score}
        if unhealthy:
            update["healthy"] = False
        self._entries[step] = entry.model_copy(update=update)
        self._write_manifest()
        return True

    def best(self) -> LoadedCheckpoint | None:
        """The valid checkpoint that speaks unseen text best (highest probe score, newest
        on a tie); None when no checkpoint has a probe score."""
        scored = [entry for entry in self.entries() if entry.probe_score is not None]
        scored.sort(key=lambda entry: (entry.probe_score, entry.step))
        return self._first_valid(scored)

    def last_good(self) -> LoadedCheckpoint | None:
        """The newest healthy checkpoint that passes validation, or None."""
        return self._first_valid([entry for entry in self.entries() if entry.healthy])

    def load(self, path: Path | str) -> LoadedCheckpoint:
        """Load and validate one checkpoint; raises CheckpointError saying why it failed.

        A bare file name is looked up in the run directory. A file without a manifest entry
        is accepted when torch can load it, and counts as not healthy.
        """
        path = Path(path)
        if len(path.parts) == 1:
            path = self.directory / path
        try:
            info = self._entry_for(path)
            if info is None:
                if not path.is_file():
                    raise CheckpointError("missing")
                info = self._unlisted_info(path)
            state = _validate(path, info)
        except CheckpointError as exc:
            raise type(exc)(f"{path}: {exc}") from exc
        step = state["step"]
        if _step_of(path.name) is None and isinstance(step, int) and step >= 0:
            # A file name of someone else's carries no step; the state's own is the record.
            info = info.model_copy(update={"step": step})
        return LoadedCheckpoint(info=info, state=state)

    # -- internals ---------------------------------------------------------------------

    def _first_valid(self, candidates: list[CheckpointInfo]) -> LoadedCheckpoint | None:
        for info in reversed(candidates):
            path = self.directory / info.file
            try:
                return LoadedCheckpoint(info=info, state=_validate(path, info))
            except UnsafeCheckpointError as exc:
                raise UnsafeCheckpointError(f"{path}: {exc}") from exc
            except CheckpointError as exc:
                logger.warning("skipping checkpoint %s: %s; trying an older one", path, exc)
        return None

    def _entry_for(self, path: Path) -> CheckpointInfo | None:
        if path.parent.resolve() != self.directory.resolve():
            return None
        step = _step_of(path.name)
        return self._entries.get(step) if step is not None else None

    @staticmethod
    def _unlisted_info(path: Path) -> CheckpointInfo:
        # No integrity record exists for such a file: record what is there now, so the
        # size and sha256 checks pass and torch.load decides.
        sha256, size = _digest(path)
        step = _step_of(path.name)
        return CheckpointInfo(
            file=path.name,
            step=step if step is not None else 0,
            sha256=sha256,
            size=size,
            healthy=False,
            created=datetime.fromtimestamp(path.stat().st_mtime, tz=UTC),
        )

    def _remove_temp_files(self) -> None:
        for path in self.directory.iterdir():
            if path.name.endswith(TMP_SUFFIX) and path.is_file():
                path.unlink(missing_ok=True)
                logger.info("removed %s, left by an interrupted write", path)

    def _read_manifest(self) -> dict[int, CheckpointInfo] | None:
        """The manifest's entries; {} when there is none yet, None when it is unreadable."""
        if not self.manifest_path.exists():
            return {}
        try:
            manifest = _Manifest.model_validate_json(self.manifest_path.read_bytes())
        except (OSError, ValidationError) as exc:
            logger.warning(
                "manifest %s is unreadable (%s); rebuilding it from the checkpoint files on "
                "disk, all treated as not healthy",
                self.manifest_path,
                _first_line(exc),
            )
            return None
        return {entry.step: entry for entry in manifest.checkpoints}

    def _reconcile(self, listed: dict[int, CheckpointInfo] | None) -> None:
        """Set the entries to match the files on disk; persist them if that changed any."""
        changed = listed is None
        entries = dict(listed or {})
        on_disk = {
            step: path
            for path in self.directory.iterdir()
            if (step := _step_of(path.name)) is not None and path.is_file()
        }
        for step in sorted(set(entries) - set(on_disk)):
            logger.warning("checkpoint %s is in the manifest but missing; dropping its entry",
                           entries.pop(step).file)
            changed = True
        for step in sorted(set(on_disk) - set(entries)):
            if listed is not None:
                # Renamed into place but never recorded: a crash before the manifest write.
                logger.warning("checkpoint %s is not in the manifest; adopting it as not "
                               "healthy", on_disk[step])
            entries[step] = self._unlisted_info(on_disk[step])
            changed = True
        self._entries = entries
        if changed:
            self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = _Manifest(checkpoints=self.entries())
        text = manifest.model_dump_json(indent=2).encode()
        _atomic_write(self.manifest_path, lambda fh: fh.write(text))


# The checkpoint folder inside a run folder (the Trainer's, as training.CHECKPOINT_DIR).
RUN_CHECKPOINT_SUBDIR = "checkpoints"


def _entries_on_disk(folder: Path) -> dict[int, CheckpointInfo]:
    """The manifest's entries whose files exist, plus unlisted files as not healthy.

    What CheckpointManager's construction reconciles, without writing anything.
    """
    listed: dict[int, CheckpointInfo] = {}
    manifest = folder / MANIFEST_NAME
    if manifest.exists():
        try:
            entries = _Manifest.model_validate_json(manifest.read_bytes()).checkpoints
            listed = {entry.step: entry for entry in entries}
        except (OSError, ValidationError) as exc:
            logger.warning("manifest %s is unreadable (%s); all its checkpoints count as not "
                           "healthy", manifest, _first_line(exc))
    found: dict[int, CheckpointInfo] = {}
    for path in folder.iterdir():
        step = _step_of(path.name)
        if step is not None and path.is_file():
            found[step] = listed.get(step) or CheckpointManager._unlisted_info(path)
    return found


def list_checkpoints(folder: Path) -> list[CheckpointInfo]:
    """The checkpoints of ``folder`` (manifest entries whose files exist, and unlisted files
    as not healthy), oldest first; [] for a folder that does not exist.

    Read-only, unlike constructing a CheckpointManager (which removes temp files, among
    them a live trainer's checkpoint being written, and may rewrite the manifest): what
    every reader of another process's checkpoints uses.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = _entries_on_disk(folder)
    return [entries[step] for step in sorted(entries)]


def load_checkpoint(path: Path | str, best: bool = False) -> LoadedCheckpoint:
    """A checkpoint file, or the newest valid one when ``path`` is a run or checkpoint folder
    (with ``best``, the one whose inference probes scored best; FileNotFoundError when no
    checkpoint there has a probe score).

    Read-only: a CheckpointManager removes temp files and rewrites the manifest of its
    folder, which would break a run that is still writing there; this touches nothing, so
    it is safe on a live run (synthesis, warm start). In a folder a damaged checkpoint is
    skipped with a warning; a damaged file named directly raises CheckpointError.
    """
    path = Path(path)
    if path.is_dir():
        folder = (path / RUN_CHECKPOINT_SUBDIR if (path / RUN_CHECKPOINT_SUBDIR).is_dir()
                  else path)
        entries = _entries_on_disk(folder)
        order = sorted(entries, reverse=True)
        if best:
            scores = _probe_scores(entries)
            if not scores:
                raise FileNotFoundError(f"no checkpoint in {folder} has probe scores (the "
                                        "run had probes off, or none finished yet)")
            order = sorted(scores, key=lambda s: (scores[s], s), reverse=True)
        for step in order:
            try:
                return LoadedCheckpoint(info=entries[step],
                                        state=_validate(folder / entries[step].file,
                                                        entries[step]))
            except UnsafeCheckpointError as exc:
                raise UnsafeCheckpointError(f"{folder / entries[step].file}: {exc}") from exc
            except CheckpointError as exc:
                logger.warning("skipping checkpoint %s: %s; trying an older one",
                               folder / entries[step].file, exc)
        raise FileNotFoundError(f"no valid checkpoint in {folder}")
    if best:
        raise ValueError(f"{path}: --best picks among a run's checkpoints: give its folder")
    try:
        if not path.is_file():
            raise CheckpointError("missing")
        step = _step_of(path.name)
        info = _entries_on_disk(path.parent).get(step) if step is not None else None
        info = info or CheckpointManager._unlisted_info(path)
        state = _validate(path, info)
    except CheckpointError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    saved_step = state["step"]
    if step is None and isinstance(saved_step, int) and saved_step >= 0:
        # A file name of someone else's carries no step; the state's own is the record.
        info = info.model_copy(update={"step": saved_step})
    return LoadedCheckpoint(info=info, state=state)


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of python ``random``, numpy's global generator, torch CPU and CUDA.

    Store it in a checkpoint so that a resumed run draws the same dropout masks and
    shuffles as an uninterrupted one.
    """
    # numpy's state as plain data and a tensor (not the ndarray get_state returns), so the
    # checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured; CUDA only on the devices present."""
    python = state["python"]
    # weights_only loading gives lists where pickling gave tuples.
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss),
                         float(cached_gaussian)))
    # torch only accepts a CPU ByteTensor, whatever map_location the checkpoint had.
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        logger.warning("checkpoint has CUDA RNG state but CUDA is unavailable; not restored")
        return
    device_count = torch.cuda.device_count()
    if len(cuda_states) != device_count:
        logger.warning("checkpoint has CUDA RNG state for %d devices, %d present; restoring "
                       "the first %d", len(cuda_states), device_count,
                       min(len(cuda_states), device_count))
    for device, device_state in enumerate(cuda_states[:device_count]):
        torch.cuda.set_rng_state(device_state.cpu(), device)


def _plain(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as tensors and Python numbers, recursively."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(item) for item in value)
    return value


def upgrade_checkpoint(path: Path) -> bool:
    """Rewrite a checkpoint that ``weights_only`` loading refuses (pickled numpy arrays, as
    this project wrote them before 2026-12-02) as tensors and plain data; True when it was
    rewritten, False when it already loads safely.

    It unpickles the file in full, which runs whatever code the file holds: call it only on
    files you trust. Atomic; the manifest beside it, if any, gets the new sha256 and size.
    Not while a trainer writes to the same folder (two manifest writers).
    """
    path = Path(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return False
    except pickle.UnpicklingError as exc:
        if not _needs_globals(exc):
            raise CheckpointError(f"{path}: unreadable: {_first_line(exc)}") from exc
    state = _plain(torch.load(path, map_location="cpu", weights_only=False))
    if isinstance(state.get("rng"), dict) and isinstance(state["rng"].get("numpy"), tuple):
        name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
        state["rng"]["numpy"] = [name, keys.to(torch.int64), int(pos), int(has_gauss),
                                 float(cached)]
    sha256, size = _atomic_write(path, lambda fh: torch.save(state, fh))
    manifest = path.parent / MANIFEST_NAME
    step = _step_of(path.name)
    if manifest.exists() and step is not None:
        listed = _Manifest.model_validate_json(manifest.read_bytes())
        entries = [entry.model_copy(update={"sha256": sha256, "size": size})
                   if entry.step == step else entry for entry in listed.checkpoints]
        text = _Manifest(checkpoints=entries).model_dump_json(indent=2).encode()
        _atomic_write(manifest, lambda fh: fh.write(text))
    logger.info("upgraded %s to a weights-only checkpoint", path)
    return True
