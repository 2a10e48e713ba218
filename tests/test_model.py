"""Tacotron2 shapes, masking, and the prenet's always-on dropout."""

import pytest
import torch

from services.trainer.config import preset
from services.trainer.model import Tacotron2, length_mask

N_MELS = 80


def _model(r: int = 3, dropout: bool = False) -> Tacotron2:
    cfg = preset("tiny").model
    cfg.n_symbols = 40
    cfg.n_frames_per_step = r
    if not dropout:
        cfg.prenet_dropout = 0.0
    torch.manual_seed(0)
    return Tacotron2(cfg, N_MELS)


def test_length_mask():
    mask = length_mask(torch.tensor([1, 3]), 4)
    assert mask.tolist() == [[True, False, False, False], [True, True, True, False]]


@pytest.mark.parametrize("r", [1, 2, 3])
def test_teacher_forced_shapes(r):
    model = _model(r)
    text = torch.randint(2, 40, (2, 7))
    frames = 4 * r
    out = model(text, torch.tensor([7, 5]), torch.randn(2, N_MELS, frames),
                torch.tensor([frames, frames - 2]))
    assert out.mel.shape == out.mel_postnet.shape == (2, N_MELS, frames)
    assert out.gate.shape == (2, frames)
    assert out.alignments.shape == (2, 4, 7)
    # attention rows are distributions over the valid tokens only
    torch.testing.assert_close(out.alignments.sum(-1), torch.ones(2, 4))
    assert torch.all(out.alignments[1, :, 5:] == 0)
    # padded frames are zeroed
    assert torch.all(out.mel_postnet[1, :, frames - 2:] == 0)


def test_mel_length_must_be_a_multiple_of_r():
    model = _model(3)
    with pytest.raises(ValueError, match="multiple of r"):
        model(torch.randint(2, 40, (1, 5)), torch.tensor([5]), torch.randn(1, N_MELS, 10),
              torch.tensor([10]))


def test_padding_never_changes_an_items_output():
    model = _model(2).eval()
    torch.manual_seed(1)
    short_text, short_mel = torch.randint(2, 40, (1, 6)), torch.randn(1, N_MELS, 8)
    alone = model(short_text, torch.tensor([6]), short_mel, torch.tensor([8]))
    text = torch.zeros(2, 11, dtype=torch.long)
    text[0] = torch.randint(2, 40, (11,))
    text[1, :6] = short_text[0]
    mels = torch.zeros(2, N_MELS, 14)
    mels[0] = torch.randn(N_MELS, 14)
    mels[1, :, :8] = short_mel[0]
    batched = model(text, torch.tensor([11, 6]), mels, torch.tensor([14, 8]))
    torch.testing.assert_close(batched.mel_postnet[1, :, :8], alone.mel_postnet[0])
    torch.testing.assert_close(batched.alignments[1, :4, :6], alone.alignments[0])
    torch.testing.assert_close(batched.gate[1, :8], alone.gate[0])


def test_prenet_dropout_stays_on_at_inference():
    model = _model(2, dropout=True).eval()
    with torch.no_grad():
        model.decoder.gate.bias.fill_(-20.0)  # keep decoding so later frames see the prenet
    text = torch.randint(2, 40, (1, 6))
    torch.manual_seed(1)
    first = model.infer(text, max_decoder_steps=5)
    torch.manual_seed(2)
    second = model.infer(text, max_decoder_steps=5)
    assert not torch.allclose(first.mel, second.mel)


def test_inference_with_a_generator_leaves_the_global_stream_alone():
    """The probes synthesise in a thread beside training: their dropout masks must come from
    their own generator, or the training steps' masks depend on when a probe pass ran."""
    model = _model(2, dropout=True).eval()
    with torch.no_grad():
        model.decoder.gate.bias.fill_(-20.0)
    text = torch.randint(2, 40, (1, 6))
    torch.manual_seed(5)
    expected = torch.rand(3)  # what training would draw next
    torch.manual_seed(5)
    first = model.infer(text, max_decoder_steps=5,
                        generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.rand(3), expected)
    again = model.infer(text, max_decoder_steps=5, generator=torch.Generator().manual_seed(9))
    other = model.infer(text, max_decoder_steps=5, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(first.mel, again.mel, rtol=0, atol=0)
    assert not torch.allclose(first.mel, other.mel)


def test_inference_stops_at_the_gate_or_the_step_limit():
    model = _model(2).eval()
    with torch.no_grad():
        model.decoder.gate.bias.fill_(-20.0)  # never stop
    out = model.infer(torch.randint(2, 40, (1, 6)), max_decoder_steps=7)
    assert out.mel.shape == (1, N_MELS, 14) and int(out.output_lengths[0]) == 14
    with torch.no_grad():
        model.decoder.gate.bias.fill_(20.0)  # stop at once
    out = model.infer(torch.randint(2, 40, (1, 6)), max_decoder_steps=7)
    assert int(out.output_lengths[0]) == 1 and out.alignments.shape[1] == 1
