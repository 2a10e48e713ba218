"""Gradient norms are measured before clipping and after unscaling; bad steps are caught."""

import math

import pytest
import torch

from services.trainer.config import OptimConfig
from services.trainer.gradients import GradientClipper, global_grad_norm


def _model_with_grads(scale: float = 1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    (model(x).pow(2).sum() * scale).backward()
    return model


def test_norm_is_reported_before_clipping():
    model = _model_with_grads()
    true_norm = global_grad_norm(model.parameters())
    assert true_norm > 1.0  # otherwise the test proves nothing
    optimizer = torch.optim.Adam(model.parameters())
    result = GradientClipper(OptimConfig(grad_clip=1.0)).clip(model, optimizer)
    assert result.norm == pytest.approx(true_norm, rel=1e-5)
    assert result.clipped and result.threshold == 1.0
    assert global_grad_norm(model.parameters()) == pytest.approx(1.0, rel=1e-4)


def test_norm_is_measured_after_unscaling_with_a_grad_scaler():
    reference = global_grad_norm(_model_with_grads().parameters())
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    loss = model(torch.randn(8, 4)).pow(2).sum()
    scaler.scale(loss).backward()
    scaled = global_grad_norm(model.parameters())
    assert scaled == pytest.approx(reference * 65536.0, rel=1e-4)  # the old system's "400k+"
    result = GradientClipper(OptimConfig(grad_clip=1e9)).clip(model, optimizer, scaler)
    assert result.norm == pytest.approx(reference, rel=1e-4)


def test_non_finite_gradients_are_flagged_not_recorded():
    model = _model_with_grads()
    model.weight.grad[0, 0] = float("nan")
    clipper = GradientClipper(OptimConfig())
    result = clipper.clip(model, torch.optim.Adam(model.parameters()))
    assert not result.finite and math.isnan(result.norm)
    assert len(clipper.history) == 0


def test_adaptive_threshold_is_a_percentile_of_recent_norms():
    clipper = GradientClipper(OptimConfig(clip_mode="adaptive", adaptive_clip_percentile=50,
                                          grad_clip=1.0))
    assert clipper.current_threshold() == 1.0  # too little history: the fixed threshold
    clipper.history.extend(float(x) for x in range(1, 12))  # 1..11, median 6
    assert clipper.current_threshold() == pytest.approx(6.0)
    restored = GradientClipper(OptimConfig(clip_mode="adaptive", adaptive_clip_percentile=50))
    restored.load_state_dict(clipper.state_dict())
    assert restored.current_threshold() == pytest.approx(6.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_threshold_setter_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        GradientClipper(OptimConfig()).set_threshold(bad)
