"""The training loop: data, steps, evaluation, checkpoints, run state and the final verdict.

The loop knows nothing of Redis or the other services. Observers receive every step,
evaluation and checkpoint (telemetry plugs in there), and the run-time setters
(``set_lr``, ``set_guided_attention_weight``, ``set_grad_clip``, ``rollback``...) are what
corrective commands call; every applied override is recorded and survives a resume.

Under torchrun (services.trainer.distributed) the model is wrapped in DDP and each rank
trains on its shard of the batches. Rank 0 alone evaluates, writes the run folder and
hears commands; between steps it broadcasts what its setters did, its pause and its stop
to the other ranks, which replay them through the same setters, so every rank changes the
same thing at the same step and the ranks never diverge.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
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
from services.trainer import distributed
from services.trainer import text as text_frontend
from services.trainer.checkpoints import (
    RUN_CHECKPOINT_SUBDIR,
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    LoadedCheckpoint,
    capture_rng_state,
    load_checkpoint,
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
from services.trainer.probes import (
    ProbeRunner,
    ProbeSummary,
    corpus_languages,
    frames_per_symbol,
    probes_for,
)
from services.trainer.warm_start import (
    WARM_START_FILE,
    WarmStartError,
    WarmStartReport,
    describe,
    merge_state_dicts,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUN_STATE_FILE = "run_state.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PROBES_FILE = "probes.jsonl"
CHECKPOINT_DIR = RUN_CHECKPOINT_SUBDIR
PLOT_DIR = "plots"
PAUSE_POLL_S = 0.2
RESUME_FROM = ("latest", "last_good", "best")


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
    gate_positive_weight: float
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
    spoke_once: bool = False  # the inference indicator was met once (probes)


class TrainingObserver:
    """Receives the loop's events; subclasses override what they need, quickly, never raising."""

    def on_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        """After every optimizer step (skipped ones included)."""

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        """After every evaluation of the validation batch."""

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


@dataclass
class SetterCall:
    """One run-time setter call on rank 0, for the other ranks to replay at the same step."""

    action: str  # a value setter's name (set_lr, ...) or rollback
    value: float | None
    source: str
    checkpoint: LoadedCheckpoint | None = None  # rollback: the state rank 0 restored


@dataclass
class ControlState:
    """What rank 0 broadcasts between steps; every rank's loop acts on it alone."""

    calls: list[SetterCall] = field(default_factory=list)
    paused: bool = False
    stop: bool = False
    stop_reason: str = "stop_requested"


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
        self.fault = fault
        self.paused = False
        if self.is_main:  # the run folder is rank 0's alone
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.model.n_symbols = text_frontend.N_SYMBOLS

        self._set_seed(cfg.run.seed)
        distributed.in_turns(self.dist,
                             lambda: self._prepare_data(cache_dir or self.data_dir / ".features"))
        self.model = Tacotron2(cfg.model, cfg.audio.n_mels).to(self.device)
        self.probes = self._make_probe_runner() if self.is_main else None
        self.last_probes: ProbeSummary | None = None
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.lr = LearningRate(self.optimizer, cfg.optim)
        self.ga_weight = GuidedAttentionWeight(cfg.optim)
        # The stop token's positive weight; a command may raise it when the gate never fires.
        self.gate_positive_weight = cfg.optim.gate_positive_weight
        self.clipper = GradientClipper(cfg.optim)
        amp = cfg.optim.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp)
        self.amp = amp
        # Only rank 0 writes checkpoints; the others get what it loads by broadcast.
        self.checkpoints: CheckpointManager | None = (
            CheckpointManager(self.run_dir / CHECKPOINT_DIR, cfg.run.keep_last)
            if self.is_main else None)
        # The module the training step runs: DDP around the model when distributed (it
        # all-reduces the gradients); evaluation and checkpoints use the bare model.
        self._ddp = self._wrap_ddp() if self.dist.distributed else None
        self._train_module: torch.nn.Module = self._ddp if self._ddp is not None else self.model
        # Distributed only: rank 0's setter calls since the last broadcast, and the control
        # state every rank's loop acts on (None in a single process: live attributes rule).
        self._setter_calls: list[SetterCall] | None = \
            [] if self.dist.distributed and self.is_main else None
        self._agreed: ControlState | None = ControlState() if self.dist.distributed else None
        self._stop_reason = "stop_requested"

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

        if resume and resume_from not in RESUME_FROM:
            raise ValueError(f"resume_from must be one of {', '.join(RESUME_FROM)}")
        state = self._open_run_state(resume, run_id) if self.is_main else None
        loaded = self._find_resume_checkpoint(resume_from) if resume and self.is_main else None
        if self.dist.distributed:
            # Every rank takes rank 0's run identity and resumes from the same state.
            state, loaded = distributed.broadcast_object((state, loaded))
        assert state is not None
        self.run_state = state
        if loaded is not None:
            self._restore(loaded)
        else:
            self._fork_rng()
        self.warm_start_report = self._warm_start(warm_start, ignore_layers,
                                                  resumed=loaded is not None)
        if self.is_main:
            (self.run_dir / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        log.info("model: %s parameters, device %s, run %s", f"{count_parameters(self.model):,}",
                 self.device, self.run_state.run_id)

    # ---------------------------------------------------------------- set-up

    def _wrap_ddp(self) -> torch.nn.parallel.DistributedDataParallel:
        from torch.nn.parallel import DistributedDataParallel

        # The buffers are copied from rank 0 after each step (distributed.broadcast_buffers),
        # so they are equal between steps too; DDP's own copy before each forward is off.
        # Its flag was renamed in torch 2.13; the old one still works, with a warning.
        params = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **no_buffer_sync)

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

    def _prepare_data(self, cache_dir: Path) -> None:
        utterances = read_metadata(self.data_dir)
        if len(utterances) <= self.cfg.run.val_size:
            raise ValueError(f"{self.data_dir}: {len(utterances)} utterances; need more than "
                             f"val_size={self.cfg.run.val_size}")
        self.store = prepare_features(utterances, self.cfg.audio, cache_dir,
                                      progress=self.progress)  # rank 0 first: in_turns
        train, val = split_train_val(utterances, self.cfg.run.val_size, self.cfg.run.seed)
        # Each text is normalised once, by the datasets; the characters it loses are
        # collected on the way and reported together.
        unknown: Counter[str] = Counter()

        def encode(text: str) -> list[int]:
            encoded = text_frontend.text_to_sequence(text, self.cfg.text.language,
                                                     stress=self.cfg.text.stress == "keep")
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
        # What the probes need to judge inference: the corpus's languages and speaking rate.
        self.languages = corpus_languages([u.text for u in train])
        self.frames_per_symbol = frames_per_symbol(self.train_set.mel_lengths,
                                                   self.train_set.text_lengths)

    def _make_probe_runner(self) -> ProbeRunner | None:
        settings = self.cfg.probes
        if not settings.enabled:
            return None
        recognizer = None
        if settings.wer and "en" in self.languages:
            from services.diagnostics.asr import Recognizer

            installed, reason = Recognizer.available()
            if installed:
                recognizer = Recognizer()
            else:
                log.info("probes: no word error rate (%s)", reason)
        return ProbeRunner(self.cfg, self.store.mean, self.store.std,
                           probes_for(self.languages), self.frames_per_symbol,
                           recognizer=recognizer, background=settings.background)

    def _collect_probes(self, wait: bool = False) -> bool:
        """Take in finished probe passes; returns whether there was one."""
        if self.probes is None:
            return False
        finished = self.probes.wait() if wait else self.probes.collect()
        for summary in finished:
            self.last_probes = summary
            speaks = indicators.all_met(summary.indicators())
            if speaks and not self.run_state.spoke_once:
                self.run_state.spoke_once = True
                self._write_run_state()
            record = summary.model_dump(mode="json")
            self._log_metrics({"kind": "probes", **{k: v for k, v in record.items()
                                                    if k != "results"}})
            with (self.run_dir / PROBES_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            assert self.checkpoints is not None
            # Once the model has spoken, a checkpoint that no longer does is no rollback
            # target (as one that lost its alignment is not).
            self.checkpoints.record_probe_score(
                summary.step, summary.score,
                unhealthy=self.run_state.spoke_once and not speaks)
            for observer in self.observers:
                observer.on_probes(self, summary)
        return bool(finished)

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
        if not self.is_main:
            return
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
            "gate_positive_weight": self.gate_positive_weight,
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        self.ga_weight.load_state_dict(state["guided_attention"])
        self.clipper.load_state_dict(state["clipper"])
        self.gate_positive_weight = float(state.get("gate_positive_weight",
                                                    self.cfg.optim.gate_positive_weight))
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
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
        record = self.run_dir / WARM_START_FILE
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
        return not (self.run_state.aligned_once and result.scores["diagonality"] < 0.3)

    def save_checkpoint(self) -> CheckpointInfo:
        """Save now (atomic); also writes the validation alignment plot for this step.

        Rank 0's job in a distributed run: every rank holds the same state, and one writer
        keeps the checkpoint directory consistent.
        """
        if self.checkpoints is None:
            raise RuntimeError(f"rank {self.dist.rank} does not write checkpoints; rank 0 does")
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
        if self.probes is not None:
            self.probes.submit(self.model, self.step)
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

    def _share(self, call: SetterCall) -> None:
        """Distributed, rank 0: queue a setter call for the other ranks to replay."""
        if self._setter_calls is not None:
            self._setter_calls.append(call)

    def _replay(self, call: SetterCall) -> None:
        """Other ranks: make rank 0's setter call here, through the same setter."""
        match call.action:
            case "set_lr":
                self.set_lr(call.value, call.source)
            case "set_guided_attention_weight":
                self.set_guided_attention_weight(call.value, call.source)
            case "set_grad_clip":
                self.set_grad_clip(call.value, call.source)
            case "set_gate_positive_weight":
                self.set_gate_positive_weight(call.value, call.source)
            case "rollback":
                self.rollback(call.source, checkpoint=call.checkpoint)
            case _:  # pragma: no cover - both ends run the same code
                raise ValueError(f"unknown setter call {call.action!r}")

    def set_lr(self, value: float, source: str = "api") -> tuple[float, float]:
        """Set the learning rate now; returns (before, after)."""
        before = self.lr.value(self.step)
        self.lr.set(value, self.step)
        self._record_override("set_lr", before, value, source)
        self._share(SetterCall("set_lr", value, source))
        return before, value

    def set_guided_attention_weight(self, value: float, source: str = "api"
                                    ) -> tuple[float, float]:
        """Set the guided attention weight now; returns (before, after)."""
        before = self.ga_weight(self.step)
        self.ga_weight.set(value, self.step)
        self._record_override("set_guided_attention_weight", before, value, source)
        self._share(SetterCall("set_guided_attention_weight", value, source))
        return before, value

    def set_grad_clip(self, value: float, source: str = "api") -> tuple[float, float]:
        """Set the gradient clipping threshold; returns (before, after)."""
        before = self.clipper.threshold
        self.clipper.set_threshold(value)
        self._record_override("set_grad_clip", before, value, source)
        self._share(SetterCall("set_grad_clip", value, source))
        return before, value

    def set_gate_positive_weight(self, value: float, source: str = "api"
                                 ) -> tuple[float, float]:
        """Set the stop token's positive weight in the gate loss; returns (before, after)."""
        before = self.gate_positive_weight
        self.gate_positive_weight = value
        self._record_override("set_gate_positive_weight", before, value, source)
        self._share(SetterCall("set_gate_positive_weight", value, source))
        return before, value

    def rollback(self, source: str = "api", checkpoint: LoadedCheckpoint | None = None
                 ) -> CheckpointInfo | None:
        """Restore the weights and data position of the last good checkpoint.

        The run-time settings (LR, guided attention weight, clip threshold) and the
        history (overrides, skipped-step count) stay as they are now: a rollback is usually
        paired with a corrective setting, which must not be undone by it. ``checkpoint``
        restores that one instead: how the other ranks follow rank 0's rollback.
        """
        loaded = checkpoint
        if loaded is None and self.checkpoints is not None:
            loaded = self.checkpoints.last_good()
        if loaded is None:
            return None
        kept = (list(self.overrides), self.skipped_steps, self.step, self.lr.state_dict(),
                self.ga_weight.state_dict(), self.clipper.threshold, self.gate_positive_weight)
        self._restore(loaded)
        (overrides, self.skipped_steps, step, lr_state, ga_state, threshold,
         self.gate_positive_weight) = kept
        self.overrides = overrides
        self.lr.load_state_dict(lr_state)
        self.ga_weight.load_state_dict(ga_state)
        self.clipper.threshold = threshold
        self._record_override("rollback", float(step), float(self.step), source)
        self._skips_since_checkpoint = 0
        self._share(SetterCall("rollback", None, source, loaded))
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

    def _forward(self, batch: Batch) -> tuple[TacotronOutput, LossTerms]:
        # A training step goes through DDP when distributed (it all-reduces the gradients);
        # evaluation, rank 0's alone, must not wait for the other ranks: the bare model.
        module = self._train_module if self.model.training else self.model
        with torch.autocast(self.device.type, enabled=self.amp):
            output = module(batch.text, batch.input_lengths, batch.mel, batch.output_lengths)
            terms = tacotron_loss(
                output, batch.mel, batch.gate, batch.input_lengths,
                self.cfg.model.n_frames_per_step, self.gate_positive_weight,
                self.ga_weight(self.step), self.cfg.optim.guided_attention_sigma)
        return output, terms

    def train_step(self, batch: Batch) -> StepMetrics:
        """One optimizer step; a non-finite loss or gradient skips the update.

        A skipped step leaves no trace in the model: BatchNorm running statistics, which
        the forward pass updates, are put back as they were, so NaN activations cannot
        poison them.

        Distributed, every rank steps on its own batch; the losses reported are the mean
        over the ranks, a non-finite loss on any rank skips the step on all of them, and
        the gradients (hence the pre-clip norm) are DDP's all-reduced ones, so every rank
        takes the same decision and the same update.
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
        if self._ddp is None:
            mean_losses = None
            loss_finite = bool(torch.isfinite(terms.total))
        else:
            mean_losses = self._mean_losses(terms)
            loss_finite = math.isfinite(mean_losses["loss"])
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
        if self._ddp is not None:
            distributed.broadcast_buffers(self.model)
        losses = terms.as_floats() if mean_losses is None else mean_losses
        metrics = StepMetrics(
            step=self.step, loss=losses["loss"], mel=losses["mel"],
            mel_postnet=losses["mel_postnet"], gate=losses["gate"],
            guided_attention=losses["guided_attention"], objective=losses["objective"],
            grad_norm=norm, lr=lr, guided_attention_weight=ga_weight,
            gate_positive_weight=self.gate_positive_weight, clip_threshold=threshold,
            step_seconds=time.perf_counter() - started,
            finite=finite, skipped_steps=self.skipped_steps)
        self.last_step_seconds = metrics.step_seconds
        self.step += 1
        return metrics

    def _mean_losses(self, terms: LossTerms) -> dict[str, float]:
        """The loss terms averaged over the ranks: one all-reduce, the same on every rank.

        A term that is not finite on one rank is not finite in the mean, so every rank
        sees the same verdict on the loss.
        """
        parts = (terms.total, terms.mel, terms.mel_postnet, terms.gate,
                 terms.guided_attention)
        summed = distributed.all_reduce_sum(torch.stack([p.detach().float() for p in parts]))
        loss, mel, mel_postnet, gate, guided = (summed / self.dist.world_size).tolist()
        return {"loss": loss, "mel": mel, "mel_postnet": mel_postnet, "gate": gate,
                "guided_attention": guided, "objective": mel + mel_postnet + gate}

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
        if not self.is_main:  # metrics.jsonl is rank 0's
            return
        with (self.run_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _batches(self):
        """Endless batches; resumes inside an epoch exactly where the checkpoint left off.

        Distributed, each rank reads its own shard of every epoch's batches: the same
        number of batches on every rank, disjoint, together the whole epoch.
        """
        while True:
            epoch = self.epoch
            self.sampler.set_epoch(epoch)
            batches = list(self.sampler)
            if self.dist.distributed:
                batches = distributed.shard_batches(batches, self.dist.rank,
                                                    self.dist.world_size)
            # A rollback between two batches may restore another epoch (and its position):
            # then that epoch's order is rebuilt, exactly as a resume would.
            while self.epoch == epoch:
                if self.batch_in_epoch >= len(batches):
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    break
                indices = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                yield self.collate([self.train_set[i] for i in indices])

    # ---------------------------------------------------------------- the loop

    def indicators(self) -> list[indicators.Indicator]:
        """The plan's five success indicators on the latest evaluation, then the inference
        indicator on the latest probe pass (when probes are on; not met before the first).

        Grad norm is the *largest* pre-clip norm of the last ``eval_every`` steps, so one
        bad step in the window fails it.
        """
        result = self.last_eval or self.evaluate()
        norm = max(self.recent_norms) if self.recent_norms else math.inf
        checks = indicators.evaluate_indicators(
            grad_norm=norm, diagonality=result.scores["diagonality"],
            restarts=self.run_state.restarts, loss=result.losses["objective"],
            quality=result.scores["quality"])
        if self.cfg.probes.enabled:
            probes = self.last_probes
            checks += (probes.indicators() if probes is not None
                       else indicators.evaluate_inference(math.nan, math.nan))
        return checks

    def _lifecycle(self, event: str, detail: str = "", **data: Any) -> None:
        for observer in self.observers:
            observer.on_lifecycle(self, event, detail, data)

    def _control(self) -> None:
        """Let the controllers act between steps; while paused, keep polling them."""
        if self._agreed is not None:
            self._control_in_lockstep()
            return
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

    def _control_in_lockstep(self) -> None:
        """``_control`` of a distributed run: every poll ends in rank 0's broadcast.

        The loop reads only the broadcast state, never the live ``paused`` and stop flags,
        which a signal handler may change between the broadcast and the check on one rank
        but not on the others.
        """
        agreed = self._exchange_control()
        if agreed.paused and not agreed.stop:
            self._lifecycle("paused", f"paused at step {self.step}")
            while agreed.paused and not agreed.stop:
                time.sleep(PAUSE_POLL_S)  # every rank waits in the broadcast meanwhile
                agreed = self._exchange_control()
            if not agreed.stop:
                self._lifecycle("resumed", f"resumed at step {self.step}")

    def _exchange_control(self) -> ControlState:
        """Poll the controllers (rank 0), broadcast the outcome, replay it (other ranks).

        Only rank 0's controllers run: it alone hears commands, and whatever they change
        reaches the others as setter calls, so no rank changes anything on its own.
        """
        if self.is_main:
            for controller in self.controllers:
                controller.before_step(self)
            assert self._setter_calls is not None
            state: ControlState | None = ControlState(
                calls=self._setter_calls, paused=self.paused, stop=self._stop_requested,
                stop_reason=self._stop_reason)
            self._setter_calls = []
        else:
            state = None
        state = distributed.broadcast_object(state)
        assert state is not None
        if not self.is_main:
            for call in state.calls:
                self._replay(call)
            self.paused = state.paused
            self._stop_requested = self._stop_requested or state.stop
        self._agreed = state
        return state

    def _stopping(self) -> bool:
        """Whether the loop stops before the next step (every rank agrees when distributed)."""
        return self._stop_requested if self._agreed is None else self._agreed.stop

    def train(self, max_steps: int | None = None, until_indicators: bool = False,
              max_minutes: float | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or until the indicators are met); returns the summary.

        Distributed, every rank calls it and gets rank 0's summary; rank 0 alone evaluates,
        checkpoints and decides when to stop, and the others stop at the same step.
        """
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
                if self._stopping():
                    stop_reason = self._agreed.stop_reason if self._agreed else "stop_requested"
                    break
                metrics = self.train_step(next(batches))
                self._log_metrics({"kind": "step", **asdict(metrics)})
                for observer in self.observers:
                    observer.on_step(self, metrics)
                if not self.is_main:
                    continue  # evaluation, checkpoints and the decision to stop are rank 0's
                evaluated = self.step % self.cfg.run.eval_every == 0
                if evaluated:
                    self.evaluate()
                # A probe pass that finished in the background may complete the verdict
                # between evaluations.
                if (self._collect_probes() or evaluated) and met_at is None \
                        and indicators.all_met(self.indicators()):
                    met_at = {"step": self.step,
                              "minutes": (time.perf_counter() - started) / 60}
                    log.info("all success indicators met at step %d", self.step)
                    if until_indicators:
                        stop_reason = "indicators_met"
                if self.step % self.cfg.run.checkpoint_every == 0:
                    self.save_checkpoint()
                bar.n = self.step  # a rollback moves the step back
                bar.set_postfix(self._postfix(metrics), refresh=False)
                bar.update(0)
                if stop_reason != "indicators_met" and time.perf_counter() > deadline:
                    stop_reason = "time_limit"
                if stop_reason in ("indicators_met", "time_limit"):
                    if self._agreed is None:
                        break
                    # The other ranks stop with rank 0 at the next broadcast, before a step.
                    self._stop_reason = stop_reason
                    self._stop_requested = True
        finally:
            bar.close()
        if self.is_main:
            summary: dict[str, Any] | None = self._finish(stop_reason, started, met_at)
        else:
            summary = None
        if self.dist.distributed:
            summary = distributed.broadcast_object(summary)
        assert summary is not None
        stop_reason = summary["stop_reason"]  # rank 0's, on every rank
        self._lifecycle("stopped" if stop_reason == "stop_requested" else "finished",
                        f"{stop_reason} at step {self.step}", summary=summary)
        return summary

    def _finish(self, stop_reason: str, started: float, met_at: dict[str, Any] | None
                ) -> dict[str, Any]:
        """Rank 0 at the end of ``train``: last checkpoint, clean exit, summary file."""
        assert self.checkpoints is not None
        entries = self.checkpoints.entries()
        if not entries or entries[-1].step != self.step:  # the loop may have just saved it
            self.save_checkpoint()
        if self.probes is not None:
            # The verdict includes the probes of the final checkpoint.
            self._collect_probes(wait=True)
            self.probes.close()
        self.run_state.clean_exit = True
        self.run_state.consecutive_restarts = 0
        self._write_run_state()
        summary = self.summary(stop_reason, time.perf_counter() - started, met_at)
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
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
            "probes": (self.last_probes.model_dump(mode="json")
                       if self.last_probes is not None else None),
            "overrides": self.overrides,
            "warm_start": (self.warm_start_report.model_dump()
                           if self.warm_start_report is not None else None),
        }
