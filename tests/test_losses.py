"""Loss values against numbers computed by hand on small tensors."""

import math

import pytest
import torch

from services.trainer.config import OptimConfig
from services.trainer.losses import (
    GuidedAttentionWeight,
    gate_loss,
    guided_attention_loss,
    guided_attention_weights,
    masked_mse,
)

# sigma = 0.5 and N = T = 2 make W[t, n] = 1 - exp(-(n - t)^2 / 2):
# W = [[0, 1 - e^-0.5], [1 - e^-0.5, 0]] with 1 - e^-0.5 = 0.3934693...
OFF = 1 - math.exp(-0.5)


def _ga(attention, n_in, n_out, sigma=0.5):
    return float(guided_attention_loss(torch.tensor(attention, dtype=torch.float32),
                                       torch.tensor(n_in), torch.tensor(n_out), sigma))


def test_guided_attention_weights_by_hand():
    w = guided_attention_weights(torch.tensor([2]), torch.tensor([2]), 2, 2, 0.5)[0]
    torch.testing.assert_close(w, torch.tensor([[0.0, OFF], [OFF, 0.0]]))


def test_guided_attention_weights_zero_outside_true_lengths():
    w = guided_attention_weights(torch.tensor([2]), torch.tensor([3]), 4, 5, 0.2)[0]
    assert w.shape == (5, 4)
    assert torch.all(w[3:] == 0) and torch.all(w[:, 2:] == 0)
    # t=1 of T=3 vs n=1 of N=2: (1/2 - 1/3)^2 / (2 * 0.04) = 0.347222 -> 1 - e^-0.347222
    assert float(w[1, 1]) == pytest.approx(1 - math.exp(-((0.5 - 1 / 3) ** 2) / 0.08), abs=1e-6)


@pytest.mark.parametrize(("attention", "expected"), [
    ([[[1.0, 0.0], [0.0, 1.0]]], 0.0),  # on the diagonal: no penalty
    ([[[0.0, 1.0], [1.0, 0.0]]], OFF),  # (OFF + OFF) summed over tokens / 2 decoder steps
    ([[[0.5, 0.5], [0.5, 0.5]]], OFF / 2),  # (0.5 OFF + 0.5 OFF) / 2
])
def test_guided_attention_loss_by_hand(attention, expected):
    assert _ga(attention, [2], [2]) == pytest.approx(expected, abs=1e-6)


def test_guided_attention_loss_ignores_padding_and_averages_items():
    clean = [[0.0, 1.0], [1.0, 0.0]]
    padded = torch.full((2, 3, 4), 7.0)  # garbage everywhere outside the valid blocks
    padded[0, :2, :2] = torch.tensor(clean)
    padded[1, :2, :2] = torch.eye(2)
    loss = guided_attention_loss(padded, torch.tensor([2, 2]), torch.tensor([2, 2]), 0.5)
    assert float(loss) == pytest.approx((OFF + 0.0) / 2, abs=1e-6)


def test_masked_mse_by_hand():
    prediction = torch.tensor([[[1.0, 2.0, 3.0]]])
    target = torch.zeros(1, 1, 3)
    # only the first two frames count: (1 + 4) / 2
    assert float(masked_mse(prediction, target, torch.tensor([2]))) == pytest.approx(2.5)


def test_gate_loss_by_hand():
    logits = torch.zeros(1, 3)
    target = torch.tensor([[0.0, 1.0, 1.0]])
    # r=1, length 2: frame 0 negative (log 2), frame 1 positive (5 log 2); mean over 2
    value = gate_loss(logits, target, torch.tensor([2]), r=1, positive_weight=5.0)
    assert float(value) == pytest.approx(3 * math.log(2), rel=1e-6)
    # r=3: the valid decoder step spans frames 0..2, so all three frames count
    value = gate_loss(logits, target, torch.tensor([2]), r=3, positive_weight=5.0)
    assert float(value) == pytest.approx((1 + 5 + 5) * math.log(2) / 3, rel=1e-6)


def test_guided_attention_weight_schedule_and_setter():
    cfg = OptimConfig(guided_attention_weight=2.0, guided_attention_decay_start=100,
                      guided_attention_decay_rate=0.5, guided_attention_decay_steps=100,
                      guided_attention_min_weight=0.1)
    schedule = GuidedAttentionWeight(cfg)
    assert schedule(0) == 2.0 and schedule(100) == 2.0
    assert schedule(200) == pytest.approx(1.0)
    assert schedule(10_000) == pytest.approx(0.1)  # floor
    schedule.set(4.0, 200)
    assert schedule(200) == pytest.approx(4.0)
    assert schedule(300) == pytest.approx(2.0)  # decay continues from the override
    restored = GuidedAttentionWeight(cfg)
    restored.load_state_dict(schedule.state_dict())
    assert restored(300) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        schedule.set(-1.0, 300)


def test_guided_attention_switched_off_stays_off_despite_a_floor():
    cfg = OptimConfig(guided_attention_weight=0.0, guided_attention_min_weight=0.05)
    schedule = GuidedAttentionWeight(cfg)
    assert schedule(0) == 0.0 and schedule(100_000) == 0.0
    schedule.set(0.5, 10)  # the tuner may switch it back on
    assert schedule(10) == 0.5
