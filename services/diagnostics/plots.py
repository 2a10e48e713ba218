"""Pictures of an attention matrix: a PNG file for the run directory, PNG bytes for messages.

Built on ``matplotlib.figure.Figure`` rather than pyplot, so drawing keeps no global state
and is safe from any thread of a service (no GUI backend, no figure registry to leak).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from services.core.schemas import AlignmentReport, AttentionSnapshot

if TYPE_CHECKING:
    from services.core.runstore import RunStore

FIGURE_SIZE_INCHES = (8.0, 4.5)
DPI = 100
COLOR_MAP = "viridis"

# Order and short names of the scores shown under the title.
SCORE_LABELS = (
    ("diagonality", "diag"),
    ("monotonicity", "mono"),
    ("focus", "focus"),
    ("coverage", "cov"),
    ("entropy", "ent"),
)


def _as_matrix(attention: Any) -> np.ndarray:
    """The attention as a float [T, N] numpy matrix (a numpy array or a torch tensor)."""
    if hasattr(attention, "detach"):  # a torch tensor; torch stays an optional import here
        attention = attention.detach().cpu().float().numpy()
    matrix = np.asarray(attention, dtype=np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(
            f"attention must be a non-empty [decoder steps, encoder steps] matrix, "
            f"got shape {matrix.shape}"
        )
    return matrix


def _crop_length(length: int | None, size: int, name: str) -> int:
    """The valid length along one axis: ``size`` when not given, else checked against it."""
    if length is None:
        return size
    if not 1 <= int(length) <= size:
        raise ValueError(f"{name} must lie in [1, {size}], got {length}")
    return int(length)


def _subtitle(scores: dict[str, float]) -> str:
    """One line of scores, e.g. ``diag 0.93 · mono 0.99 · … · quality 91.2%``."""
    parts = [f"{short} {scores[key]:.2f}" for key, short in SCORE_LABELS if key in scores]
    if "quality" in scores:
        parts.append(f"quality {scores['quality']:.1f}%")
    return " · ".join(parts)


def _draw(
    attention: Any,
    title: str,
    input_length: int | None,
    output_length: int | None,
    scores: dict[str, float] | None,
) -> Figure:
    """The figure both public functions save: cropped heatmap, colorbar, title, scores."""
    matrix = _as_matrix(attention)
    steps = _crop_length(output_length, matrix.shape[0], "output_length")
    tokens = _crop_length(input_length, matrix.shape[1], "input_length")
    valid = matrix[:steps, :tokens]

    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    # Transposed so that time runs left to right and a good alignment climbs to the right.
    image = axes.imshow(valid.T, aspect="auto", origin="lower", interpolation="none",
                        cmap=COLOR_MAP)
    figure.colorbar(image, ax=axes, label="attention weight")
    axes.set_xlabel(f"decoder step ({steps})")
    axes.set_ylabel(f"encoder step ({tokens})")
    lines = [line for line in (title, _subtitle(scores or {})) if line]
    if lines:
        axes.set_title("\n".join(lines), fontsize=10)
    return figure


def render_alignment_png(
    attention: Any,
    title: str = "",
    input_length: int | None = None,
    output_length: int | None = None,
    scores: dict[str, float] | None = None,
) -> bytes:
    """Draw an attention matrix [T, N] as PNG bytes (for a message or an HTTP reply).

    Only the valid block ``[:output_length, :input_length]`` is drawn; x is the decoder
    step, y the encoder step (origin lower), and ``scores`` (as from
    ``alignment_scores``) are printed under the title.
    """
    figure = _draw(attention, title, input_length, output_length, scores)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_alignment(
    attention: Any,
    path: Path,
    title: str = "",
    input_length: int | None = None,
    output_length: int | None = None,
    scores: dict[str, float] | None = None,
) -> Path:
    """Save an attention matrix [T, N] as a PNG at ``path`` (parents created); return it.

    Draws exactly what ``render_alignment_png`` returns.
    """
    path = Path(path)
    data = render_alignment_png(attention, title, input_length, output_length, scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def render_snapshot(snapshot: AttentionSnapshot, report: AlignmentReport | None) -> bytes:
    """PNG of sample 0 of ``snapshot``, with its scores when ``report`` is of this snapshot.

    Raises MessageError when the sample's payload does not decode.
    """
    sample = snapshot.samples[0]
    scores = None
    if report is not None and report.snapshot_id == snapshot.snapshot_id:
        scores = (report.per_sample[0] if report.per_sample else report.scores).model_dump()
    return render_alignment_png(
        sample.to_array(), title=f"{snapshot.run_id} · step {snapshot.step} · sample 0",
        input_length=sample.input_length, output_length=sample.output_length, scores=scores)


def latest_alignment_png(store: RunStore, run_id: str) -> bytes | None:
    """The run's newest alignment picture: the one the diagnostics worker stored, else sample
    0 of the newest attention snapshot drawn now; None when the run has neither.

    Raises MessageError when the newest snapshot's payload does not decode.
    """
    png = store.stored_png(run_id)
    if png is not None:
        return png
    snapshot = store.latest(run_id, AttentionSnapshot)
    if snapshot is None:
        return None
    return render_snapshot(snapshot, store.latest(run_id, AlignmentReport))
