"""The plan's success indicators and red flags: thresholds named once for every service.

The trainer's final summary, the tuner's rules, the alert rules and the Telegram report
all read these numbers from here, so "met" means the same thing everywhere.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Success indicators (docs/plan.md, "Success indicators").
GRAD_NORM_OK = 10.0
DIAGONALITY_OK = 0.7
MAX_RESTARTS_OK = 0
LOSS_OK = 1.0
QUALITY_OK = 80.0
# The sixth indicator, beyond the plan's five: the model speaks unseen text and stops.
# Measured on the probe set (services/trainer/probes.py), free-running.
PROBES_STOP_OK = 90.0  # % of probes whose gate fires by itself at a sane length
INFERENCE_DIAGONALITY_OK = DIAGONALITY_OK  # median over the probes

# Red flags (docs/plan.md, "Red flags").
GRAD_NORM_RED_FLAG = 100.0
DIAGONALITY_RED_FLAG = 0.1
# plan 2.1: "diagonality < 0.3 -> CRITICAL: poor attention alignment". Below the success
# threshold, above the red flag: a run that aligned once and falls under it is unhealthy
# (no rollback target), and after warm-up it is a warning the tuner acts on.
DIAGONALITY_WEAK = 0.3
CONSECUTIVE_RESTARTS_RED_FLAG = 3
LOSS_PLATEAU_STEPS_RED_FLAG = 1000


# Indicator names, as reports and messages show them.
GRAD_NORM = "grad norm (pre-clip)"
DIAGONALITY = "diagonality"
RESTARTS = "restarts"
LOSS = "loss"
QUALITY = "quality %"
PROBES_STOP = "probes stop %"
INFERENCE_DIAGONALITY = "inference diagonality"
# The two that need an alignment report to be judged at all.
ALIGNMENT_INDICATORS = frozenset({DIAGONALITY, QUALITY})
# The two measures of the inference indicator: they need a probe pass.
INFERENCE_INDICATORS = frozenset({PROBES_STOP, INFERENCE_DIAGONALITY})


class Indicator(BaseModel):
    """One success indicator: its value, the threshold it is held to, whether it is met,
    and how the value was measured (so every surface can say what it shows)."""

    # A verdict nested in a bus message is serialised by this model's own config: without
    # it a NaN (no probe pass yet) or infinite value is written as null and the message
    # cannot be read back.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    name: str
    value: float
    threshold: float
    comparison: str
    met: bool
    measured: str = Field(default="", description="how the value was measured, in words")

    def describe(self) -> str:
        """One human line, e.g. ``[x] grad norm (pre-clip) 3.21 < 10``."""
        mark = "x" if self.met else " "
        return f"[{mark}] {self.name} {self.value:.4g} {self.comparison} {self.threshold:g}"


def evaluate_indicators(
    grad_norm: float, diagonality: float, restarts: int, loss: float, quality: float
) -> list[Indicator]:
    """Check the five success indicators.

    ``grad_norm`` must be measured before clipping, ``loss`` is the validation loss the
    model optimises (mel + postnet mel + gate), ``quality`` is a percentage.
    """
    return [
        Indicator(name=GRAD_NORM, value=grad_norm, threshold=GRAD_NORM_OK,
                  comparison="<", met=grad_norm < GRAD_NORM_OK),
        Indicator(name=DIAGONALITY, value=diagonality, threshold=DIAGONALITY_OK,
                  comparison=">", met=diagonality > DIAGONALITY_OK),
        Indicator(name=RESTARTS, value=float(restarts), threshold=float(MAX_RESTARTS_OK),
                  comparison="<=", met=restarts <= MAX_RESTARTS_OK),
        Indicator(name=LOSS, value=loss, threshold=LOSS_OK, comparison="<",
                  met=loss < LOSS_OK),
        Indicator(name=QUALITY, value=quality, threshold=QUALITY_OK, comparison=">",
                  met=quality > QUALITY_OK),
    ]


def evaluate_inference(stop_percent: float, median_diagonality: float) -> list[Indicator]:
    """The inference indicator: share of probes that stop (%) and their median inference
    diagonality. NaN (no probe pass yet) is never met."""
    return [
        Indicator(name=PROBES_STOP, value=stop_percent, threshold=PROBES_STOP_OK,
                  comparison=">=", met=stop_percent >= PROBES_STOP_OK),
        Indicator(name=INFERENCE_DIAGONALITY, value=median_diagonality,
                  threshold=INFERENCE_DIAGONALITY_OK, comparison=">",
                  met=median_diagonality > INFERENCE_DIAGONALITY_OK),
    ]


def all_met(indicators: list[Indicator]) -> bool:
    """True when every indicator is met."""
    return all(indicator.met for indicator in indicators)


class Verdict(BaseModel):
    """The run's standing against every indicator at one evaluation: the one verdict.

    Only the trainer computes it (services/trainer); the tuner, the bot, the API, the
    reports and the dashboards show this object and never re-derive it from raw metrics.
    """

    step: int = Field(ge=0, description="the training step of the evaluation")
    indicators: list[Indicator]
    all_met: bool
    first_met_step: int | None = Field(
        default=None, description="the step at which every indicator was first met together")

    def get(self, name: str) -> Indicator | None:
        """The indicator called ``name``, if the verdict has it."""
        return next((i for i in self.indicators if i.name == name), None)

    @property
    def met_count(self) -> int:
        """How many indicators are met."""
        return sum(indicator.met for indicator in self.indicators)


def make_verdict(step: int, checks: list[Indicator], first_met_step: int | None = None
                 ) -> Verdict:
    """The verdict of ``checks`` at ``step``; ``all_met`` is derived, never passed."""
    return Verdict(step=step, indicators=checks, all_met=all_met(checks),
                   first_met_step=first_met_step)
