"""Checkpointing a run: what a checkpoint holds, resuming, warm start, health and rollback.

The files themselves (atomic writes, manifest, retention, validation) are
services/trainer/checkpoints.py; this module decides what the trainer puts in them and
takes back out:

- the checkpoint state: the loop's counters and history, the feed's position, the step
  engine's optimisation state, the RNG streams and the feature normalisation;
- where a resumed run continues (latest, last good or best checkpoint);
- the warm start from another run's weights (services/trainer/warm_start.py merges them);
- the health rule that makes a checkpoint a rollback target, and the rollback to it.

Rank 0 alone writes checkpoints; the other ranks of a distributed run get what it loads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.core import indicators
from services.trainer import distributed
from services.trainer import text as text_frontend
from services.trainer.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    LoadedCheckpoint,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from services.trainer.config import TrainConfig
from services.trainer.distributed import DistInfo
from services.trainer.engine import EvalResult
from services.trainer.model import Tacotron2
from services.trainer.run_folder import RunFolder
from services.trainer.warm_start import (
    WarmStartError,
    WarmStartReport,
    describe,
    merge_state_dicts,
)

if TYPE_CHECKING:  # the Trainer composes this part; the part reads and sets its state
    from services.trainer.training import Trainer

# A child of the trainer's logger: what was logged by the trainer before the split still is
# (a level or handler set on services.trainer.training covers it).
log = logging.getLogger("services.trainer.training.checkpointing")

RESUME_FROM = ("latest", "last_good", "best")


def fork_rng(dist: DistInfo, seed: int, step: int) -> None:
    """Ranks other than 0 draw their own dropout masks, from a seed fixed by the step."""
    if dist.distributed and not dist.is_main:
        torch.manual_seed(distributed.rank_seed(seed, dist.rank, step))


class Health:
    """The health rule: may the state about to be saved serve as the rollback target?

    It watches the steps since the last checkpoint: one skipped (non-finite) step or a
    pre-clip grad norm over the red flag makes the next checkpoint unhealthy.
    """

    def __init__(self) -> None:
        self.skips = 0
        self.max_norm = 0.0

    def note_step(self, finite: bool, grad_norm: float) -> None:
        """One optimizer step: its norm when finite, else a skip."""
        if finite:
            self.max_norm = max(self.max_norm, grad_norm)
        else:
            self.skips += 1

    def reset(self) -> None:
        """A checkpoint was saved: the next one is judged on the steps after it."""
        self.skips = 0
        self.max_norm = 0.0

    def healthy(self, result: EvalResult | None, aligned_once: bool) -> bool:
        """Whether the state at the evaluation ``result`` may be a rollback target."""
        if self.skips or not math.isfinite(self.max_norm):
            return False
        if self.max_norm > indicators.GRAD_NORM_RED_FLAG:
            return False
        if result is None or not math.isfinite(result.losses["objective"]):
            return False
        # Once aligned, a checkpoint that lost the alignment is no rollback target.
        return not (aligned_once and result.scores["diagonality"] < indicators.DIAGONALITY_WEAK)


class SaveFailures:
    """Checkpoints that could not be written (disk full, quota, I/O error): when to retry,
    and since when it fails. Training goes on meanwhile: losing the run to a full disk is
    worse than running a while without a new checkpoint."""

    def __init__(self, retry_every: int) -> None:
        self.retry_every = retry_every
        self.count = 0  # failed attempts over the run (this process)
        self.since: int | None = None  # step of the first failure of the current episode
        self.retry_at: int | None = None
        self.last_error = ""

    def failed(self, step: int, error: OSError) -> None:
        """An attempt at ``step`` failed with ``error``."""
        self.count += 1
        self.since = step if self.since is None else self.since
        self.retry_at = step + self.retry_every
        self.last_error = describe_os_error(error)

    def succeeded(self) -> int | None:
        """A checkpoint was written; returns the step the failures began at, if they had."""
        since, self.since, self.retry_at = self.since, None, None
        return since


def describe_os_error(error: OSError) -> str:
    """``No space left on device (errno 28)``: what a person can act on, without a path."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason} (errno {error.errno})" if error.errno is not None else reason


class Checkpointing:
    """One run's checkpoints: the manager (rank 0's alone), the health rule, the state."""

    def __init__(self, cfg: TrainConfig, run_folder: RunFolder, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        # Only rank 0 writes checkpoints; the others get what it loads by broadcast.
        self.manager: CheckpointManager | None = (
            CheckpointManager(run_folder.checkpoint_dir, cfg.run.keep_last)
            if dist.is_main else None)
        self.health = Health()
        self.run_folder = run_folder
        self.failures = SaveFailures(retry_every=cfg.run.eval_every)

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due at ``step``: its interval, or a retry after a failure."""
        retry_at = self.failures.retry_at
        return step % self.cfg.run.checkpoint_every == 0 or (retry_at is not None
                                                             and step >= retry_at)

    def try_save(self, trainer: Trainer) -> CheckpointInfo | None:
        """``save``, but a write that fails (disk full, quota, I/O error) is reported and
        retried ``eval_every`` steps later instead of ending the run; None when it failed.

        The trainer's observers hear ``checkpoint_failed`` (critical: the notifier sends it
        at once) at every failed attempt, and ``checkpoint_recovered`` when one is written
        again. A half-written file never stays: the atomic write removes its temp file.
        """
        try:
            info = self.save(trainer)
        except OSError as error:
            self.failures.failed(trainer.step, error)
            detail = (f"checkpoint at step {trainer.step} not saved: "
                      f"{self.failures.last_error}; training goes on, next attempt at step "
                      f"{self.failures.retry_at} (free space in {self.run_folder.path})")
            log.error("%s", detail)
            trainer.lifecycle("checkpoint_failed", detail, error=self.failures.last_error,
                              failures=self.failures.count, since_step=self.failures.since,
                              retry_at=self.failures.retry_at)
            return None
        since = self.failures.succeeded()
        if since is not None:
            detail = (f"checkpoint at step {info.step} saved after failures since step "
                      f"{since} ({self.failures.count} failed attempts)")
            log.warning("%s", detail)
            trainer.lifecycle("checkpoint_recovered", detail, since_step=since,
                              failures=self.failures.count)
        return info

    def find_resume(self, resume_from: str) -> LoadedCheckpoint | None:
        """The checkpoint ``--resume-from`` names (one of RESUME_FROM), or None if none."""
        assert self.manager is not None
        match resume_from:
            case "latest":
                loaded = self.manager.latest()
            case "best":  # the one that spoke the probes best; else as last_good
                loaded = (self.manager.best() or self.manager.last_good()
                          or self.manager.latest())
            case _:
                loaded = self.manager.last_good() or self.manager.latest()
        if loaded is None:
            log.warning("--resume: no valid checkpoint in %s; starting from step 0",
                        self.manager.directory)
        return loaded

    def state(self, trainer: Trainer) -> dict[str, Any]:
        """What a checkpoint holds (the checkpoint format: keys in this order)."""
        return {
            "step": trainer.step,
            **trainer.feed.state_dict(),
            "skipped_steps": trainer.skipped_steps,
            "guarded_steps": trainer.guarded_steps,
            **trainer.engine.state_dict(),
            "rng": capture_rng_state(),
            "overrides": list(trainer.overrides),
            "config": self.cfg.model_dump(mode="json"),
            "run_id": trainer.run_state.run_id,
            "recent_norms": list(trainer.recent_norms),
            "recent_guarded": list(trainer.recent_guarded),
            # Synthesis needs the feature normalisation the model was trained with.
            # Tensors, not ndarrays: the file must load with weights_only=True.
            "mel_mean": torch.as_tensor(np.asarray(trainer.feed.store.mean, dtype=np.float32)),
            "mel_std": torch.as_tensor(np.asarray(trainer.feed.store.std, dtype=np.float32)),
        }

    def restore(self, trainer: Trainer, loaded: LoadedCheckpoint) -> None:
        """Put the trainer back in the state ``loaded`` holds: weights, position, history."""
        state = loaded.state
        trained_symbols = int(state["config"]["model"]["n_symbols"])
        if trained_symbols != self.cfg.model.n_symbols:
            # Resuming needs the optimizer's moments for every embedding row too: a
            # different table cannot continue; a warm start copies what still fits.
            raise ValueError(
                f"{loaded.info.file}: trained with a symbol table of {trained_symbols} "
                f"symbols, this front-end has {self.cfg.model.n_symbols} (the stress "
                f"symbol {text_frontend.STRESS!r} was added after it); it cannot be resumed "
                f"- start a new run with --warm-start {loaded.info.file}, which keeps every "
                "weight and extends the embedding")
        trainer.engine.load_state_dict(state)
        trainer.step = int(state["step"])
        trainer.feed.load_state_dict(state)
        trainer.skipped_steps = int(state["skipped_steps"])
        # Checkpoints from before the spike guard count none.
        trainer.guarded_steps = int(state.get("guarded_steps", 0))
        trainer.overrides = list(state["overrides"])
        trainer.recent_norms.clear()
        trainer.recent_norms.extend(state.get("recent_norms", []))
        trainer.recent_guarded.clear()
        trainer.recent_guarded.extend(state.get("recent_guarded", []))
        restore_rng_state(state["rng"])
        # Rank 0 continues the saved stream, the others fork their own.
        fork_rng(self.dist, self.cfg.run.seed, trainer.step)
        log.info("resumed from %s at step %d", loaded.info.file, trainer.step)

    def save(self, trainer: Trainer) -> CheckpointInfo:
        """Save the trainer's state now (atomic), judged by the health rule.

        The evaluation of this step (made now if there is none) goes in the manifest and,
        with the steps since the last checkpoint, decides whether this one is a rollback
        target. Then the validation alignment plot, the checkpoint's probe pass and the
        observers. Rank 0's job in a distributed run: every rank holds the same state, and
        one writer keeps the checkpoint directory consistent.
        """
        if self.manager is None:
            raise RuntimeError(f"rank {self.dist.rank} does not write checkpoints; rank 0 does")
        if trainer.last_eval is None or trainer.last_eval.step != trainer.step:
            trainer.evaluate()
        result, record = trainer.last_eval, trainer.run_state
        assert result is not None
        metrics = dict(result.losses) | dict(result.scores)
        info = self.manager.save(self.state(trainer), trainer.step,
                                 self.health.healthy(result, record.aligned_once), metrics)
        if record.consecutive_restarts and info.healthy:
            # Progress after a restart: the crash loop, if any, is over.
            record.consecutive_restarts = 0
            trainer.run_folder.save_record(record)
        self.health.reset()
        trainer.run_folder.save_alignment_plot(result)
        trainer.probing.submit(trainer.model, trainer.step)
        for observer in trainer.observers:
            observer.on_checkpoint(trainer, info)
        return info

    def rollback(self, trainer: Trainer, checkpoint: LoadedCheckpoint | None = None
                 ) -> LoadedCheckpoint | None:
        """Restore the weights and data position of ``checkpoint`` or the last good one.

        The run-time settings (LR, guided attention weight, clip threshold, gate weight,
        spike guard), the history (overrides, skipped and guarded step counts) and the
        utterances left out stay as they are: a rollback is
        usually paired with a corrective setting, which must not be undone by it. The
        trainer's step moves back; returns what was restored (None: nothing to restore).
        """
        loaded = checkpoint
        if loaded is None and self.manager is not None:
            loaded = self.manager.last_good()
        if loaded is None:
            return None
        kept = (list(trainer.overrides), trainer.skipped_steps, trainer.guarded_steps,
                trainer.engine.settings(), set(trainer.feed.excluded))
        self.restore(trainer, loaded)
        (trainer.overrides, trainer.skipped_steps, trainer.guarded_steps, settings,
         trainer.feed.excluded) = kept
        trainer.engine.restore_settings(settings)
        self.health.skips = 0
        return loaded


def apply_warm_start(model: Tacotron2, cfg: TrainConfig, dist: DistInfo, run_folder: RunFolder,
               source: Path | None, ignore_layers: Sequence[str], resumed: bool, step: int
               ) -> WarmStartReport | None:
    """Start ``model`` from another run's weights (services/trainer/warm_start.py), at step 0.

    A run resumed from its own checkpoint (a restart under the supervisor) keeps its
    weights: the warm start is ignored, and the one it had is read back from the run
    folder. Rank 0 reads the checkpoint; every rank loads the same merged weights.
    """
    record = run_folder.warm_start_file
    if source is None or resumed:
        if source is not None:
            log.info("--warm-start %s ignored: resumed from this run's own checkpoint "
                     "at step %d", source, step)
        if not dist.is_main:
            return None
        if resumed:
            return (WarmStartReport.model_validate_json(record.read_text())
                    if record.is_file() else None)
        record.unlink(missing_ok=True)  # a new run in an old folder: not warm-started
        return None
    # Rank 0's merged weights and report, or its error: the other ranks must not wait
    # for weights that never come.
    payload: tuple[dict[str, torch.Tensor], WarmStartReport] | WarmStartError | None = None
    if dist.is_main:
        try:
            loaded = load_checkpoint(source)
            weights = loaded.state.get("model")
            if not isinstance(weights, dict):
                raise CheckpointError("no 'model' weights in it")
        except (OSError, CheckpointError) as error:
            payload = WarmStartError(f"--warm-start {source}: {error}")
        else:
            ours = {name: value.cpu() for name, value in model.state_dict().items()}
            merged, report = merge_state_dicts(ours, weights, ignore_layers)
            report.source, report.source_step = str(source), loaded.info.step
            payload = merged, report
            theirs = loaded.state.get("config", {}).get("audio")
            if theirs is not None and theirs != cfg.audio.model_dump(mode="json"):
                log.warning("--warm-start %s was trained on other audio features; its "
                            "weights expect those", source)
    if dist.distributed:
        payload = distributed.broadcast_object(payload)
    if isinstance(payload, WarmStartError):
        raise payload
    assert payload is not None
    merged, report = payload
    model.load_state_dict(merged)
    log.info("%s", describe(report))
    if report.unused_ignore_layers:
        log.warning("--ignore-layers %s matched no layer of the model",
                    ", ".join(report.unused_ignore_layers))
    if dist.is_main:
        record.write_text(report.model_dump_json(indent=2))
    return report
