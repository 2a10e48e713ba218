"""The run folder: the run's record, its metrics file, probe passes, summary and plots.

One folder per run, written by rank 0 alone (a distributed run's other ranks hold a
``RunFolder`` that writes nothing)::

    config.json        the configuration the run was started with
    run_state.json     the RunRecord: identity, restarts, what the run has achieved once
    metrics.jsonl      one line per step, evaluation and probe pass
    probes.jsonl       every probe pass in full
    summary.json       the final report, with the verdict
    plots/             the validation alignment at each checkpoint
    checkpoints/       services.trainer.checkpoints
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.core.streams import validate_run_id
from services.diagnostics.plots import plot_alignment
from services.trainer.checkpoints import RUN_CHECKPOINT_SUBDIR
from services.trainer.config import TrainConfig
from services.trainer.engine import EvalResult
from services.trainer.probes import ProbeSummary
from services.trainer.warm_start import WARM_START_FILE

log = logging.getLogger("services.trainer.training.run_folder")

CONFIG_FILE = "config.json"
RUN_STATE_FILE = "run_state.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PROBES_FILE = "probes.jsonl"
CHECKPOINT_DIR = RUN_CHECKPOINT_SUBDIR
PLOT_DIR = "plots"


def utc_now() -> str:
    """The time now, as the run record and the overrides write it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """Persistent facts about a run across processes: identity, restarts, milestones."""

    run_id: str
    restarts: int = 0
    consecutive_restarts: int = 0
    clean_exit: bool = False
    started_at: str = ""
    aligned_once: bool = False
    spoke_once: bool = False  # the inference indicator was met once (probes)
    # The evaluation at which every indicator was first met together, and how many minutes
    # into the training call that met them; a restart does not forget it.
    first_met_step: int | None = None
    first_met_minutes: float | None = None

    def first_met(self) -> dict[str, Any] | None:
        """``{"step", "minutes"}`` of the first time all indicators were met, if ever."""
        if self.first_met_step is None:
            return None
        return {"step": self.first_met_step, "minutes": self.first_met_minutes}


class RunFolder:
    """Reads and writes one run's folder; ``writer`` False (ranks other than 0) writes nothing.

    Once the run is under way a write that fails (disk full, quota, I/O error) is logged,
    once per episode, and counted in ``write_errors``; it never ends the run: the telemetry
    still carries every number, and the checkpoints report their own failures.
    """

    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.write_errors = 0
        self._failing = False
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _tolerant(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            self.write_errors += 1
            if not self._failing:
                log.error("%s not written to %s: %s; training goes on (further failed "
                          "writes are counted, not logged)", what, self.path, error.strerror
                          or error)
            self._failing = True
        else:
            if self._failing:
                log.warning("%s written again after %d failed writes", what,
                            self.write_errors)
            self._failing = False

    @property
    def checkpoint_dir(self) -> Path:
        """Where the run's checkpoints live."""
        return self.path / CHECKPOINT_DIR

    @property
    def warm_start_file(self) -> Path:
        """The record of the warm start this run began from (services/trainer/warm_start.py)."""
        return self.path / WARM_START_FILE

    def open_record(self, resume: bool, run_id: str | None) -> RunRecord:
        """The run's record: read back and counted as a restart when resuming after a crash,
        else a new one (``run_id`` or a fresh id). Written back at once."""
        path = self.path / RUN_STATE_FILE
        if run_id is not None:
            validate_run_id(run_id)
        if resume and path.exists():
            record = RunRecord(**json.loads(path.read_text()))
            if not record.clean_exit:
                # The previous process died without a clean exit: that is a restart.
                record.restarts += 1
                record.consecutive_restarts += 1
            record.clean_exit = False
        else:
            record = RunRecord(run_id=run_id or uuid.uuid4().hex[:12], started_at=utc_now())
        self.save_record(record)
        return record

    def save_record(self, record: RunRecord) -> None:
        """Replace the record atomically: a crash mid-write leaves the previous one."""
        if not self.writer:
            return
        path = self.path / RUN_STATE_FILE
        tmp = path.with_suffix(".tmp")
        with self._tolerant("the run record"):
            try:
                tmp.write_text(json.dumps(asdict(record), indent=2))
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl."""
        if not self.writer:
            return
        with self._tolerant("a metrics line"), (self.path / METRICS_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_probes(self, summary: ProbeSummary) -> None:
        """A probe pass: its numbers in metrics.jsonl, the whole pass in probes.jsonl."""
        if not self.writer:
            return
        record = summary.model_dump(mode="json")
        self.log({"kind": "probes", **{k: v for k, v in record.items() if k != "results"}})
        with self._tolerant("a probe pass"), (self.path / PROBES_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_config(self, cfg: TrainConfig) -> None:
        """The configuration this process runs with."""
        if self.writer:
            (self.path / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The final report."""
        if self.writer:
            with self._tolerant("the summary"):
                (self.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))

    def save_alignment_plot(self, result: EvalResult) -> Path | None:
        """PNG of the first validation sample's attention at ``result``'s evaluation."""
        if not self.writer:
            return None
        path = self.path / PLOT_DIR / f"alignment-{result.step:08d}.png"
        with self._tolerant("an alignment plot"):
            return plot_alignment(
                result.attention[0], path, title=f"validation alignment, step {result.step}",
                input_length=int(result.input_lengths[0]),
                output_length=int(result.decoder_lengths[0]), scores=result.scores)
        return None
