"""Alignment metrics: how diagonal, monotonic, sharp and complete a Tacotron2 attention is.

``attention`` is shaped [batch, decoder steps T, encoder steps N]. Every score looks only at
the valid block ``[:T_b, :N_b]`` of each sample, so padding (zeros or garbage) and the other
samples of a batch never change it. Rows are renormalised over the valid encoder positions.
Everything is vectorised over the batch: no Python loop runs per sample or per decoder step,
because the trainer scores every validation batch and the tuner polls the numbers.

docs/metrics.md gives the formulas, the reasons for them and what typical patterns score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Values that sit exactly on a threshold (a band edge, the coverage threshold) must not
# flip with float32 rounding, which differs with the padding around a block: they get this
# much slack, in normalised position or in attention weight.
ROUNDING_SLACK = 1e-6

# A row whose valid mass is below this is "attention to nothing"; it is scored as uniform
# attention (the least informative row) rather than dividing by zero.
ZERO_ROW_EPS = 1e-12

# Diagonality: half-width of the band around the monotone path, as a share of the text,
# but never narrower than this many tokens, so short texts keep a band wider than one token.
BAND_MIN_FRACTION = 0.1
BAND_MIN_TOKENS = 2.0
# The ends of the path are averaged over this share of the decoder steps (at least one step),
# so one noisy first or last step cannot make or break the span.
EDGE_FRACTION = 0.05
# Span: the monotone path may advance at most this many tokens per decoder step; anything
# beyond is a leap over text that was never read. Tacotron2 makes one or more decoder steps
# per token (several at one frame per step), so two tokens in one step is already a skip.
LEAP_MAX_TOKENS = 2.0

# Monotonicity: keeps 0 / 0 at 0 when the centroid never moves (in tokens).
MOVE_EPS_TOKENS = 1e-6

# Focus: the attention mass within this many tokens of a step's peak.
FOCUS_RADIUS_TOKENS = 1

# Coverage: a token counts as read when some valid decoder step gives it this much attention.
COVERAGE_THRESHOLD = 0.1

# Quality: weights of the weighted geometric mean (they sum to 1), and the floor that keeps
# log(0) finite. The floor bounds quality at 100 * QUALITY_FLOOR**weight from one zero score.
DIAGONALITY_WEIGHT = 0.35
MONOTONICITY_WEIGHT = 0.2
FOCUS_WEIGHT = 0.2
COVERAGE_WEIGHT = 0.15
SHARPNESS_WEIGHT = 0.1  # applied to 1 - entropy
QUALITY_FLOOR = 1e-3

SCORE_KEYS = ("diagonality", "monotonicity", "focus", "coverage", "entropy", "quality")


def _to_numpy(value: Any, *, as_float: bool) -> np.ndarray:
    """Numpy view of a numpy array, a torch tensor, a list or a scalar."""
    if hasattr(value, "detach"):  # a torch tensor; torch stays an optional import here
        value = value.detach().cpu()
        value = value.float() if as_float else value
        return value.numpy()
    return np.asarray(value)


def _lengths(value: Any, name: str, batch: int, limit: int, axis: str) -> np.ndarray:
    """Validated int64 lengths of shape [batch], each in [1, limit]."""
    lengths = np.atleast_1d(_to_numpy(value, as_float=False))
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {lengths.shape}")
    if lengths.dtype.kind == "f":
        if not np.all(np.isfinite(lengths)) or np.any(lengths != np.round(lengths)):
            raise ValueError(f"{name} must hold whole numbers, got {lengths.tolist()}")
    elif lengths.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    if np.any(lengths < 1) or np.any(lengths > limit):
        raise ValueError(
            f"{name} must lie in [1, {limit}] ({limit} {axis} in attention), "
            f"got {lengths.tolist()}"
        )
    return lengths


def _masked_mean(values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-sample mean of ``values`` [B, T] over the steps where ``mask`` is true."""
    return np.where(mask, values, 0.0).sum(axis=1) / counts


def alignment_scores_per_sample(
    attention: Any, input_lengths: Any, output_lengths: Any
) -> dict[str, np.ndarray]:
    """Score each sample of a batch of attention matrices.

    ``attention`` is [batch, decoder steps, encoder steps] (a 2-D [T, N] matrix is a batch
    of one), as a numpy array or torch tensor; ``input_lengths`` are the valid encoder steps
    and ``output_lengths`` the valid decoder steps of each sample. Returns float64 arrays of
    shape [batch] under the keys of ``SCORE_KEYS``: every score lies in [0, 1] except
    ``quality``, a percentage. Raises ValueError on wrong shapes, lengths out of range, or
    negative or non-finite values inside a valid block.
    """
    att = _to_numpy(attention, as_float=True)
    if att.ndim == 2:
        att = att[None]
    if att.ndim != 3 or 0 in att.shape:
        raise ValueError(
            "attention must be a non-empty [batch, decoder steps, encoder steps] array "
            f"(or one [decoder steps, encoder steps] matrix), got shape {att.shape}"
        )
    if att.dtype.kind not in "fiu":
        raise ValueError(f"attention must be numeric, got dtype {att.dtype}")
    batch, t_all, n_all = att.shape
    in_len = _lengths(input_lengths, "input_lengths", batch, n_all, "encoder steps")
    out_len = _lengths(output_lengths, "output_lengths", batch, t_all, "decoder steps")

    # Nothing beyond the longest valid block can matter: crop before any full-size work.
    t_max, n_max = int(out_len.max()), int(in_len.max())
    att = att[:, :t_max, :n_max]
    steps = np.arange(t_max)
    tokens = np.arange(n_max)
    step_ok = steps[None, :] < out_len[:, None]  # [B, T]
    token_ok = tokens[None, :] < in_len[:, None]  # [B, N]
    # Validation, row sums and the centroid run in float64: the centroid's small moves decide
    # monotonicity, so they must not carry float32 rounding, which changes with the padding
    # around a block. The rest of the [B, T, N] work runs in float32: it is memory-bound, so
    # half the bytes is nearly twice the speed, and 1e-7 is far below any threshold.
    raw = att.astype(np.float64)  # a copy: masking never touches the caller's array
    if not (np.all(step_ok) and np.all(token_ok)):
        # Overwrite, not multiply: garbage padding may hold NaN or inf.
        np.copyto(raw, 0.0, where=~(step_ok[:, :, None] & token_ok[:, None, :]))

    row_sum = raw.sum(axis=2)  # [B, T]; also the cheap first check for NaN/inf
    if not np.all(np.isfinite(row_sum)):
        if not np.all(np.isfinite(raw)):
            raise ValueError("attention holds NaN or inf inside a valid block")
        raise ValueError("attention values are too large to normalise")
    if raw.min() < 0:
        raise ValueError("attention holds negative values inside a valid block")
    empty = step_ok & (row_sum < ZERO_ROW_EPS)
    if np.any(empty):
        # Rare (softmax never gives it), so a boolean gather is fine here.
        raw[empty] = (token_ok / in_len[:, None])[np.nonzero(empty)[0]]
        row_sum = np.where(empty, 1.0, row_sum)
    row_sum = np.maximum(row_sum, ZERO_ROW_EPS)  # padded steps: 0 / eps = 0

    n_steps = out_len.astype(np.float64)
    span_tokens = np.maximum(in_len - 1, 1).astype(np.float64)  # N_b - 1, 1 for N_b = 1
    single_token = in_len == 1
    pos = tokens[None, :] / span_tokens[:, None]  # [B, N]: normalised position, 0..1 valid
    pair_ok = step_ok[:, 1:]  # consecutive valid steps (t-1, t)

    raw /= row_sum[:, :, None]
    a = raw.astype(np.float32)  # the normalised attention, float32 from here on

    # Centroid per decoder step, in normalised position (0 on padded steps), of the mass
    # above the uniform level 1/N_b: a diffuse floor marks no position, and with it a faint
    # diagonal over a floor would read as a line through the middle of the text. A row with
    # nothing above that level (uniform) keeps its plain centroid.
    plain = np.matmul(raw, pos[:, :, None])[:, :, 0]
    raw -= (1.0 / in_len)[:, None, None]
    np.maximum(raw, 0.0, out=raw)  # padded tokens hold 0 - 1/N_b: cut to 0 here
    peak_sum = raw.sum(axis=2)
    centroid = np.where(
        peak_sum > ZERO_ROW_EPS,
        np.matmul(raw, pos[:, :, None])[:, :, 0] / np.maximum(peak_sum, ZERO_ROW_EPS),
        plain,
    )
    del raw  # free the float64 copy before the float32 temporaries below reuse its memory

    # Monotone fit: the mean of the running max from the start and the running min from
    # the end is non-decreasing and equals the centroid wherever that is already monotone.
    # Padded steps sit at the end: -inf/+inf keep them out of both scans.
    run_max = np.maximum.accumulate(np.where(step_ok, centroid, -np.inf), axis=1)
    run_min = np.minimum.accumulate(np.where(step_ok, centroid, np.inf)[:, ::-1], axis=1)
    path = np.where(step_ok, (run_max + run_min[:, ::-1]) / 2.0, 0.0)  # [B, T]

    half_width = np.maximum(BAND_MIN_FRACTION, BAND_MIN_TOKENS / span_tokens)  # [B]
    # The band as token index bounds: comparing small ints is several times cheaper than
    # building |position - path| as a float array of the full [B, T, N] size.
    # The bounds may overshoot the text by a band width (at most 2 tokens or 10%): int16
    # holds them with room to spare below 10,000 tokens.
    index_type = np.int16 if n_max < 10_000 else np.int32
    reach = (half_width + ROUNDING_SLACK)[:, None]
    low = np.ceil((path - reach) * span_tokens[:, None]).astype(index_type)[:, :, None]
    high = np.floor((path + reach) * span_tokens[:, None]).astype(index_type)[:, :, None]
    token_index = tokens.astype(index_type)
    in_band = token_index >= low
    in_band &= token_index <= high
    band = np.einsum("btn,btn->bt", a, in_band).astype(np.float64)
    band_mass = _masked_mean(band, step_ok, n_steps)

    # Span: path end minus path start, each averaged over an edge window of k steps. The
    # window centres lie T_b - k steps apart, not T_b - 1, so rescale to make a straight
    # path from the first to the last token span exactly 1.
    edge = np.maximum(1, np.ceil(EDGE_FRACTION * out_len)).astype(np.int64)  # [B]
    head = np.where(steps[None, :] < edge[:, None], path, 0.0).sum(axis=1) / edge
    tail_ok = step_ok & (steps[None, :] >= (out_len - edge)[:, None])
    tail = np.where(tail_ok, path, 0.0).sum(axis=1) / edge
    stretch = (out_len - 1) / np.maximum(out_len - edge, 1)
    # A leap of more than LEAP_MAX_TOKENS in one step skipped the text in between: the
    # part of the leap beyond that does not count as spanned.
    leap_max = (LEAP_MAX_TOKENS / span_tokens)[:, None]
    leaps = np.where(pair_ok, np.maximum(np.diff(path, axis=1) - leap_max, 0.0), 0.0)
    span = np.clip((tail - head) * stretch - leaps.sum(axis=1), 0.0, 1.0)
    span = np.where(single_token, 1.0, span)  # one token: any path covers all of the text
    diagonality = band_mass * span

    moves = np.where(pair_ok, np.diff(centroid, axis=1), 0.0) * span_tokens[:, None]
    forward = np.maximum(moves, 0.0).sum(axis=1)
    backward = np.maximum(-moves, 0.0).sum(axis=1)
    monotonicity = forward / (forward + backward + MOVE_EPS_TOKENS)
    monotonicity = np.where(single_token, 1.0, monotonicity)  # nowhere to move to

    offsets = np.arange(-FOCUS_RADIUS_TOKENS, FOCUS_RADIUS_TOKENS + 1)
    near = a.argmax(axis=2)[:, :, None] + offsets  # [B, T, 3]: the peak and its neighbours
    gathered = np.take_along_axis(a, np.clip(near, 0, n_max - 1), axis=2)
    # Neighbours off either end of the row do not exist (clipping would count the end twice).
    near_peak = np.where((near >= 0) & (near < n_max), gathered, 0.0).sum(axis=2)
    focus = _masked_mean(near_peak.astype(np.float64), step_ok, n_steps)

    # Padded steps are all zero, so the max over every step is the max over valid ones.
    read = (a.max(axis=1) >= COVERAGE_THRESHOLD - ROUNDING_SLACK) & token_ok
    coverage = read.sum(axis=1) / in_len

    # The floor inside the log makes 0 * log 0 come out as 0.
    log_a = np.maximum(a, np.float32(1e-30))
    np.log(log_a, out=log_a)
    plogp = np.einsum("btn,btn->bt", a, log_a)
    log_n = np.log(np.maximum(in_len, 2).astype(np.float64))
    entropy = _masked_mean(-plogp.astype(np.float64), step_ok, n_steps) / log_n
    entropy = np.where(single_token, 0.0, entropy)

    scores = {
        "diagonality": np.clip(diagonality, 0.0, 1.0),
        "monotonicity": np.clip(monotonicity, 0.0, 1.0),
        "focus": np.clip(focus, 0.0, 1.0),
        "coverage": np.clip(coverage, 0.0, 1.0),
        "entropy": np.clip(entropy, 0.0, 1.0),
    }
    scores["quality"] = _quality(scores)
    return scores


def _quality(scores: dict[str, np.ndarray]) -> np.ndarray:
    """Weighted geometric mean of the five scores as a percentage, per sample.

    Geometric, not arithmetic: one failed property (say diagonality 0) must sink the total,
    however good the others look.
    """
    parts = (
        (scores["diagonality"], DIAGONALITY_WEIGHT),
        (scores["monotonicity"], MONOTONICITY_WEIGHT),
        (scores["focus"], FOCUS_WEIGHT),
        (scores["coverage"], COVERAGE_WEIGHT),
        (1.0 - scores["entropy"], SHARPNESS_WEIGHT),
    )
    log_sum = sum(weight * np.log(np.maximum(value, QUALITY_FLOOR)) for value, weight in parts)
    return np.clip(100.0 * np.exp(log_sum), 0.0, 100.0)


def alignment_scores(
    attention: Any, input_lengths: Any, output_lengths: Any
) -> dict[str, float]:
    """Batch means of ``alignment_scores_per_sample`` as Python floats (same keys)."""
    per_sample = alignment_scores_per_sample(attention, input_lengths, output_lengths)
    return {key: float(np.mean(values)) for key, values in per_sample.items()}

