"""The training loop: data, steps, evaluation, checkpoints, the run's history and its verdict.

The loop is generic; what it composes does the rest:

- the step engine (services/trainer/engine.py): forward, losses, grad norm, clipping and
  the optimizer step, on the model the loop hands it batches for;
- the run folder (services/trainer/run_folder.py): the run record, metrics.jsonl, probe
  passes, the summary and the alignment plots;
- the control between steps (services/trainer/lockstep.py): controllers, pause and stop,
  in lockstep across the ranks of a distributed run.

The loop knows nothing of Redis or the other services. Observers receive every step,
evaluation, verdict and checkpoint (telemetry plugs in there), and the run-time setters
(``set_lr``, ``set_guided_attention_weight``, ``set_grad_clip``, ``rollback``...) are what
corrective commands call; every applied override is recorded and survives a resume.

Under torchrun (services.trainer.distributed) the model is wrapped in DDP and each rank
trains on its shard of the batches. Rank 0 alone evaluates, writes the run folder and
hears commands; the lockstep control replays what its setters did on the other ranks.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from services.core import indicators
from services.core.indicators import Verdict
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
from services.trainer.dataset import Batch
from services.trainer.engine import EvalResult, StepEngine, StepMetrics
from services.trainer.faults import FaultPlan
from services.trainer.feed import Feed
from services.trainer.lockstep import (
    PAUSE_POLL_S,
    ControlState,
    SetterCall,
    make_control,
)
from services.trainer.model import Tacotron2, count_parameters
from services.trainer.probes import ProbeSummary
from services.trainer.probing import Probing, make_probe_runner
from services.trainer.run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_DIR,
    PROBES_FILE,
    RUN_STATE_FILE,
    SUMMARY_FILE,
    RunFolder,
    RunRecord,
    utc_now,
)
from services.trainer.verdicts import Verdicts, inference_checks, training_checks
from services.trainer.warm_start import (
    WarmStartError,
    WarmStartReport,
    describe,
    merge_state_dicts,
)

log = logging.getLogger(__name__)

# Where these names lived before the split; other modules and tests import them from here.
__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "METRICS_FILE", "PAUSE_POLL_S", "PLOT_DIR", "PROBES_FILE",
    "RESUME_FROM", "RUN_STATE_FILE", "SUMMARY_FILE", "ControlState", "EvalResult", "RunRecord",
    "SetterCall", "StepMetrics", "Trainer", "TrainingController", "TrainingObserver",
    "inference_checks", "resolve_device", "training_checks",
]

RESUME_FROM = ("latest", "last_good", "best")


class TrainingObserver:
    """Receives the loop's events; subclasses override what they need, quickly, never raising."""

    def on_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        """After every optimizer step (skipped ones included)."""

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        """After every evaluation of the validation batch."""

    def on_verdict(self, trainer: Trainer, verdict: Verdict) -> None:
        """Once per evaluation, when its verdict is complete: at once, or when the probe
        pass of the checkpoint taken at that step has finished (maybe steps later)."""

    def on_checkpoint(self, trainer: Trainer, info: CheckpointInfo) -> None:
        """After a checkpoint is safely on disk."""

    def on_probes(self, trainer: Trainer, summary: ProbeSummary) -> None:
        """After the inference probes of a checkpoint finished (maybe steps later)."""

    def on_lifecycle(self, trainer: Trainer, event: str, detail: str,
                     data: dict[str, Any]) -> None:
        """Run started (or restarted), paused, resumed, finished, stopped."""


class TrainingController(Protocol):
    """Polled between steps (and while paused); may call the trainer's setters."""

    def before_step(self, trainer: Trainer) -> None: ...


class delegate:  # noqa: N801 - used like ``property``
    """A trainer attribute that lives on one of its parts, read and written there.

    The trainer's parts (feed, checkpointing, probing...) own their state; the names that
    commands, tests and tools reach through the trainer keep working through these.
    """

    def __init__(self, part: str, name: str | None = None):
        self.part = part
        self.name = name or ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, trainer: Any, owner: type | None = None) -> Any:
        if trainer is None:
            return self
        return getattr(getattr(trainer, self.part), self.name)

    def __set__(self, trainer: Any, value: Any) -> None:
        setattr(getattr(trainer, self.part), self.name, value)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Owns one run: its data, step engine, checkpoints, run folder and the loop over them."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, run_dir: Path, *, resume: bool = False,
                 device: str = "auto", cache_dir: Path | None = None,
                 observers: list[TrainingObserver] | None = None,
                 controllers: list[TrainingController] | None = None, progress: bool = True,
                 run_id: str | None = None, resume_from: str = "latest",
                 fault: FaultPlan | None = None, warm_start: Path | None = None,
                 ignore_layers: Sequence[str] = ()):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.run_dir = Path(run_dir)
        # Placement in a torch.distributed run (services.trainer.distributed); SINGLE alone.
        self.dist = distributed.current()
        self.is_main = self.dist.is_main
        self.device = resolve_device(device)
        if self.dist.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per rank
        self.progress = progress and self.is_main
        self.observers: list[TrainingObserver] = list(observers or [])
        self.controllers: list[TrainingController] = list(controllers or [])
        self.paused = False
        self.run_folder = RunFolder(self.run_dir, writer=self.is_main)  # rank 0's alone
        self.cfg.model.n_symbols = text_frontend.N_SYMBOLS

        self._set_seed(cfg.run.seed)
        self.feed = Feed(cfg, self.data_dir, cache_dir or self.data_dir / ".features", self.dist,
                         progress=self.progress)
        model = Tacotron2(cfg.model, cfg.audio.n_mels).to(self.device)
        self.probing = Probing(make_probe_runner(cfg, self.feed) if self.is_main else None)
        self.engine = StepEngine(cfg, model, self.device, self.dist, fault)
        # The engine's parts that commands, tests and tools reach through the trainer.
        self.model, self.optimizer, self.lr = model, self.engine.optimizer, self.engine.lr
        # Only rank 0 writes checkpoints; the others get what it loads by broadcast.
        self.checkpoints: CheckpointManager | None = (
            CheckpointManager(self.run_folder.checkpoint_dir, cfg.run.keep_last)
            if self.is_main else None)
        self.verdicts = Verdicts(cfg.probes.enabled)
        self.control = make_control(self.dist)

        self.step = 0
        self.skipped_steps = 0
        self.last_step_seconds = 0.0
        self.overrides: list[dict[str, Any]] = []
        self.last_eval: EvalResult | None = None
        self.recent_norms: deque[float] = deque(maxlen=cfg.run.eval_every)
        self._skips_since_checkpoint = 0
        self._max_norm_since_checkpoint = 0.0
        self._stop_requested = False

        if resume and resume_from not in RESUME_FROM:
            raise ValueError(f"resume_from must be one of {', '.join(RESUME_FROM)}")
        record = self.run_folder.open_record(resume, run_id) if self.is_main else None
        loaded = self._find_resume_checkpoint(resume_from) if resume and self.is_main else None
        if self.dist.distributed:
            # Every rank takes rank 0's run identity and resumes from the same state.
            record, loaded = distributed.broadcast_object((record, loaded))
        assert record is not None
        self.run_state: RunRecord = record
        if loaded is not None:
            self._restore(loaded)
        else:
            self._fork_rng()
        self.warm_start_report = self._warm_start(warm_start, ignore_layers,
                                                  resumed=loaded is not None)
        self.run_folder.write_config(cfg)
        log.info("model: %s parameters, device %s, run %s", f"{count_parameters(self.model):,}",
                 self.device, self.run_state.run_id)

    # The feed's data and position under the names tests and tools know.
    store = delegate("feed")
    train_set = delegate("feed")
    val_batch = delegate("feed")
    languages = delegate("feed")
    frames_per_symbol = delegate("feed")
    epoch = delegate("feed")
    batch_in_epoch = delegate("feed")
    probes = delegate("probing", "runner")
    last_probes = delegate("probing", "last")

    @property
    def gate_positive_weight(self) -> float:
        """The stop token's positive weight in the gate loss (the engine's)."""
        return self.engine.gate_positive_weight

    @gate_positive_weight.setter
    def gate_positive_weight(self, value: float) -> None:
        self.engine.gate_positive_weight = value

    # ---------------------------------------------------------------- set-up

    def _fork_rng(self) -> None:
        """Ranks other than 0 draw their own dropout masks, from a seed fixed by the step."""
        if self.dist.distributed and not self.is_main:
            torch.manual_seed(distributed.rank_seed(self.cfg.run.seed, self.dist.rank,
                                                    self.step))

    @staticmethod
    def _set_seed(seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ---------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            **self.feed.state_dict(),
            "skipped_steps": self.skipped_steps,
            **self.engine.state_dict(),
            "rng": capture_rng_state(),
            "overrides": list(self.overrides),
            "config": self.cfg.model_dump(mode="json"),
            "run_id": self.run_state.run_id,
            "recent_norms": list(self.recent_norms),
            # Synthesis needs the feature normalisation the model was trained with.
            "mel_mean": np.asarray(self.store.mean, dtype=np.float32),
            "mel_std": np.asarray(self.store.std, dtype=np.float32),
        }

    def _restore(self, loaded: LoadedCheckpoint) -> None:
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
        self.engine.load_state_dict(state)
        self.step = int(state["step"])
        self.feed.load_state_dict(state)
        self.skipped_steps = int(state["skipped_steps"])
        self.overrides = list(state["overrides"])
        self.recent_norms.clear()
        self.recent_norms.extend(state.get("recent_norms", []))
        restore_rng_state(state["rng"])
        self._fork_rng()  # rank 0 continues the saved stream, the others fork their own
        log.info("resumed from %s at step %d", loaded.info.file, self.step)

    def _warm_start(self, source: Path | None, ignore_layers: Sequence[str], resumed: bool
                    ) -> WarmStartReport | None:
        """Start from another run's weights (services/trainer/warm_start.py), at step 0 only.

        A run resumed from its own checkpoint (a restart under the supervisor) keeps its
        weights: the warm start is ignored, and the one it had is read back from the run
        folder. Rank 0 reads the checkpoint; every rank loads the same merged weights.
        """
        record = self.run_folder.warm_start_file
        if source is None or resumed:
            if source is not None:
                log.info("--warm-start %s ignored: resumed from this run's own checkpoint "
                         "at step %d", source, self.step)
            if not self.is_main:
                return None
            if resumed:
                return (WarmStartReport.model_validate_json(record.read_text())
                        if record.is_file() else None)
            record.unlink(missing_ok=True)  # a new run in an old folder: not warm-started
            return None
        # Rank 0's merged weights and report, or its error: the other ranks must not wait
        # for weights that never come.
        payload: tuple[dict[str, torch.Tensor], WarmStartReport] | WarmStartError | None = None
        if self.is_main:
            try:
                loaded = load_checkpoint(source)
                weights = loaded.state.get("model")
                if not isinstance(weights, dict):
                    raise CheckpointError("no 'model' weights in it")
            except (OSError, CheckpointError) as error:
                payload = WarmStartError(f"--warm-start {source}: {error}")
            else:
                ours = {name: value.cpu() for name, value in self.model.state_dict().items()}
                merged, report = merge_state_dicts(ours, weights, ignore_layers)
                report.source, report.source_step = str(source), loaded.info.step
                payload = merged, report
                theirs = loaded.state.get("config", {}).get("audio")
                if theirs is not None and theirs != self.cfg.audio.model_dump(mode="json"):
                    log.warning("--warm-start %s was trained on other audio features; its "
                                "weights expect those", source)
        if self.dist.distributed:
            payload = distributed.broadcast_object(payload)
        if isinstance(payload, WarmStartError):
            raise payload
        assert payload is not None
        merged, report = payload
        self.model.load_state_dict(merged)
        log.info("%s", describe(report))
        if report.unused_ignore_layers:
            log.warning("--ignore-layers %s matched no layer of the model",
                        ", ".join(report.unused_ignore_layers))
        if self.is_main:
            record.write_text(report.model_dump_json(indent=2))
        return report

    def _find_resume_checkpoint(self, resume_from: str) -> LoadedCheckpoint | None:
        assert self.checkpoints is not None
        match resume_from:
            case "latest":
                loaded = self.checkpoints.latest()
            case "best":  # the one that spoke the probes best; else as last_good
                loaded = (self.checkpoints.best() or self.checkpoints.last_good()
                          or self.checkpoints.latest())
            case _:
                loaded = self.checkpoints.last_good() or self.checkpoints.latest()
        if loaded is None:
            log.warning("--resume: no valid checkpoint in %s; starting from step 0",
                        self.checkpoints.directory)
        return loaded

    def _healthy(self) -> bool:
        """Whether the state about to be saved may serve as the rollback target."""
        if self._skips_since_checkpoint or not math.isfinite(self._max_norm_since_checkpoint):
            return False
        if self._max_norm_since_checkpoint > indicators.GRAD_NORM_RED_FLAG:
            return False
        result = self.last_eval
        if result is None or not math.isfinite(result.losses["objective"]):
            return False
        # Once aligned, a checkpoint that lost the alignment is no rollback target.
        return not (self.run_state.aligned_once
                    and result.scores["diagonality"] < indicators.DIAGONALITY_WEAK)

    def save_checkpoint(self) -> CheckpointInfo:
        """Save now (atomic); also writes the validation alignment plot for this step.

        Rank 0's job in a distributed run: every rank holds the same state, and one writer
        keeps the checkpoint directory consistent.
        """
        if self.checkpoints is None:
            raise RuntimeError(f"rank {self.dist.rank} does not write checkpoints; rank 0 does")
        if self.last_eval is None or self.last_eval.step != self.step:
            self.evaluate()
        assert self.last_eval is not None
        metrics = dict(self.last_eval.losses) | dict(self.last_eval.scores)
        info = self.checkpoints.save(self._state(), self.step, self._healthy(), metrics)
        if self.run_state.consecutive_restarts and info.healthy:
            # Progress after a restart: the crash loop, if any, is over.
            self.run_state.consecutive_restarts = 0
            self.run_folder.save_record(self.run_state)
        self._skips_since_checkpoint = 0
        self._max_norm_since_checkpoint = 0.0
        self.run_folder.save_alignment_plot(self.last_eval)
        self.probing.submit(self.model, self.step)
        for observer in self.observers:
            observer.on_checkpoint(self, info)
        return info

    # ---------------------------------------------------------------- run-time setters

    def _record_override(self, kind: str, before: float | None, after: float | None,
                         source: str) -> None:
        self.overrides.append({"step": self.step, "kind": kind, "before": before,
                               "after": after, "source": source, "time": utc_now()})

    def _applied(self, kind: str, before: float, after: float, source: str
                 ) -> tuple[float, float]:
        """A value setter's common end: recorded, shared with the other ranks."""
        self._record_override(kind, before, after, source)
        self.control.share(SetterCall(kind, after, source))
        return before, after

    def set_lr(self, value: float, source: str = "api") -> tuple[float, float]:
        """Set the learning rate now; returns (before, after)."""
        before = self.lr.value(self.step)
        self.lr.set(value, self.step)
        return self._applied("set_lr", before, value, source)

    def set_guided_attention_weight(self, value: float, source: str = "api"
                                    ) -> tuple[float, float]:
        """Set the guided attention weight now; returns (before, after)."""
        before = self.engine.ga_weight(self.step)
        self.engine.ga_weight.set(value, self.step)
        return self._applied("set_guided_attention_weight", before, value, source)

    def set_grad_clip(self, value: float, source: str = "api") -> tuple[float, float]:
        """Set the gradient clipping threshold; returns (before, after)."""
        before = self.engine.clipper.threshold
        self.engine.clipper.set_threshold(value)
        return self._applied("set_grad_clip", before, value, source)

    def set_gate_positive_weight(self, value: float, source: str = "api"
                                 ) -> tuple[float, float]:
        """Set the stop token's positive weight in the gate loss; returns (before, after)."""
        before = self.engine.gate_positive_weight
        self.engine.gate_positive_weight = value
        return self._applied("set_gate_positive_weight", before, value, source)

    def rollback(self, source: str = "api", checkpoint: LoadedCheckpoint | None = None
                 ) -> CheckpointInfo | None:
        """Restore the weights and data position of the last good checkpoint.

        The run-time settings (LR, guided attention weight, clip threshold, gate weight)
        and the history (overrides, skipped-step count) stay as they are now: a rollback is
        usually paired with a corrective setting, which must not be undone by it.
        ``checkpoint`` restores that one instead: how the other ranks follow rank 0's.
        """
        loaded = checkpoint
        if loaded is None and self.checkpoints is not None:
            loaded = self.checkpoints.last_good()
        if loaded is None:
            return None
        kept = (list(self.overrides), self.skipped_steps, self.step, self.engine.settings())
        self._restore(loaded)
        self.overrides, self.skipped_steps, step, settings = kept
        self.engine.restore_settings(settings)
        self._record_override("rollback", float(step), float(self.step), source)
        self._skips_since_checkpoint = 0
        self.control.share(SetterCall("rollback", None, source, loaded))
        return loaded.info

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested (by a command or a signal)."""
        return self._stop_requested

    def request_stop(self) -> None:
        """Stop cleanly after the current step (a checkpoint is written).

        Distributed, only rank 0's request counts: it reaches every rank with the next
        broadcast (torchrun passes a signal to every worker, so rank 0 gets it too).
        """
        self._stop_requested = True

    # ---------------------------------------------------------------- steps

    def train_step(self, batch: Batch) -> StepMetrics:
        """One optimizer step by the engine (services/trainer/engine.py), counted.

        A non-finite loss or gradient skips the update (and counts as skipped); a finite
        step's pre-clip norm joins the window the grad norm indicator is judged on.
        """
        started = time.perf_counter()
        out = self.engine.step(batch, self.step)
        if out.finite:
            self.recent_norms.append(out.grad_norm)
            self._max_norm_since_checkpoint = max(self._max_norm_since_checkpoint,
                                                  out.grad_norm)
        else:
            self.skipped_steps += 1
            self._skips_since_checkpoint += 1
            log.warning("step %d skipped: non-finite %s (loss %s, grad norm %s); %d skipped so far",
                        self.step, "gradients" if out.loss_finite else "loss", out.total,
                        out.grad_norm, self.skipped_steps)
        losses = out.losses
        metrics = StepMetrics(
            step=self.step, loss=losses["loss"], mel=losses["mel"],
            mel_postnet=losses["mel_postnet"], gate=losses["gate"],
            guided_attention=losses["guided_attention"], objective=losses["objective"],
            grad_norm=out.grad_norm, lr=out.lr, guided_attention_weight=out.guided_attention_weight,
            gate_positive_weight=out.gate_positive_weight, clip_threshold=out.clip_threshold,
            step_seconds=time.perf_counter() - started,
            finite=out.finite, skipped_steps=self.skipped_steps)
        self.last_step_seconds = metrics.step_seconds
        self.step += 1
        return metrics

    def evaluate(self) -> EvalResult:
        """Teacher-forced losses and alignment scores on the fixed validation batch."""
        self.verdicts.settle(self, force=True)  # the previous evaluation's, if it still waits
        result = self.engine.evaluate(self.val_batch, self.step)
        result.window_grad_norm = max(self.recent_norms) if self.recent_norms else math.inf
        result.window_steps = len(self.recent_norms)
        self.last_eval = result
        scores = result.scores
        if scores["diagonality"] > indicators.DIAGONALITY_OK and not self.run_state.aligned_once:
            self.run_state.aligned_once = True
            self.run_folder.save_record(self.run_state)
        self.run_folder.log({"kind": "eval", "step": self.step, **result.losses, **scores})
        for observer in self.observers:
            observer.on_eval(self, result)
        self.verdicts.due = result.step
        return result

    def _batches(self) -> Iterator[Batch]:
        """The feed's endless batches (services/trainer/feed.py), from where it stands."""
        return self.feed.batches()

    # ---------------------------------------------------------------- the verdict

    def verdict(self) -> Verdict:
        """The run against every indicator at the latest evaluation (one is made if none);
        services/trainer/verdicts.py judges it."""
        return self.verdicts.judge(self, self.last_eval or self.evaluate())

    # ---------------------------------------------------------------- the loop

    def lifecycle(self, event: str, detail: str = "", **data: Any) -> None:
        """Tell the observers: run started, paused, resumed, finished, stopped."""
        for observer in self.observers:
            observer.on_lifecycle(self, event, detail, data)

    def poll_controllers(self) -> None:
        """Let every controller act once (they may call the setters, pause or stop)."""
        for controller in self.controllers:
            controller.before_step(self)

    def _control(self) -> None:
        """Between steps: the controllers' turn, and the pause (lockstep when distributed)."""
        self.control.between_steps(self)

    def train(self, max_steps: int | None = None, until_indicators: bool = False,
              max_minutes: float | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or until the indicators are met); returns the summary.

        Distributed, every rank calls it and gets rank 0's summary; rank 0 alone evaluates,
        checkpoints and decides when to stop, and the others stop at the same step.
        """
        max_steps = max_steps or self.cfg.run.max_steps
        started = time.perf_counter()
        deadline = started + max_minutes * 60 if max_minutes else math.inf
        met = False  # all indicators met during this call
        batches = self._batches()
        state = self.run_state
        self.lifecycle("run_started", f"step {self.step}, restarts {state.restarts}",
                       step=self.step, restarts=state.restarts,
                       consecutive=state.consecutive_restarts,
                       restarted=state.consecutive_restarts > 0)
        bar = tqdm(total=max_steps, initial=self.step, disable=not self.progress,
                   desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        stop_reason = "max_steps"
        try:
            while self.step < max_steps:
                self._control()
                if self.control.stopping(self):
                    stop_reason = self.control.stop_reason()
                    break
                metrics = self.train_step(next(batches))
                self.run_folder.log({"kind": "step", **asdict(metrics)})
                for observer in self.observers:
                    observer.on_step(self, metrics)
                if not self.is_main:
                    continue  # evaluation, checkpoints and the decision to stop are rank 0's
                evaluated = self.step % self.cfg.run.eval_every == 0
                if evaluated:
                    self.evaluate()
                # A probe pass that finished in the background may complete the verdict
                # between evaluations.
                if (self.probing.collect(self) or evaluated) and not met \
                        and self.verdicts.note_all_met(self, started):
                    met = True
                    if until_indicators:
                        stop_reason = "indicators_met"
                if self.step % self.cfg.run.checkpoint_every == 0:
                    self.save_checkpoint()
                self.verdicts.settle(self)
                bar.n = self.step  # a rollback moves the step back
                bar.set_postfix(self._postfix(metrics), refresh=False)
                bar.update(0)
                if stop_reason != "indicators_met" and time.perf_counter() > deadline:
                    stop_reason = "time_limit"
                if stop_reason in ("indicators_met", "time_limit") \
                        and self.control.stop_after_step(self, stop_reason):
                    break
        finally:
            bar.close()
        summary = self._finish(stop_reason, started) if self.is_main else None
        if self.dist.distributed:
            summary = distributed.broadcast_object(summary)
        assert summary is not None
        stop_reason = summary["stop_reason"]  # rank 0's, on every rank
        self.lifecycle("stopped" if stop_reason == "stop_requested" else "finished",
                       f"{stop_reason} at step {self.step}", summary=summary)
        return summary

    def _finish(self, stop_reason: str, started: float) -> dict[str, Any]:
        """Rank 0 at the end of ``train``: last checkpoint and verdict, clean exit, summary."""
        assert self.checkpoints is not None
        entries = self.checkpoints.entries()
        if not entries or entries[-1].step != self.step:  # the loop may have just saved it
            self.save_checkpoint()
        # The verdict includes the probes of the final checkpoint.
        self.probing.collect(self, wait=True)
        self.probing.close()
        self.verdicts.note_all_met(self, started)
        self.verdicts.settle(self, force=True)
        self.run_state.clean_exit = True
        self.run_state.consecutive_restarts = 0
        self.run_folder.save_record(self.run_state)
        summary = self.summary(stop_reason, time.perf_counter() - started)
        self.run_folder.write_summary(summary)
        return summary

    def _postfix(self, metrics: StepMetrics) -> dict[str, str]:
        diag = self.last_eval.scores["diagonality"] if self.last_eval else math.nan
        return {"loss": f"{metrics.loss:.3f}", "gnorm": f"{metrics.grad_norm:.2f}",
                "diag": f"{diag:.2f}", "lr": f"{metrics.lr:.1e}"}

    def summary(self, stop_reason: str, seconds: float) -> dict[str, Any]:
        """Final report: where the run stands against each indicator (the verdict)."""
        return self.verdicts.summary(self, stop_reason, seconds)
