"""The learning-rate owner: warm-up, decay, floor and overrides."""

import pytest
import torch

from services.trainer.config import OptimConfig
from services.trainer.optim import LearningRate, make_optimizer


def _controller(**overrides):
    cfg = OptimConfig(**{"learning_rate": 1e-3, "min_learning_rate": 1e-5, "warmup_steps": 9,
                         "decay_start": 100, "decay_rate": 0.5, "decay_steps": 100,
                         **overrides})
    optimizer = make_optimizer(torch.nn.Linear(2, 2), cfg)
    return LearningRate(optimizer, cfg), optimizer


def test_default_learning_rate_is_the_plans():
    assert OptimConfig().learning_rate == 1e-4


def test_warmup_then_decay_to_floor():
    lr, optimizer = _controller()
    assert lr.value(0) == pytest.approx(1e-4)  # (0 + 1) / (9 + 1) of the base
    assert lr.value(9) == pytest.approx(1e-3)
    assert lr.value(100) == pytest.approx(1e-3)
    assert lr.value(200) == pytest.approx(5e-4)
    assert lr.value(100_000) == pytest.approx(1e-5)
    assert lr.apply(200) == pytest.approx(5e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_override_ends_warmup_and_keeps_decaying():
    lr, optimizer = _controller()
    lr.set(2e-4, 3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert lr.value(50) == pytest.approx(2e-4)
    assert lr.value(200) == pytest.approx(1e-4)
    restored, _ = _controller()
    restored.load_state_dict(lr.state_dict())
    assert restored.value(200) == pytest.approx(1e-4)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_override_rejects_nonsense(bad):
    lr, _ = _controller()
    with pytest.raises(ValueError):
        lr.set(bad, 0)
