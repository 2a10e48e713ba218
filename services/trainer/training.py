"""The training loop: steps, evaluation and checkpoints in order, over parts that do the work.

The loop is generic; what it composes does the rest:

- the feed (services/trainer/feed.py): the datasets, the validation batch and the endless
  stream of training batches, sharded per rank, from the position a resume restores;
- the step engine (services/trainer/engine.py): forward, losses, grad norm, clipping and
  the optimizer step, on the model the loop hands it batches for;
- checkpointing (services/trainer/checkpointing.py): what a checkpoint holds, where a
  resume starts, the warm start, the health rule and the rollback to the last good one;
- the probes (services/trainer/probing.py): an inference probe pass per checkpoint;
- the verdicts (services/trainer/verdicts.py): every indicator at each evaluation, and
  when all were first met;
- the run folder (services/trainer/run_folder.py): the run record, metrics.jsonl, probe
  passes, the summary and the alignment plots;
- the control between steps (services/trainer/lockstep.py): controllers, pause and stop,
  in lockstep across the ranks of a distributed run.

The loop knows nothing of Redis or the other services. Observers receive every step,
evaluation, verdict and checkpoint (telemetry plugs in there), and the run-time setters
(``set_lr``, ``set_guided_attention_weight``, ``set_grad_clip``, ``set_spike_guard``,
``rollback``...) are what
corrective commands call; every applied override is recorded and survives a resume.

Under torchrun (services.trainer.distributed) the model is wrapped in DDP and each rank
trains on its shard of the batches. Rank 0 alone evaluates, writes the run folder and
hears commands; the lockstep control replays what its setters did on the other ranks.
"""

from __future__ import annotations

import logging
import math
import random
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
from services.trainer.checkpointing import (
    RESUME_FROM,
    Checkpointing,
    apply_warm_start,
    fork_rng,
)
from services.trainer.checkpoints import CheckpointInfo, LoadedCheckpoint
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
from services.trainer.quarantine import Exclusion, Quarantine
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

log = logging.getLogger(__name__)

# Where these names lived before the split; other modules and tests import them from here.
__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "METRICS_FILE", "PAUSE_POLL_S", "PLOT_DIR", "PROBES_FILE",
    "RESUME_FROM", "RUN_STATE_FILE", "SUMMARY_FILE", "ControlState", "EvalResult", "RunRecord",
    "SetterCall", "StepMetrics", "Trainer", "TrainingController", "TrainingObserver",
    "inference_checks", "resolve_device", "training_checks",
]


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

    The parts (feed, engine, checkpointing, probing) own their state; the names commands,
    tests and tools reach through the trainer keep working through these.
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


def _postfix(metrics: StepMetrics, last_eval: EvalResult | None) -> dict[str, str]:
    """The progress bar's numbers after a step."""
    diag = last_eval.scores["diagonality"] if last_eval else math.nan
    return {"loss": f"{metrics.loss:.3f}", "gnorm": f"{metrics.grad_norm:.2f}",
            "diag": f"{diag:.2f}", "lr": f"{metrics.lr:.1e}"}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: the data split and the initial weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Owns one run: the loop over its feed, step engine, checkpoints, probes and verdicts."""

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

        # The order of what follows draws from the seeded generators: keep it (resumes
        # and the two-rank test compare weights bit for bit).
        seed_everything(cfg.run.seed)
        self.feed = Feed(cfg, self.data_dir, cache_dir or self.data_dir / ".features", self.dist,
                         progress=self.progress)
        model = Tacotron2(cfg.model, cfg.audio.n_mels).to(self.device)
        self.probing = Probing(make_probe_runner(cfg, self.feed) if self.is_main else None)
        self.engine = StepEngine(cfg, model, self.device, self.dist, fault)
        # The engine's parts that commands, tests and tools reach through the trainer.
        self.model, self.optimizer, self.lr = model, self.engine.optimizer, self.engine.lr
        self.checkpointing = Checkpointing(cfg, self.run_folder, self.dist)
        self.verdicts = Verdicts(cfg.probes.enabled)
        self.control = make_control(self.dist)
        self.quarantine = Quarantine(len(self.feed.train_set), cfg.run.skip_failed_batches,
                                     cfg.run.skip_max_share)

        # The loop's counters and history (a checkpoint keeps them; checkpointing.py).
        self.step = 0
        self.skipped_steps = 0
        self.guarded_steps = 0  # steps the spike guard withheld
        self.last_step_seconds = 0.0
        self.overrides: list[dict[str, Any]] = []
        self.last_eval: EvalResult | None = None
        # The applied steps' pre-clip norms the next evaluation's grad norm is judged on,
        # and the steps the spike guard withheld lately (their norms are not in it).
        self.recent_norms: deque[float] = deque(maxlen=cfg.run.eval_every)
        self.recent_guarded: deque[int] = deque(maxlen=cfg.run.eval_every)
        self._stop_requested = False

        if resume and resume_from not in RESUME_FROM:
            raise ValueError(f"resume_from must be one of {', '.join(RESUME_FROM)}")
        record = self.run_folder.open_record(resume, run_id) if self.is_main else None
        loaded = (self.checkpointing.find_resume(resume_from)
                  if resume and self.is_main else None)
        if self.dist.distributed:
            # Every rank takes rank 0's run identity and resumes from the same state.
            record, loaded = distributed.broadcast_object((record, loaded))
        assert record is not None
        self.run_state: RunRecord = record
        if loaded is not None:
            self.checkpointing.restore(self, loaded)
        else:
            fork_rng(self.dist, cfg.run.seed, self.step)
        self.warm_start_report = apply_warm_start(
            self.model, cfg, self.dist, self.run_folder, warm_start, ignore_layers,
            resumed=loaded is not None, step=self.step)
        self.run_folder.write_config(cfg)
        log.info("model: %s parameters, device %s, run %s", f"{count_parameters(self.model):,}",
                 self.device, self.run_state.run_id)

    # The parts' state under the names commands, tests and tools know.
    store = delegate("feed")
    train_set = delegate("feed")
    val_batch = delegate("feed")
    languages = delegate("feed")
    frames_per_symbol = delegate("feed")
    epoch = delegate("feed")
    batch_in_epoch = delegate("feed")
    gate_positive_weight = delegate("engine")
    checkpoints = delegate("checkpointing", "manager")  # None on ranks other than 0
    probes = delegate("probing", "runner")
    last_probes = delegate("probing", "last")

    def _batches(self) -> Iterator[Batch]:
        """The feed's endless batches (services/trainer/feed.py), from where it stands."""
        return self.feed.batches()

    def _state(self) -> dict[str, Any]:
        """What a checkpoint of this moment holds (services/trainer/checkpointing.py)."""
        return self.checkpointing.state(self)

    def save_checkpoint(self) -> CheckpointInfo:
        """Save now (atomic); also writes the validation alignment plot for this step.

        Rank 0's job in a distributed run: every rank holds the same state, and one writer
        keeps the checkpoint directory consistent.
        """
        return self.checkpointing.save(self)

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

    def set_spike_guard(self, value: float, source: str = "api") -> tuple[float, float]:
        """Set the spike guard's factor (0: off); returns (before, after).

        ValueError for a value the guard refuses (between 0 and the bounds' low end)."""
        before = self.engine.spike_guard.factor
        self.engine.spike_guard.set_factor(value)
        return self._applied("set_spike_guard", before, value, source)

    def skip_failed_batches(self, lookback: float, source: str = "api") -> Exclusion:
        """Leave out, from now on, the utterances of the steps that failed in the last
        ``lookback`` steps, without rolling back: non-finite and withheld steps never moved
        the weights, so the data is all there is to fix (services/trainer/quarantine.py)."""
        excluded = len(self.feed.excluded)
        exclusion = self.quarantine.exclude_undone(self.step - int(lookback), self.feed.excluded)
        if exclusion.ids:
            self._record_override("skip_utterances", float(excluded),
                                  float(len(self.feed.excluded)), source)
        self.control.share(SetterCall("skip_failed_batches", lookback, source))
        return exclusion

    def rollback(self, source: str = "api", checkpoint: LoadedCheckpoint | None = None
                 ) -> CheckpointInfo | None:
        """Restore the weights and data position of the last good checkpoint.

        The utterances of the failed steps it undoes are left out from then on
        (services/trainer/quarantine.py; ``quarantine.last`` says which). The run-time
        settings and the history stay as they are now (a rollback is usually paired with a
        corrective setting, which must not be undone by it); see
        ``Checkpointing.rollback``. ``checkpoint`` restores that one instead: how the
        other ranks follow rank 0's.
        """
        step = self.step
        loaded = self.checkpointing.rollback(self, checkpoint)
        if loaded is None:
            return None
        self._record_override("rollback", float(step), float(self.step), source)
        excluded = len(self.feed.excluded)
        exclusion = self.quarantine.exclude_undone(self.step, self.feed.excluded)
        if exclusion.ids:
            self._record_override("skip_utterances", float(excluded),
                                  float(len(self.feed.excluded)), source)
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

        A non-finite loss or gradient skips the update (and counts as skipped); a spike
        the spike guard withholds counts as guarded; an applied step's pre-clip norm joins
        the window the grad norm indicator is judged on.
        """
        started = time.perf_counter()
        out = self.engine.step(batch, self.step)
        failure = ("non-finite" if not out.finite else "withheld spike" if out.guarded
                   else "spike" if out.grad_norm > indicators.GRAD_NORM_RED_FLAG else None)
        if failure is not None:
            self.quarantine.note(self.step, batch.ids, failure)
        if out.guarded:
            # The weights did not move: neither the health rule nor the indicator window
            # sees the spike, only the count does.
            self.guarded_steps += 1
            self.recent_guarded.append(self.step)
            log.info("step %d withheld by the spike guard: pre-clip grad norm %.4g above "
                     "%g x the recent median; %d withheld so far", self.step, out.grad_norm,
                     out.spike_guard, self.guarded_steps)
        else:
            self.checkpointing.health.note_step(out.finite, out.grad_norm)
        if out.applied:
            self.recent_norms.append(out.grad_norm)
        elif not out.finite:
            self.skipped_steps += 1
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
            finite=out.finite, skipped_steps=self.skipped_steps,
            spike_guard=out.spike_guard, guarded=out.guarded, guarded_steps=self.guarded_steps)
        self.last_step_seconds = metrics.step_seconds
        self.step += 1
        return metrics

    def evaluate(self) -> EvalResult:
        """Teacher-forced losses and alignment scores on the fixed validation batch."""
        self.verdicts.settle(self, force=True)  # the previous evaluation's, if it still waits
        result = self.engine.evaluate(self.feed.val_batch, self.step)
        result.window_grad_norm = max(self.recent_norms) if self.recent_norms else math.inf
        result.window_steps = len(self.recent_norms)
        result.spike_guard = self.engine.spike_guard.factor
        window_start = self.step - self.cfg.run.eval_every
        result.window_guarded = sum(1 for step in self.recent_guarded if step >= window_start)
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
                if self.checkpointing.due(self.step):
                    self.checkpointing.try_save(self)
                self.verdicts.settle(self)
                bar.n = self.step  # a rollback moves the step back
                bar.set_postfix(_postfix(metrics, self.last_eval), refresh=False)
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
            self.checkpointing.try_save(self)  # a full disk must not cost the summary too
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

    def summary(self, stop_reason: str, seconds: float) -> dict[str, Any]:
        """Final report: where the run stands against each indicator (the verdict)."""
        return self.verdicts.summary(self, stop_reason, seconds)
