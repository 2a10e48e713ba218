"""The run's inference probes: a pass per checkpoint, taken in as it finishes.

services/trainer/probes.py synthesises and judges the probe sentences; this part wires
that into a run (rank 0's alone): it starts a pass on each checkpoint's weights, takes in
finished passes between steps, records them in the run folder and the run record, marks
in the checkpoint manifest which checkpoints spoke (a rollback target must), and tells the
observers. It knows which checkpoint's pass is in flight: that step's verdict waits for it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.core import indicators
from services.trainer.config import TrainConfig
from services.trainer.feed import Feed
from services.trainer.model import Tacotron2
from services.trainer.probes import ProbeRunner, ProbeSummary, probes_for

if TYPE_CHECKING:  # the Trainer composes this part; the part records through it
    from services.trainer.training import Trainer

# A child of the trainer's logger: what was logged by the trainer before the split still is
# (a level or handler set on services.trainer.training covers it).
log = logging.getLogger("services.trainer.training.probing")


def make_probe_runner(cfg: TrainConfig, feed: Feed) -> ProbeRunner | None:
    """The probe runner for the corpus ``feed`` holds; None when probes are off."""
    settings = cfg.probes
    if not settings.enabled:
        return None
    recognizer = None
    if settings.wer and "en" in feed.languages:
        from services.diagnostics.asr import Recognizer

        installed, reason = Recognizer.available()
        if installed:
            recognizer = Recognizer()
        else:
            log.info("probes: no word error rate (%s)", reason)
    return ProbeRunner(cfg, feed.store.mean, feed.store.std, probes_for(feed.languages),
                       feed.frames_per_symbol, recognizer=recognizer,
                       background=settings.background)


class Probing:
    """A run's probe passes: started per checkpoint, collected between steps."""

    def __init__(self, runner: ProbeRunner | None):
        self.runner = runner  # None: probes off, or not rank 0
        self.last: ProbeSummary | None = None  # the latest finished pass
        self.in_flight: int | None = None  # the checkpoint step whose pass is running

    def submit(self, model: Tacotron2, step: int) -> None:
        """Start a pass on ``model``'s weights of checkpoint ``step`` (if probes are on)."""
        if self.runner is not None:
            self.runner.submit(model, step)
            self.in_flight = step

    def collect(self, trainer: Trainer, wait: bool = False) -> bool:
        """Take in finished passes (``wait``: every pending one); returns whether any."""
        if self.runner is None:
            return False
        finished = self.runner.wait() if wait else self.runner.collect()
        if wait:
            self.in_flight = None  # nothing in flight now (a failed pass yields no summary)
        state = trainer.run_state
        for summary in finished:
            self.last = summary
            if self.in_flight is not None and summary.step >= self.in_flight:
                self.in_flight = None
            speaks = indicators.all_met(summary.indicators())
            if speaks and not state.spoke_once:
                state.spoke_once = True
                trainer.run_folder.save_record(state)
            trainer.run_folder.log_probes(summary)
            assert trainer.checkpoints is not None
            # Once the model has spoken, a checkpoint that no longer does is no rollback
            # target (as one that lost its alignment is not).
            trainer.checkpoints.record_probe_score(
                summary.step, summary.score, unhealthy=state.spoke_once and not speaks)
            for observer in trainer.observers:
                observer.on_probes(trainer, summary)
        return bool(finished)

    def close(self) -> None:
        """Stop the runner (its background worker, if any)."""
        if self.runner is not None:
            self.runner.close()
