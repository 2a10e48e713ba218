"""The run's verdict: every success indicator at the latest evaluation, measured and said how.

The plan's five indicators are judged on an evaluation (``training_checks``), the inference
indicator on the latest probe pass (``inference_checks``). ``Verdicts`` makes the verdict,
records in the run record when all indicators were first met, and hands each evaluation's
verdict to the observers exactly once: when its checkpoint's probe pass is in (if one was
started at that step), or when a newer evaluation or the end of the run cannot wait.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from services.core import indicators
from services.core.indicators import Indicator, Verdict, make_verdict
from services.trainer.engine import EvalResult
from services.trainer.probes import ProbeSummary

if TYPE_CHECKING:  # the Trainer composes this part; the part reads the run through it
    from services.trainer.training import Trainer

# A child of the trainer's logger: what was logged by the trainer before the split still is
# (a level or handler set on services.trainer.training covers it).
log = logging.getLogger("services.trainer.training.verdicts")


def training_checks(result: EvalResult, restarts: int) -> list[Indicator]:
    """The plan's five indicators at the evaluation ``result``, each saying how it was measured.

    Grad norm is the *largest* pre-clip norm of the applied steps of the window the
    evaluation closes (``eval_every`` steps), so one bad step in the window fails it. A
    spike the spike guard withheld never reached the weights: it is not in the window.
    """
    step = result.step
    checks = indicators.evaluate_indicators(
        grad_norm=result.window_grad_norm, diagonality=result.scores["diagonality"],
        restarts=restarts, loss=result.losses["objective"], quality=result.scores["quality"])
    measured = {
        indicators.GRAD_NORM: grad_norm_measured(result),
        indicators.DIAGONALITY: f"diagonality of the validation batch at step {step}",
        indicators.RESTARTS: "restarts of this run (processes that ended without a clean "
                             "exit)",
        indicators.LOSS: f"validation loss mel+postnet+gate at step {step}",
        indicators.QUALITY: f"alignment quality of the validation batch at step {step}",
    }
    return [check.model_copy(update={"measured": measured[check.name]}) for check in checks]


def grad_norm_measured(result: EvalResult) -> str:
    """How the grad norm indicator was measured at ``result``, in words.

    With the spike guard off the window's steps are the finite ones (a non-finite step is
    never applied); with it on, the applied ones, and the withheld spikes are counted.
    """
    step, window = result.step, result.window_steps
    if not result.spike_guard and not result.window_guarded:
        return (f"largest pre-clip grad norm of the last {window} finite steps to step {step}"
                if window else f"no finite step in the window before step {step}")
    text = (f"largest pre-clip grad norm of the last {window} applied steps to step {step}"
            if window else f"no applied step in the window before step {step}")
    guarded = result.window_guarded
    if guarded:
        text += (f"; {guarded} step{'s' if guarded > 1 else ''} withheld by the spike guard "
                 "not counted")
    return text


def inference_checks(probes: ProbeSummary | None) -> list[Indicator]:
    """The inference indicator on the latest probe pass; not met before the first."""
    if probes is None:
        checks = indicators.evaluate_inference(math.nan, math.nan)
        return [check.model_copy(update={"measured": "no probe pass yet"})
                for check in checks]
    where = f"probe pass of checkpoint step {probes.step} ({probes.n} probes)"
    measured = {indicators.PROBES_STOP: f"share of probes that stopped by themselves, {where}",
                indicators.INFERENCE_DIAGONALITY: f"median inference diagonality, {where}"}
    return [check.model_copy(update={"measured": measured[check.name]})
            for check in probes.indicators()]


class Verdicts:
    """Judges the run and tells the observers, one verdict per evaluation, in order."""

    def __init__(self, probes_enabled: bool):
        self.probes_enabled = probes_enabled
        # The evaluation whose verdict observers have not had yet.
        self.due: int | None = None

    def judge(self, trainer: Trainer, result: EvalResult) -> Verdict:
        """The run against every indicator at the evaluation ``result``.

        The plan's five on the evaluation, then (probes on) the inference indicator on the
        latest probe pass; ``first_met_step`` is the run record's: the evaluation at which
        all were first met, restarts included.
        """
        state = trainer.run_state
        checks = training_checks(result, state.restarts)
        if self.probes_enabled:
            checks += inference_checks(trainer.last_probes)
        return make_verdict(result.step, checks, state.first_met_step)

    def note_all_met(self, trainer: Trainer, started: float) -> bool:
        """Whether every indicator is met now; the first time ever goes in the run record.

        ``started``: when the training call began (``time.perf_counter``), for the minutes.
        """
        verdict = trainer.verdict()
        state = trainer.run_state
        if verdict.all_met and state.first_met_step is None:
            state.first_met_step = verdict.step
            state.first_met_minutes = (time.perf_counter() - started) / 60
            trainer.run_folder.save_record(state)
            log.info("all success indicators met at step %d", verdict.step)
        return verdict.all_met

    def settle(self, trainer: Trainer, force: bool = False) -> None:
        """Give observers the due evaluation's verdict, unless it waits for its probes.

        ``force``: now, with whatever probes are known (a newer evaluation is coming, or
        the run is ending), so every evaluation gets exactly one verdict, in order.
        """
        if self.due is None or (not force and trainer.probing.in_flight == self.due):
            return
        self.due = None
        verdict = trainer.verdict()
        for observer in trainer.observers:
            observer.on_verdict(trainer, verdict)

    def summary(self, trainer: Trainer, stop_reason: str, seconds: float) -> dict[str, Any]:
        """The run's final report: the verdict at the last evaluation, and its history."""
        verdict = trainer.verdict()
        result, state = trainer.last_eval, trainer.run_state
        assert result is not None
        return {
            "run_id": state.run_id,
            "step": trainer.step,
            "stop_reason": stop_reason,
            "seconds": round(seconds, 1),
            "skipped_steps": trainer.skipped_steps,
            "guarded_steps": trainer.guarded_steps,
            "restarts": state.restarts,
            "validation": result.losses,
            "alignment": result.scores,
            # The verdict's parts under the keys readers of earlier summaries know.
            "indicators": [check.model_dump() for check in verdict.indicators],
            "all_indicators_met": verdict.all_met,
            "indicators_first_met": state.first_met(),
            "verdict": verdict.model_dump(),
            "probes": (trainer.last_probes.model_dump(mode="json")
                       if trainer.last_probes is not None else None),
            "overrides": trainer.overrides,
            "warm_start": (trainer.warm_start_report.model_dump()
                           if trainer.warm_start_report is not None else None),
        }
