"""Warm start: begin a new run from another run's weights (NVIDIA/tacotron2 ``--warm_start``).

Only the weights are taken: the new run has a fresh optimizer, step 0 and a fresh LR
schedule. A weight is loaded when the new model has the same name with the same shape;
``--ignore-layers`` prefixes keep chosen layers at their fresh initialisation (e.g. the
symbol embedding of another language). The symbol table is append-only
(services/trainer/text.py), so an embedding with fewer rows than the current table is the
same table before symbols were added: its rows are copied into the first rows and the new
rows keep their fresh init. Anything else that does not fit is skipped, with the reason.

This module is pure (state dicts in, state dict and report out); the Trainer reads the
checkpoint and records the report.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from pydantic import BaseModel, Field

# The report in the run folder of a warm-started run.
WARM_START_FILE = "warm_start.json"
# Reasons a weight was not loaded, as they appear in the report.
IGNORED = "ignored by --ignore-layers"
NOT_IN_CHECKPOINT = "not in checkpoint"
NOT_IN_MODEL = "not in model"
# Weights whose first dimension may grow between runs: rows indexed by symbol id.
EXTENDABLE = ("embedding.weight",)


class WarmStartError(ValueError):
    """The warm-start checkpoint cannot be used; the message names it and says why."""


class SkippedLayer(BaseModel):
    """A weight that was not taken from the checkpoint, and why."""

    name: str
    reason: str


class ExtendedLayer(BaseModel):
    """A weight whose first ``copied_rows`` rows came from the checkpoint, the rest fresh."""

    name: str
    copied_rows: int
    rows: int


class WarmStartReport(BaseModel):
    """What a warm start took from the checkpoint; written to the run folder."""

    source: str = ""
    source_step: int | None = None
    ignore_layers: list[str] = Field(default_factory=list)
    loaded: int = 0  # weights taken whole
    extended: list[ExtendedLayer] = Field(default_factory=list)
    skipped: list[SkippedLayer] = Field(default_factory=list)
    # --ignore-layers prefixes that matched no weight of the model: most likely a typo.
    unused_ignore_layers: list[str] = Field(default_factory=list)


def parse_ignore_layers(text: str | None) -> list[str]:
    """``"embedding, decoder.projection"`` -> ``["embedding", "decoder.projection"]``."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def matches_prefix(name: str, prefix: str) -> bool:
    """Whether ``prefix`` names ``name`` or a module above it.

    Whole path components only: ``decoder.attention`` matches ``decoder.attention.v.weight``
    but not ``decoder.attention_rnn.weight_ih``.
    """
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(size) for size in tensor.shape) + ")"


def _extendable(name: str, ours: torch.Tensor, theirs: torch.Tensor,
                extendable: Collection[str]) -> bool:
    return (name in extendable and ours.dim() == theirs.dim() >= 1
            and theirs.shape[0] < ours.shape[0] and theirs.shape[1:] == ours.shape[1:])


def merge_state_dicts(model_state: Mapping[str, torch.Tensor],
                      checkpoint_state: Mapping[str, torch.Tensor],
                      ignore_layers: Sequence[str] = (),
                      extendable: Collection[str] = EXTENDABLE,
                      ) -> tuple[dict[str, torch.Tensor], WarmStartReport]:
    """The model's state with every compatible checkpoint weight laid over it, and a report.

    The result has exactly the model's names, so ``load_state_dict`` takes it strictly.
    Shape reasons read ``shape (checkpoint) vs (model)``.
    """
    merged: dict[str, torch.Tensor] = {}
    report = WarmStartReport(ignore_layers=list(ignore_layers))
    used: set[str] = set()
    for name, ours in model_state.items():
        matched = [prefix for prefix in ignore_layers if matches_prefix(name, prefix)]
        used.update(matched)
        theirs = checkpoint_state.get(name)
        reason: str | None = None
        if matched:
            reason = IGNORED
        elif theirs is None:
            reason = NOT_IN_CHECKPOINT
        elif theirs.shape == ours.shape:
            merged[name] = theirs.detach().to(dtype=ours.dtype, device=ours.device).clone()
            report.loaded += 1
            continue
        elif _extendable(name, ours, theirs, extendable):
            grown = ours.detach().clone()
            grown[: theirs.shape[0]] = theirs.to(dtype=ours.dtype, device=ours.device)
            merged[name] = grown
            report.extended.append(ExtendedLayer(name=name, copied_rows=theirs.shape[0],
                                                 rows=ours.shape[0]))
            continue
        else:
            reason = f"shape {_shape(theirs)} vs {_shape(ours)}"
        merged[name] = ours.detach().clone()
        report.skipped.append(SkippedLayer(name=name, reason=reason))
    report.skipped += [SkippedLayer(name=name, reason=NOT_IN_MODEL)
                       for name in checkpoint_state if name not in model_state]
    report.unused_ignore_layers = [p for p in ignore_layers if p not in used]
    return merged, report


def describe(report: WarmStartReport) -> str:
    """One log line: what was loaded, extended and skipped."""
    parts = [f"warm start from {report.source} (step {report.source_step}): "
             f"{report.loaded} weights loaded"]
    parts += [f"{item.name}: first {item.copied_rows} of {item.rows} rows loaded, the new "
              "rows keep their fresh init" for item in report.extended]
    if report.skipped:
        parts.append(f"{len(report.skipped)} skipped: " + ", ".join(
            f"{item.name} ({item.reason})" for item in report.skipped))
    return "; ".join(parts)
