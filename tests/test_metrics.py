"""Alignment metrics and plots: ranges, the ranking of known patterns, padding, hand values."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.indicators import DIAGONALITY_OK, DIAGONALITY_RED_FLAG, QUALITY_OK
from services.diagnostics import metrics
from services.diagnostics.metrics import (
    SCORE_KEYS,
    alignment_scores,
    alignment_scores_per_sample,
)
from services.diagnostics.plots import plot_alignment, render_alignment_png

# Few examples each: every example is a full attention matrix, and the file must stay fast.
FAST = settings(max_examples=25, deadline=None)

Pattern = Callable[[int, int, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------------------- patterns


def _rows(centres: np.ndarray, n: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-blurred rows around ``centres`` (in tokens), with the tiny floor of a softmax."""
    tokens = np.arange(n)
    rows = np.exp(-0.5 * ((tokens[None, :] - centres[:, None]) / sigma) ** 2)
    rows += rng.uniform(0.0, 1e-4, size=rows.shape)
    return rows / rows.sum(axis=1, keepdims=True)


def diagonal(t: int, n: int, rng: np.random.Generator, sigma: float = 0.5) -> np.ndarray:
    """Clean alignment: a straight path from the first to the last token, slightly blurred."""
    return _rows(np.linspace(0.0, n - 1, t), n, sigma, rng)


def nonlinear(t: int, n: int, rng: np.random.Generator, sigma: float = 0.5) -> np.ndarray:
    """Clean but uneven alignment: the rate swings 0.3x-1.7x, with a long pause and stalls."""
    phase = np.linspace(0.0, rng.uniform(3.0, 12.0), t - 1) + rng.uniform(0.0, 2 * np.pi)
    rate = (1.0 + 0.7 * np.sin(phase)) * rng.uniform(0.7, 1.3, size=t - 1)
    pause = int(rng.integers(0, (t - 1) // 4 + 1))
    start = int(rng.integers(0, t - pause))
    rate[start : start + pause] = 0.0  # the position repeats for up to a quarter of the steps
    rate[rng.random(t - 1) < 0.05] = 0.0  # and stalls for single steps now and then
    rate[-1] = max(rate[-1], 0.1)  # a path that never moves is "stuck", not this pattern
    centres = np.concatenate([[0.0], np.cumsum(rate)])
    return _rows(centres * (n - 1) / centres[-1], n, sigma, rng)


def uniform(t: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """No alignment at all: every token gets the same weight (an untrained model)."""
    return np.full((t, n), 1.0 / n)


def stuck(t: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Attention that never leaves one token."""
    return _rows(np.full(t, float(rng.integers(0, n))), n, 0.5, rng)


def reversed_diagonal(t: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A clean path read backwards, from the last token to the first."""
    return diagonal(t, n, rng)[::-1].copy()


def random_rows(t: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Each step an unrelated random distribution (Dirichlet, from sparse to flat rows)."""
    return rng.dirichlet(np.full(n, rng.uniform(0.3, 3.0)), size=t)


BAD_PATTERNS: dict[str, Pattern] = {
    "uniform": uniform,
    "stuck": stuck,
    "reversed": reversed_diagonal,
    "random": random_rows,
}
ALL_PATTERNS: dict[str, Pattern] = {"diagonal": diagonal, "nonlinear": nonlinear, **BAD_PATTERNS}

seeds = st.integers(0, 2**32 - 1)
# Decoder steps per token: Tacotron2 makes one to several decoder steps per token.
ratios = st.floats(1.0, 4.0)


def _one(attention: np.ndarray) -> dict[str, float]:
    """Scores of one matrix whose whole extent is valid."""
    t, n = attention.shape
    return alignment_scores(attention, [n], [t])


# ---------------------------------------------------------------------------- properties


@FAST
@given(
    name=st.sampled_from(sorted(ALL_PATTERNS)),
    n=st.integers(1, 60),
    ratio=st.floats(0.2, 4.0),
    seed=seeds,
)
def test_scores_lie_in_range(name: str, n: int, ratio: float, seed: int) -> None:
    t = max(2, round(n * ratio))
    scores = _one(ALL_PATTERNS[name](t, n, np.random.default_rng(seed)))
    assert tuple(scores) == SCORE_KEYS
    for key in SCORE_KEYS[:-1]:
        assert 0.0 <= scores[key] <= 1.0, (key, scores)
    assert 0.0 <= scores["quality"] <= 100.0


@FAST
@given(n=st.integers(10, 80), ratio=ratios, sigma=st.floats(0.2, 0.8), seed=seeds)
def test_clean_diagonal_scores_high(n: int, ratio: float, sigma: float, seed: int) -> None:
    scores = _one(diagonal(round(n * ratio), n, np.random.default_rng(seed), sigma))
    assert scores["diagonality"] > 0.8, scores
    assert scores["quality"] > 85.0, scores
    assert scores["diagonality"] > DIAGONALITY_OK and scores["quality"] > QUALITY_OK


@FAST
@given(n=st.integers(10, 80), ratio=ratios, sigma=st.floats(0.2, 0.7), seed=seeds)
def test_nonlinear_monotonic_path_scores_high(
    n: int, ratio: float, sigma: float, seed: int
) -> None:
    scores = _one(nonlinear(round(n * ratio), n, np.random.default_rng(seed), sigma))
    assert scores["diagonality"] > 0.7, scores
    assert scores["quality"] > 80.0, scores


@FAST
@given(name=st.sampled_from(sorted(BAD_PATTERNS)), n=st.integers(20, 80), ratio=ratios,
       seed=seeds)
def test_failed_alignments_score_low_and_rank_below_diagonal(
    name: str, n: int, ratio: float, seed: int
) -> None:
    # From 20 tokens up: on a handful of tokens a random row can look diagonal by chance.
    t = round(n * ratio)
    rng = np.random.default_rng(seed)
    bad = _one(BAD_PATTERNS[name](t, n, rng))
    clean = _one(diagonal(t, n, rng))
    assert bad["diagonality"] < 0.2, (name, bad)
    assert bad["quality"] < 30.0, (name, bad)
    assert bad["diagonality"] < clean["diagonality"]
    assert bad["quality"] < clean["quality"]


def test_red_flag_patterns_are_below_the_red_flag() -> None:
    rng = np.random.default_rng(0)
    for name in ("uniform", "stuck", "reversed"):
        assert _one(BAD_PATTERNS[name](120, 40, rng))["diagonality"] < DIAGONALITY_RED_FLAG


def test_a_path_that_stops_halfway_spans_half_the_text() -> None:
    centres = np.minimum(np.linspace(0.0, 59.0, 150), 29.5)
    scores = _one(_rows(centres, 60, 0.5, np.random.default_rng(0)))
    assert 0.45 < scores["diagonality"] < 0.55
    assert scores["coverage"] < 0.6


def test_a_leap_over_the_middle_third_is_not_counted_as_spanned() -> None:
    centres = np.linspace(0.0, 59.0, 150)
    centres[50:100] = np.linspace(19.7, 19.7, 50)  # hold at a third ...
    centres[100:] = np.linspace(39.3, 59.0, 50)  # ... then jump over the middle third
    scores = _one(_rows(centres, 60, 0.5, np.random.default_rng(0)))
    # The leap of ~19.6 tokens counts only its first 2 tokens as spanned:
    # 1 - (19.6 - 2) / 59 = 0.70.
    assert 0.65 < scores["diagonality"] < 0.75
    assert scores["coverage"] < 0.75


@st.composite
def padded_batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """A batch of patterns of mixed sizes, zero- or garbage-padded, and each sample alone."""
    rng = np.random.default_rng(draw(seeds))
    size = draw(st.integers(1, 4))
    names = draw(st.lists(st.sampled_from(sorted(ALL_PATTERNS)), min_size=size, max_size=size))
    blocks = []
    for name in names:
        n = draw(st.integers(1, 40))
        blocks.append(ALL_PATTERNS[name](max(2, round(n * draw(ratios))), n, rng))
    t_all = max(b.shape[0] for b in blocks) + draw(st.integers(0, 7))
    n_all = max(b.shape[1] for b in blocks) + draw(st.integers(0, 7))
    filler = draw(st.sampled_from(["zeros", "garbage", "nan"]))
    if filler == "zeros":
        batch = np.zeros((size, t_all, n_all))
    else:
        batch = rng.uniform(-5.0, 5.0, size=(size, t_all, n_all))
        if filler == "nan":
            batch[rng.random(batch.shape) < 0.3] = np.nan
    for i, block in enumerate(blocks):
        batch[i, : block.shape[0], : block.shape[1]] = block
    in_len = np.array([b.shape[1] for b in blocks])
    out_len = np.array([b.shape[0] for b in blocks])
    return batch, in_len, out_len, blocks


@FAST
@given(case=padded_batches())
def test_padding_and_batch_neighbours_never_change_a_score(case: tuple) -> None:
    batch, in_len, out_len, blocks = case
    together = alignment_scores_per_sample(batch, in_len, out_len)
    for i, block in enumerate(blocks):
        alone = alignment_scores_per_sample(block, [block.shape[1]], [block.shape[0]])
        for key in SCORE_KEYS:
            # Equal up to float32 rounding, which depends on the row length.
            np.testing.assert_allclose(together[key][i], alone[key][0], rtol=1e-5, atol=1e-6,
                                       err_msg=key)


@FAST
@given(case=padded_batches())
def test_torch_input_equals_numpy_input(case: tuple) -> None:
    batch, in_len, out_len, _ = case
    batch = batch.astype(np.float32)  # what .float() gives torch, so both see equal values
    from_numpy = alignment_scores_per_sample(batch, in_len, out_len)
    from_torch = alignment_scores_per_sample(
        torch.from_numpy(batch), torch.from_numpy(in_len), torch.from_numpy(out_len)
    )
    for key in SCORE_KEYS:
        np.testing.assert_array_equal(from_torch[key], from_numpy[key], err_msg=key)


def test_batch_means_are_python_floats() -> None:
    rng = np.random.default_rng(3)
    batch = np.stack([diagonal(50, 20, rng), uniform(50, 20, rng)])
    per_sample = alignment_scores_per_sample(batch, [20, 20], [50, 50])
    means = alignment_scores(batch, [20, 20], [50, 50])
    assert tuple(means) == SCORE_KEYS
    for key in SCORE_KEYS:
        assert type(means[key]) is float
        assert per_sample[key].shape == (2,)
        assert means[key] == pytest.approx(per_sample[key].mean())


def test_quality_weights_sum_to_one() -> None:
    weights = (metrics.DIAGONALITY_WEIGHT, metrics.MONOTONICITY_WEIGHT, metrics.FOCUS_WEIGHT,
               metrics.COVERAGE_WEIGHT, metrics.SHARPNESS_WEIGHT)
    assert math.isclose(sum(weights), 1.0)


# ---------------------------------------------------------------------------- hand values


def test_identity_2x2_is_perfect() -> None:
    # Centroid 0 -> 1 token: forward 1, backward 0, so monotonicity 1 / (1 + 1e-6).
    # Each row is one-hot: focus 1, entropy 0; both tokens peak at 1 >= 0.1: coverage 1.
    # The band (half-width 2 tokens) holds all the mass and the path spans 0 -> 1:
    # diagonality 1, so quality is 100 * monotonicity ** 0.2.
    scores = _one(np.eye(2))
    assert scores["diagonality"] == pytest.approx(1.0)
    assert scores["monotonicity"] == pytest.approx(1.0 / (1.0 + 1e-6))
    assert scores["focus"] == pytest.approx(1.0)
    assert scores["coverage"] == pytest.approx(1.0)
    assert scores["entropy"] == pytest.approx(0.0, abs=1e-7)
    assert scores["quality"] == pytest.approx(100.0, rel=1e-6)


def test_hand_computed_4_steps_by_4_tokens() -> None:
    # The centroid is taken over the mass above the uniform level 1/4 = 0.25:
    attention = np.array([
        [0.7, 0.2, 0.1, 0.0],    # above 0.25: 0.45 at 0 -> centroid 0; peak 0, +-1 -> 0.90
        [0.1, 0.6, 0.25, 0.05],  # 0.35 at 1 -> centroid 1; peak 1 -> 0.1 + 0.6 + 0.25 = 0.95
        [0.0, 0.0, 0.95, 0.05],  # 0.70 at 2 -> centroid 2; peak 2 -> tokens 1..3 = 1.00
        [0.0, 0.5, 0.5, 0.0],    # 0.25 at 1 and 2 -> 1.5; peak 1 (first of the tie) -> 1.00
    ])
    scores = _one(attention)
    # Moves +1, +1, -0.5 tokens: forward 2, backward 0.5 -> 2 / 2.5 = 0.8.
    assert scores["monotonicity"] == pytest.approx(0.8, rel=1e-5)
    # (0.90 + 0.95 + 1.00 + 1.00) / 4 = 0.9625
    assert scores["focus"] == pytest.approx(0.9625)
    # Token peaks 0.7, 0.6, 0.95, 0.05: the last is below 0.1, so 3 of 4 tokens are read.
    assert scores["coverage"] == pytest.approx(0.75)
    # Row entropies in nats: 0.801819, 1.033114, 0.198515, ln 2 = 0.693147; their mean
    # 0.681649 over ln 4 = 1.386294 gives 0.491705.
    rows = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.25, 0.05], [0.95, 0.05], [0.5, 0.5]]
    expected = np.mean([-sum(p * math.log(p) for p in row) for row in rows]) / math.log(4)
    assert expected == pytest.approx(0.491705, abs=1e-6)
    assert scores["entropy"] == pytest.approx(expected, rel=1e-5)


def test_uniform_2x4_by_hand() -> None:
    # Every weight 0.25: entropy ln 4 / ln 4 = 1; peak is token 0 (first of the tie), so
    # focus covers tokens 0 and 1 = 0.5; 0.25 >= 0.1 reads every token; the centroid never
    # moves, so monotonicity 0; the path sits at 0.5 and spans nothing: diagonality 0.
    scores = _one(np.full((2, 4), 0.25))
    assert scores["entropy"] == pytest.approx(1.0, rel=1e-6)
    assert scores["focus"] == pytest.approx(0.5)
    assert scores["coverage"] == pytest.approx(1.0)
    assert scores["monotonicity"] == 0.0
    assert scores["diagonality"] == 0.0
    # Quality: diagonality, monotonicity and 1 - entropy hit the 1e-3 floor:
    # 100 * 1e-3 ** (0.35 + 0.2 + 0.1) * 0.5 ** 0.2
    assert scores["quality"] == pytest.approx(100 * 1e-3**0.65 * 0.5**0.2, rel=1e-5)


def test_unnormalised_rows_are_renormalised_over_valid_tokens() -> None:
    scaled = alignment_scores(np.eye(3) * 7.0, [3], [3])
    assert scaled == pytest.approx(alignment_scores(np.eye(3), [3], [3]))


def test_single_token_text_is_trivially_aligned() -> None:
    scores = alignment_scores(np.ones((5, 1)), [1], [5])
    assert scores == pytest.approx(
        {"diagonality": 1.0, "monotonicity": 1.0, "focus": 1.0, "coverage": 1.0,
         "entropy": 0.0, "quality": 100.0}
    )


def test_a_zero_row_counts_as_uniform_attention() -> None:
    attention = np.eye(4)
    attention[2] = 0.0
    fixed = attention.copy()
    fixed[2] = 0.25
    assert alignment_scores(attention, [4], [4]) == pytest.approx(
        alignment_scores(fixed, [4], [4])
    )


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("attention", "input_lengths", "output_lengths", "message"),
    [
        (np.ones(5), [5], [1], "shape"),
        (np.ones((1, 2, 3, 4)), [3], [2], "shape"),
        (np.ones((2, 0, 3)), [3, 3], [1, 1], "shape"),
        (np.ones((2, 4, 3)), [3], [4, 4], "input_lengths must have shape"),
        (np.ones((2, 4, 3)), [3, 3], [4], "output_lengths must have shape"),
        (np.ones((1, 4, 3)), [4], [4], "input_lengths must lie in"),
        (np.ones((1, 4, 3)), [3], [0], "output_lengths must lie in"),
        (np.ones((1, 4, 3)), [3], [5], "output_lengths must lie in"),
        (np.ones((1, 4, 3)), [2.5], [4], "whole numbers"),
        (np.ones((1, 4, 3)), ["3"], [4], "integers"),
        (np.full((1, 4, 3), -0.1), [3], [4], "negative"),
        (np.full((1, 4, 3), np.nan), [3], [4], "NaN or inf"),
        (np.full((1, 4, 3), np.inf), [3], [4], "NaN or inf"),
        (np.full((1, 4, 3), "x"), [3], [4], "numeric"),
    ],
)
def test_invalid_input_raises_value_error(
    attention: np.ndarray, input_lengths: list, output_lengths: list, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        alignment_scores(attention, input_lengths, output_lengths)


def test_bad_values_in_padding_are_ignored() -> None:
    attention = np.full((6, 5), np.nan)
    attention[:3, :3] = np.eye(3)
    attention[4, 1] = -1.0
    assert alignment_scores(attention, [3], [3]) == pytest.approx(alignment_scores(np.eye(3), 3, 3))


# ---------------------------------------------------------------------------- plots


def test_plot_alignment_writes_a_png(tmp_path: Path) -> None:
    attention = np.zeros((60, 30))
    attention[:50, :20] = diagonal(50, 20, np.random.default_rng(0))
    scores = alignment_scores(attention, [20], [50])
    target = tmp_path / "nested" / "dirs" / "alignment.png"
    written = plot_alignment(attention, target, title="step 100", input_length=20,
                             output_length=50, scores=scores)
    assert written == target
    assert target.read_bytes().startswith(b"\x89PNG")


def test_render_alignment_png_returns_png_bytes() -> None:
    data = render_alignment_png(torch.eye(8), title="identity", scores=_one(np.eye(8)))
    assert isinstance(data, bytes)
    assert data.startswith(b"\x89PNG")


def test_plot_rejects_a_length_beyond_the_matrix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_length"):
        plot_alignment(np.eye(4), tmp_path / "x.png", input_length=5)
