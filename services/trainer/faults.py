"""Fault injection: reproducible red flags for tests, demos and chaos drills.

``--inject-fault grad_spike:start=20,steps=30,factor=1000`` multiplies the loss (and so
the pre-clip gradient norm) for 30 steps from step 20; ``nan_grad`` makes the gradients
non-finite while the loss stays finite; ``nan_loss`` makes the loss NaN; ``crash`` kills
the process at ``start`` without any clean-up, as a segfault or an OOM kill would.
``every=N`` repeats the fault every N steps from ``start`` (``steps`` each time), as fp16
overflow bursts do. ``ga_off`` sets the guided attention weight to 0 at ``start`` (through
the trainer's own setter, as a person or a schedule would), so an alignment that formed
with its help may collapse.

``replay=1`` ties a ``grad_spike``, ``nan_grad`` or ``nan_loss`` fault to the data, as a
corrupt or pathological utterance does: the batches of its first ``steps`` firings from
``start`` are remembered, and every later batch holding one of their utterances faults
again, whenever the feed brings it back (after a rollback, in the next epoch). Only skipping
those utterances ends it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FaultKind = Literal["grad_spike", "nan_grad", "nan_loss", "crash", "ga_off"]
CRASH_EXIT_CODE = 70


class FaultPlan(BaseModel):
    """Which fault to inject, from which step, for how many steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    start: int = Field(0, ge=0)
    steps: int = Field(1, ge=1)
    factor: float = Field(1000.0, gt=0)
    every: int | None = Field(None, ge=1, description="repeat every N steps from start")
    replay: bool = Field(False, description="the fault travels with its batches' utterances")

    @model_validator(mode="after")
    def _replay_is_data_bound(self) -> FaultPlan:
        if self.replay and self.kind in ("crash", "ga_off"):
            raise ValueError(f"replay: a {self.kind} fault is not tied to data")
        if self.replay and self.every is not None:
            raise ValueError("replay: the data decides when it recurs; drop every")
        return self

    def active(self, step: int) -> bool:
        """Whether the fault applies at optimizer step ``step``."""
        if step < self.start:
            return False
        offset = step - self.start
        if self.every is not None:
            offset %= self.every
        return offset < self.steps

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """Parse ``kind[:key=value,...]``; raises ValueError naming the bad part."""
        kind, _, rest = spec.partition(":")
        fields: dict[str, str] = {"kind": kind.strip()}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"fault spec {spec!r}: expected key=value, got {part!r}")
            fields[key.strip()] = value.strip()
        try:
            return cls.model_validate(fields)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"])) or "spec"
            raise ValueError(f"fault spec {spec!r}: {where}: {first['msg']}") from None


class FaultInjector:
    """Applies a plan to the training steps; a ``replay`` plan remembers its utterances."""

    def __init__(self, plan: FaultPlan | None) -> None:
        self.plan = plan
        self.poisoned: set[str] = set()  # replay: utterances whose batches fault
        self.fired = 0  # replay: steps that faulted by the plan's schedule

    def fires(self, step: int, ids: list[str]) -> bool:
        """Whether the fault applies to the batch ``ids`` at optimizer step ``step``."""
        plan = self.plan
        if plan is None or plan.kind == "ga_off":
            return False
        if not plan.replay:
            return plan.active(step)
        if self.poisoned.intersection(ids):
            return True
        if step >= plan.start and self.fired < plan.steps:
            self.fired += 1
            self.poisoned.update(ids)
            return True
        return False

    def apply(self, step: int, ids: list[str], loss: torch.Tensor, mel: torch.Tensor
              ) -> torch.Tensor:
        """Return the loss to back-propagate at ``step``, with the planned fault applied."""
        if not self.fires(step, ids):
            return loss
        assert self.plan is not None
        return _fault(self.plan, loss, mel)


def inject(plan: FaultPlan | None, step: int, loss: torch.Tensor, mel: torch.Tensor
           ) -> torch.Tensor:
    """Return the loss to back-propagate at ``step``, with the planned fault applied (a
    schedule by step alone; ``FaultInjector`` also follows a ``replay`` plan's data)."""
    if plan is None or plan.kind == "ga_off" or not plan.active(step):
        return loss
    return _fault(plan, loss, mel)


def _fault(plan: FaultPlan, loss: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
    if plan.kind == "crash":
        os._exit(CRASH_EXIT_CODE)
    if plan.kind == "grad_spike":
        return loss * plan.factor
    if plan.kind == "nan_loss":
        return loss * float("nan")
    # nan_grad: the loss value stays finite, every gradient through the decoder is NaN.
    if mel.requires_grad:
        mel.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    return loss


class GuidedAttentionRemoval:
    """The ``ga_off`` fault as a training controller: at the plan's start step it sets the
    guided attention weight to 0 once, through the trainer's setter (so the metrics, the
    overrides and the tuner all see the change, as they would a person's)."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.done = False

    def before_step(self, trainer: Any) -> None:
        """Remove the guided attention term once the run reaches the plan's start."""
        if not self.done and trainer.step >= self.plan.start:
            trainer.set_guided_attention_weight(0.0, source="fault")
            self.done = True
