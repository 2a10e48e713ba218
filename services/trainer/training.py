"""The training loop: data, steps, evaluation, checkpoints, run state and the final verdict.

The loop knows nothing of Redis or the other services. Observers receive every step,
evaluation and checkpoint (telemetry plugs in there), and the run-time setters
(``set_lr``, ``set_guided_attention_weight``, ``set_grad_clip``, ``rollback``...) are what
corrective commands call; every applied override is recorded and survives a resume.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from services.core import indicators
from services.core.streams import validate_run_id
from services.diagnostics.metrics import alignment_scores
from services.diagnostics.plots import plot_alignment
from services.trainer import text as text_frontend
from services.trainer.checkpoints import (
    CheckpointInfo,
    CheckpointManager,
    LoadedCheckpoint,
    capture_rng_state,
    restore_rng_state,
)
from services.trainer.config import TrainConfig
from services.trainer.dataset import (
    Batch,
    LengthBucketSampler,
    TextMelCollate,
    TTSDataset,
    prepare_features,
    read_metadata,
    split_train_val,
)
from services.trainer.faults import FaultPlan, inject
from services.trainer.gradients import GradientClipper
from services.trainer.losses import GuidedAttentionWeight, LossTerms, tacotron_loss
from services.trainer.model import Tacotron2, TacotronOutput, count_parameters
from services.trainer.optim import LearningRate, make_optimizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUN_STATE_FILE = "run_state.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
PLOT_DIR = "plots"
PAUSE_POLL_S = 0.2


@dataclass
class StepMetrics:
    """Everything measured in one optimizer step."""

    step: int
    loss: float
    mel: float
    mel_postnet: float
    gate: float
    guided_attention: float
    objective: float
    grad_norm: float  # before clipping, after unscaling; nan when the step was skipped early
    lr: float
    guided_attention_weight: float
    clip_threshold: float
    step_seconds: float
    finite: bool
    skipped_steps: int  # total so far in this run


@dataclass
class EvalResult:
    """Teacher-forced evaluation on the fixed validation batch."""

    step: int
    losses: dict[str, float]
    scores: dict[str, float]
    attention: np.ndarray = field(repr=False)  # [B, decoder steps, tokens]
    input_lengths: np.ndarray = field(repr=False)
    decoder_lengths: np.ndarray = field(repr=False)


@dataclass
class RunState:
    """Persistent facts about a run across processes: identity and restarts."""

    run_id: str
    restarts: int = 0
    consecutive_restarts: int = 0
    clean_exit: bool = False
    started_at: str = ""
    aligned_once: bool = False


class TrainingObserver:
    """Receives the loop's events; subclasses override what they need, quickly, never raising."""

    def on_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        """After every optimizer step (skipped ones included)."""

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        """After every evaluation of the validation batch."""

    def on_checkpoint(self, trainer: Trainer, info: CheckpointInfo) -> None:
        """After a checkpoint is safely on disk."""

    def on_lifecycle(self, trainer: Trainer, event: str, detail: str,
                     data: dict[str, Any]) -> None:
        """Run started (or restarted), paused, resumed, finished, stopped."""


class TrainingController(Protocol):
    """Polled between steps (and while paused); may call the trainer's setters."""

    def before_step(self, trainer: Trainer) -> None: ...


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Trainer:
    """Owns one run: its data, model, optimisation state, checkpoints and run state."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, run_dir: Path, *, resume: bool = False,
                 device: str = "auto", cache_dir: Path | None = None,
                 observers: list[TrainingObserver] | None = None,
                 controllers: list[TrainingController] | None = None, progress: bool = True,
                 run_id: str | None = None, resume_from: str = "latest",
                 fault: FaultPlan | None = None):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.run_dir = Path(run_dir)
        self.device = resolve_device(device)
        self.progress = progress
        self.observers: list[TrainingObserver] = list(observers or [])
        self.controllers: list[TrainingController] = list(controllers or [])
        self.fault = fault
        self.paused = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.model.n_symbols = text_frontend.N_SYMBOLS

        self._set_seed(cfg.run.seed)
        self._prepare_data(cache_dir or self.data_dir / ".features")
        self.model = Tacotron2(cfg.model, cfg.audio.n_mels).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.lr = LearningRate(self.optimizer, cfg.optim)
        self.ga_weight = GuidedAttentionWeight(cfg.optim)
        self.clipper = GradientClipper(cfg.optim)
        amp = cfg.optim.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp)
        self.amp = amp
        self.checkpoints = CheckpointManager(self.run_dir / CHECKPOINT_DIR, cfg.run.keep_last)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_steps = 0
        self.last_step_seconds = 0.0
        self.overrides: list[dict[str, Any]] = []
        self.last_eval: EvalResult | None = None
        self.recent_norms: deque[float] = deque(maxlen=cfg.run.eval_every)
        self._skips_since_checkpoint = 0
        self._max_norm_since_checkpoint = 0.0
        self._stop_requested = False

        self.run_state = self._open_run_state(resume, run_id)
        if resume:
            if resume_from not in ("latest", "last_good"):
                raise ValueError("resume_from must be 'latest' or 'last_good'")
            loaded = (self.checkpoints.latest() if resume_from == "latest"
                      else self.checkpoints.last_good() or self.checkpoints.latest())
            if loaded is None:
                log.warning("--resume: no valid checkpoint in %s; starting from step 0",
                            self.checkpoints.directory)
            else:
                self._restore(loaded)
        (self.run_dir / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        log.info("model: %s parameters, device %s, run %s", f"{count_parameters(self.model):,}",
                 self.device, self.run_state.run_id)

    # ---------------------------------------------------------------- set-up

    @staticmethod
    def _set_seed(seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _prepare_data(self, cache_dir: Path) -> None:
        utterances = read_metadata(self.data_dir)
        if len(utterances) <= self.cfg.run.val_size:
            raise ValueError(f"{self.data_dir}: {len(utterances)} utterances; need more than "
                             f"val_size={self.cfg.run.val_size}")
        self.store = prepare_features(utterances, self.cfg.audio, cache_dir,
                                      progress=self.progress)
        train, val = split_train_val(utterances, self.cfg.run.val_size, self.cfg.run.seed)
        # Each text is normalised once, by the datasets; the characters it loses are
        # collected on the way and reported together.
        unknown: Counter[str] = Counter()

        def encode(text: str) -> list[int]:
            encoded = text_frontend.text_to_sequence(text)
            unknown.update(encoded.unknown)
            return encoded.ids

        self.train_set = TTSDataset(train, self.store, encode)
        self.collate = TextMelCollate(self.cfg.model.n_frames_per_step)
        self.sampler = LengthBucketSampler(self.train_set.mel_lengths, self.cfg.run.batch_size,
                                           self.cfg.run.seed)
        val_set = TTSDataset(val, self.store, encode)
        self.val_batch = self.collate([val_set[i] for i in range(len(val_set))])
        if unknown:
            listed = ", ".join(f"{c!r}×{n}" for c, n in unknown.most_common())
            log.warning("characters outside the symbol table were removed: %s", listed)

    def _open_run_state(self, resume: bool, run_id: str | None) -> RunState:
        path = self.run_dir / RUN_STATE_FILE
        if run_id is not None:
            validate_run_id(run_id)
        if resume and path.exists():
            state = RunState(**json.loads(path.read_text()))
            if not state.clean_exit:
                # The previous process died without a clean exit: that is a restart.
                state.restarts += 1
                state.consecutive_restarts += 1
            state.clean_exit = False
        else:
            state = RunState(run_id=run_id or uuid.uuid4().hex[:12], started_at=_utc_now())
        self._write_run_state(state)
        return state

    def _write_run_state(self, state: RunState | None = None) -> None:
        path = self.run_dir / RUN_STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state or self.run_state), indent=2))
        tmp.replace(path)

    # ---------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_steps": self.skipped_steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "guided_attention": self.ga_weight.state_dict(),
            "clipper": self.clipper.state_dict(),
            "scaler": self.scaler.state_dict(),
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        self.ga_weight.load_state_dict(state["guided_attention"])
        self.clipper.load_state_dict(state["clipper"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.skipped_steps = int(state["skipped_steps"])
        self.overrides = list(state["overrides"])
        self.recent_norms.clear()
        self.recent_norms.extend(state.get("recent_norms", []))
        restore_rng_state(state["rng"])
        log.info("resumed from %s at step %d", loaded.info.file, self.step)

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
        return not (self.run_state.aligned_once and result.scores["diagonality"] < 0.3)

    def save_checkpoint(self) -> CheckpointInfo:
        """Save now (atomic); also writes the validation alignment plot for this step."""
        if self.last_eval is None or self.last_eval.step != self.step:
            self.evaluate()
        metrics = dict(self.last_eval.losses) | dict(self.last_eval.scores)
        info = self.checkpoints.save(self._state(), self.step, self._healthy(), metrics)
        if self.run_state.consecutive_restarts and info.healthy:
            # Progress after a restart: the crash loop, if any, is over.
            self.run_state.consecutive_restarts = 0
            self._write_run_state()
        self._skips_since_checkpoint = 0
        self._max_norm_since_checkpoint = 0.0
        self.save_alignment_plot()
        for observer in self.observers:
            observer.on_checkpoint(self, info)
        return info

    def save_alignment_plot(self) -> Path | None:
        """PNG of the first validation sample's attention at the last evaluation."""
        result = self.last_eval
        if result is None:
            return None
        path = self.run_dir / PLOT_DIR / f"alignment-{result.step:08d}.png"
        return plot_alignment(
            result.attention[0], path, title=f"validation alignment, step {result.step}",
            input_length=int(result.input_lengths[0]),
            output_length=int(result.decoder_lengths[0]), scores=result.scores)

    # ---------------------------------------------------------------- run-time setters

    def _record_override(self, kind: str, before: float | None, after: float | None,
                         source: str) -> None:
        self.overrides.append({"step": self.step, "kind": kind, "before": before,
                               "after": after, "source": source, "time": _utc_now()})

    def set_lr(self, value: float, source: str = "api") -> tuple[float, float]:
        """Set the learning rate now; returns (before, after)."""
        before = self.lr.value(self.step)
        self.lr.set(value, self.step)
        self._record_override("set_lr", before, value, source)
        return before, value

    def set_guided_attention_weight(self, value: float, source: str = "api"
                                    ) -> tuple[float, float]:
        """Set the guided attention weight now; returns (before, after)."""
        before = self.ga_weight(self.step)
        self.ga_weight.set(value, self.step)
        self._record_override("set_guided_attention_weight", before, value, source)
        return before, value

    def set_grad_clip(self, value: float, source: str = "api") -> tuple[float, float]:
        """Set the gradient clipping threshold; returns (before, after)."""
        before = self.clipper.threshold
        self.clipper.set_threshold(value)
        self._record_override("set_grad_clip", before, value, source)
        return before, value

    def rollback(self, source: str = "api") -> CheckpointInfo | None:
        """Restore the weights and data position of the last good checkpoint.

        The run-time settings (LR, guided attention weight, clip threshold) and the
        history (overrides, skipped-step count) stay as they are now: a rollback is usually
        paired with a corrective setting, which must not be undone by it.
        """
        loaded = self.checkpoints.last_good()
        if loaded is None:
            return None
        kept = (list(self.overrides), self.skipped_steps, self.step, self.lr.state_dict(),
                self.ga_weight.state_dict(), self.clipper.threshold)
        self._restore(loaded)
        overrides, self.skipped_steps, step, lr_state, ga_state, threshold = kept
        self.overrides = overrides
        self.lr.load_state_dict(lr_state)
        self.ga_weight.load_state_dict(ga_state)
        self.clipper.threshold = threshold
        self._record_override("rollback", float(step), float(self.step), source)
        self._skips_since_checkpoint = 0
        return loaded.info

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested (by a command or a signal)."""
        return self._stop_requested

    def request_stop(self) -> None:
        """Stop cleanly after the current step (a checkpoint is written)."""
        self._stop_requested = True

    # ---------------------------------------------------------------- steps

    def _forward(self, batch: Batch) -> tuple[TacotronOutput, LossTerms]:
        with torch.autocast(self.device.type, enabled=self.amp):
            output = self.model(batch.text, batch.input_lengths, batch.mel,
                                batch.output_lengths)
            terms = tacotron_loss(
                output, batch.mel, batch.gate, batch.input_lengths,
                self.cfg.model.n_frames_per_step, self.cfg.optim.gate_positive_weight,
                self.ga_weight(self.step), self.cfg.optim.guided_attention_sigma)
        return output, terms

    def train_step(self, batch: Batch) -> StepMetrics:
        """One optimizer step; a non-finite loss or gradient skips the update.

        A skipped step leaves no trace in the model: BatchNorm running statistics, which
        the forward pass updates, are put back as they were, so NaN activations cannot
        poison them.
        """
        started = time.perf_counter()
        self.model.train()
        lr = self.lr.apply(self.step)
        ga_weight = self.ga_weight(self.step)
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.optimizer.zero_grad(set_to_none=True)
        output, terms = self._forward(batch.to(self.device))
        terms.total = inject(self.fault, self.step, terms.total, output.mel)
        norm = math.nan
        threshold = self.clipper.current_threshold()
        loss_finite = bool(torch.isfinite(terms.total))
        finite = loss_finite
        if loss_finite:
            self.scaler.scale(terms.total).backward()
            clip = self.clipper.clip(self.model, self.optimizer, self.scaler)
            norm, threshold, finite = clip.norm, clip.threshold, clip.finite
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            self.skipped_steps += 1
            self._skips_since_checkpoint += 1
            log.warning("step %d skipped: non-finite %s (loss %s, grad norm %s); %d skipped so far",
                        self.step, "gradients" if loss_finite else "loss",
                        float(terms.total.detach()), norm, self.skipped_steps)
        else:
            self.recent_norms.append(norm)
            self._max_norm_since_checkpoint = max(self._max_norm_since_checkpoint, norm)
        losses = terms.as_floats()
        metrics = StepMetrics(
            step=self.step, loss=losses["loss"], mel=losses["mel"],
            mel_postnet=losses["mel_postnet"], gate=losses["gate"],
            guided_attention=losses["guided_attention"], objective=losses["objective"],
            grad_norm=norm, lr=lr, guided_attention_weight=ga_weight,
            clip_threshold=threshold, step_seconds=time.perf_counter() - started,
            finite=finite, skipped_steps=self.skipped_steps)
        self.last_step_seconds = metrics.step_seconds
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Teacher-forced losses and alignment scores on the fixed validation batch."""
        self.model.eval()
        batch = self.val_batch.to(self.device)
        output, terms = self._forward(batch)
        r = self.cfg.model.n_frames_per_step
        decoder_lengths = (batch.output_lengths + r - 1) // r
        attention = output.alignments.float().cpu().numpy()
        input_lengths = batch.input_lengths.cpu().numpy()
        dec_lengths = decoder_lengths.cpu().numpy()
        scores = alignment_scores(attention, input_lengths, dec_lengths)
        result = EvalResult(self.step, terms.as_floats(), scores, attention, input_lengths,
                            dec_lengths)
        self.last_eval = result
        if scores["diagonality"] > indicators.DIAGONALITY_OK and not self.run_state.aligned_once:
            self.run_state.aligned_once = True
            self._write_run_state()
        self._log_metrics({"kind": "eval", "step": self.step, **result.losses, **scores})
        for observer in self.observers:
            observer.on_eval(self, result)
        return result

    def _log_metrics(self, record: dict[str, Any]) -> None:
        with (self.run_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _batches(self):
        """Endless batches; resumes inside an epoch exactly where the checkpoint left off."""
        while True:
            self.sampler.set_epoch(self.epoch)
            batches = list(self.sampler)
            while self.batch_in_epoch < len(batches):
                indices = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                yield self.collate([self.train_set[i] for i in indices])
            self.epoch += 1
            self.batch_in_epoch = 0

    # ---------------------------------------------------------------- the loop

    def indicators(self) -> list[indicators.Indicator]:
        """The plan's five success indicators on the latest evaluation.

        Grad norm is the *largest* pre-clip norm of the last ``eval_every`` steps, so one
        bad step in the window fails it.
        """
        result = self.last_eval or self.evaluate()
        norm = max(self.recent_norms) if self.recent_norms else math.inf
        return indicators.evaluate_indicators(
            grad_norm=norm, diagonality=result.scores["diagonality"],
            restarts=self.run_state.restarts, loss=result.losses["objective"],
            quality=result.scores["quality"])

    def _lifecycle(self, event: str, detail: str = "", **data: Any) -> None:
        for observer in self.observers:
            observer.on_lifecycle(self, event, detail, data)

    def _control(self) -> None:
        """Let the controllers act between steps; while paused, keep polling them."""
        for controller in self.controllers:
            controller.before_step(self)
        if self.paused:
            self._lifecycle("paused", f"paused at step {self.step}")
            while self.paused and not self._stop_requested:
                time.sleep(PAUSE_POLL_S)
                for controller in self.controllers:
                    controller.before_step(self)
            if not self._stop_requested:
                self._lifecycle("resumed", f"resumed at step {self.step}")

    def train(self, max_steps: int | None = None, until_indicators: bool = False,
              max_minutes: float | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or until the indicators are met); returns the summary."""
        max_steps = max_steps or self.cfg.run.max_steps
        started = time.perf_counter()
        deadline = started + max_minutes * 60 if max_minutes else math.inf
        met_at: dict[str, Any] | None = None
        batches = self._batches()
        state = self.run_state
        self._lifecycle("run_started", f"step {self.step}, restarts {state.restarts}",
                        step=self.step, restarts=state.restarts,
                        consecutive=state.consecutive_restarts,
                        restarted=state.consecutive_restarts > 0)
        bar = tqdm(total=max_steps, initial=self.step, disable=not self.progress,
                   desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        stop_reason = "max_steps"
        try:
            while self.step < max_steps:
                self._control()
                if self._stop_requested:
                    stop_reason = "stop_requested"
                    break
                metrics = self.train_step(next(batches))
                self._log_metrics({"kind": "step", **asdict(metrics)})
                for observer in self.observers:
                    observer.on_step(self, metrics)
                if self.step % self.cfg.run.eval_every == 0:
                    self.evaluate()
                    checks = self.indicators()
                    if met_at is None and indicators.all_met(checks):
                        met_at = {"step": self.step,
                                  "minutes": (time.perf_counter() - started) / 60}
                        log.info("all five success indicators met at step %d", self.step)
                        if until_indicators:
                            stop_reason = "indicators_met"
                if self.step % self.cfg.run.checkpoint_every == 0:
                    self.save_checkpoint()
                bar.n = self.step  # a rollback moves the step back
                bar.set_postfix(self._postfix(metrics), refresh=False)
                bar.update(0)
                if stop_reason == "indicators_met":
                    break
                if time.perf_counter() > deadline:
                    stop_reason = "time_limit"
                    break
        finally:
            bar.close()
        entries = self.checkpoints.entries()
        if not entries or entries[-1].step != self.step:  # the loop may have just saved it
            self.save_checkpoint()
        self.run_state.clean_exit = True
        self.run_state.consecutive_restarts = 0
        self._write_run_state()
        summary = self.summary(stop_reason, time.perf_counter() - started, met_at)
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        self._lifecycle("stopped" if stop_reason == "stop_requested" else "finished",
                        f"{stop_reason} at step {self.step}", summary=summary)
        return summary

    def _postfix(self, metrics: StepMetrics) -> dict[str, str]:
        diag = self.last_eval.scores["diagonality"] if self.last_eval else math.nan
        return {"loss": f"{metrics.loss:.3f}", "gnorm": f"{metrics.grad_norm:.2f}",
                "diag": f"{diag:.2f}", "lr": f"{metrics.lr:.1e}"}

    def summary(self, stop_reason: str, seconds: float, met_at: dict[str, Any] | None
                ) -> dict[str, Any]:
        """Final report: where the run stands against each of the plan's indicators."""
        checks = self.indicators()
        result = self.last_eval
        assert result is not None
        return {
            "run_id": self.run_state.run_id,
            "step": self.step,
            "stop_reason": stop_reason,
            "seconds": round(seconds, 1),
            "skipped_steps": self.skipped_steps,
            "restarts": self.run_state.restarts,
            "validation": result.losses,
            "alignment": result.scores,
            "indicators": [c.model_dump() for c in checks],
            "all_indicators_met": indicators.all_met(checks),
            "indicators_first_met": met_at,
            "overrides": self.overrides,
        }
