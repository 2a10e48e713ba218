"""Audio I/O, silence trimming, the Slaney mel filterbank, log-mels and Griffin-Lim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from services.trainer.audio import (
    LOG_MEL_FLOOR,
    MelSpectrogram,
    griffin_lim,
    hz_to_mel,
    load_wav,
    mel_band_edges,
    mel_filterbank,
    mel_to_hz,
    save_wav,
    trim_silence,
)
from services.trainer.config import AudioConfig

SR = 22050


def sine(freq: float, seconds: float, sr: int = SR, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spectrum) * sr / len(wav))


# --- I/O -------------------------------------------------------------------------------------


def test_load_wav_resamples_and_downmixes_stereo(tmp_path: Path) -> None:
    tone = sine(440, 1.0, sr=16000)
    stereo = np.stack([tone, np.zeros_like(tone)], axis=1)
    path = tmp_path / "stereo16k.wav"
    sf.write(path, stereo, 16000, subtype="PCM_16")

    wav = load_wav(path, SR)

    assert wav.dtype == np.float32 and wav.ndim == 1
    assert len(wav) == SR  # one second at the target rate
    assert np.abs(wav).max() <= 1.0
    # Averaging a tone with a silent channel halves its amplitude; the pitch is kept.
    assert np.abs(wav[1000:-1000]).max() == pytest.approx(0.25, abs=0.01)
    assert dominant_frequency(wav, SR) == pytest.approx(440, rel=0.01)


def test_load_wav_same_rate_is_untouched(tmp_path: Path) -> None:
    tone = sine(440, 0.25)
    path = tmp_path / "a.wav"
    sf.write(path, tone, SR, subtype="FLOAT")
    np.testing.assert_array_equal(load_wav(path, SR), tone)


def test_load_wav_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.wav"):
        load_wav(tmp_path / "nope.wav", SR)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a RIFF file at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.wav"):
        load_wav(garbage, SR)


def test_save_wav_writes_clipped_pcm16_in_new_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "out.wav"
    wav = np.array([0.0, 0.5, 2.0, -3.0], dtype=np.float32)
    save_wav(path, torch.from_numpy(wav), SR)

    info = sf.info(path)
    assert info.subtype == "PCM_16" and info.samplerate == SR and info.channels == 1
    back, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(back, [0.0, 0.5, 1.0, -1.0], atol=1e-4)


# --- trimming --------------------------------------------------------------------------------


def test_trim_silence_removes_edges_and_keeps_the_tone() -> None:
    rng = np.random.default_rng(0)
    silence = int(0.5 * SR)
    tone = sine(300, 1.0)
    wav = np.concatenate([np.zeros(silence), tone, np.zeros(silence)]).astype(np.float32)
    wav += rng.normal(0, 1e-4, wav.shape).astype(np.float32)  # -70 dB hiss, well under 40 dB
    frame, hop = 1024, 256

    trimmed = trim_silence(wav, top_db=40, frame_length=frame, hop_length=hop)

    # The tone survives whole; at most half a frame plus two hops of silence stays per side.
    assert len(tone) <= len(trimmed) <= len(tone) + 2 * (frame // 2 + 2 * hop)
    start = int(np.flatnonzero(np.isin(wav, trimmed[:1]))[0])
    assert start <= silence <= start + len(trimmed) - len(tone)
    assert np.sum(trimmed**2) == pytest.approx(np.sum(wav**2), rel=1e-3)


def test_trim_silence_leaves_all_silent_and_untrimmable_clips() -> None:
    zeros = np.zeros(5000, dtype=np.float32)
    assert len(trim_silence(zeros, top_db=40)) == 5000
    tone = sine(300, 0.3)
    np.testing.assert_array_equal(trim_silence(tone, top_db=40), tone)


# --- mel filterbank --------------------------------------------------------------------------


def test_slaney_mel_scale_facts() -> None:
    # Linear 200/3 Hz per mel below 1 kHz (so 1 kHz is 15 mel), log-spaced above.
    assert hz_to_mel(200.0) == pytest.approx(3.0)
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(6400.0) == pytest.approx(15.0 + 27.0)  # 27 mels per factor 6.4
    freqs = np.array([0.0, 123.0, 999.0, 1000.0, 4321.0, 11025.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs)), freqs, atol=1e-9)


def test_mel_filterbank_shape_sign_and_order() -> None:
    fb = mel_filterbank(SR, 1024, 80, 0.0, 8000.0)
    assert fb.shape == (80, 513) and fb.dtype == np.float32
    assert (fb >= 0).all()
    assert (fb.max(axis=1) > 0).all()  # no empty filter at this resolution
    peaks = fb.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > peaks[0]
    # Nothing above fmax.
    bin_hz = np.linspace(0, SR / 2, 513)
    assert fb[:, bin_hz > 8000.0].sum() == 0.0


def test_mel_filterbank_peaks_and_unit_area() -> None:
    sr, n_fft = 16000, 8192  # fine bins so triangles are resolved
    fb = mel_filterbank(sr, n_fft, 40, 100.0, 7000.0)
    edges = mel_band_edges(40, 100.0, 7000.0)
    bin_hz = np.linspace(0, sr / 2, n_fft // 2 + 1)
    # Each filter peaks at its centre frequency (within one bin) with height 2 / bandwidth ...
    np.testing.assert_allclose(bin_hz[fb.argmax(axis=1)], edges[1:-1], atol=sr / n_fft)
    np.testing.assert_allclose(fb.max(axis=1), 2 / (edges[2:] - edges[:-2]), rtol=0.02)
    # ... so, Slaney-normalised, every triangle has unit area in Hz.
    np.testing.assert_allclose(fb.sum(axis=1) * (sr / n_fft), 1.0, rtol=0.02)
    # And nothing below fmin.
    assert fb[:, bin_hz < 100.0].sum() == 0.0


def test_mel_filterbank_rejects_bad_range() -> None:
    with pytest.raises(ValueError):
        mel_filterbank(SR, 1024, 80, 9000.0, 8000.0)
    with pytest.raises(ValueError):
        mel_filterbank(16000, 1024, 80, 0.0, 9000.0)


# --- log-mel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [1, 300, 511, 513, 1024, 5000, 22050])
def test_mel_frame_count(n_samples: int) -> None:
    cfg = AudioConfig()
    mel = MelSpectrogram(cfg)(np.zeros(n_samples, dtype=np.float32))
    assert mel.shape == (cfg.n_mels, 1 + n_samples // cfg.hop_length)
    assert MelSpectrogram(cfg).n_frames(n_samples) == mel.shape[1]
    # Silence sits at the floor.
    assert torch.allclose(mel, torch.full_like(mel, float(np.log(LOG_MEL_FLOOR))))


def test_mel_of_1khz_sine_peaks_in_the_band_nearest_1khz() -> None:
    cfg = AudioConfig()
    mel = MelSpectrogram(cfg)(torch.from_numpy(sine(1000, 0.5)))
    centres = mel_band_edges(cfg.n_mels, cfg.fmin, cfg.fmax)[1:-1]
    assert int(mel.mean(dim=1).argmax()) == int(np.argmin(np.abs(centres - 1000)))


def test_mel_is_log_of_magnitude_not_power() -> None:
    # An independent numpy computation of one interior frame.
    cfg = AudioConfig()
    wav = sine(523, 0.3) + sine(2500, 0.3, amplitude=0.2)
    mel = MelSpectrogram(cfg)(wav).numpy()

    frame = 20
    start = frame * cfg.hop_length - cfg.n_fft // 2  # centred frames
    window = np.hanning(cfg.win_length + 1)[:-1]  # periodic Hann
    magnitude = np.abs(np.fft.rfft(wav[start : start + cfg.n_fft] * window))
    fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    expected = np.log(np.maximum(fb @ magnitude, LOG_MEL_FLOOR))
    # float32 round-off only shows in the near-silent bands (log of ~1e-5).
    np.testing.assert_allclose(mel[:, frame], expected, atol=5e-3)


def test_mel_batch_and_numpy_agree() -> None:
    cfg = AudioConfig()
    wav = sine(700, 0.2)
    extractor = MelSpectrogram(cfg)
    single = extractor(wav)
    batch = extractor(torch.from_numpy(np.stack([wav, wav])))
    assert batch.shape == (2, *single.shape)
    assert torch.allclose(batch[1], single, atol=1e-5)


# --- Griffin-Lim -----------------------------------------------------------------------------


def test_griffin_lim_recovers_the_pitch_deterministically() -> None:
    cfg = AudioConfig(griffin_lim_iters=30)
    log_mel = MelSpectrogram(cfg)(sine(440, 0.6))

    audio = griffin_lim(log_mel, cfg)

    assert audio.dtype == np.float32
    assert len(audio) == (log_mel.shape[1] - 1) * cfg.hop_length
    assert np.abs(audio).max() == pytest.approx(0.95, abs=1e-4)
    assert dominant_frequency(audio, cfg.sample_rate) == pytest.approx(440, rel=0.03)
    np.testing.assert_array_equal(audio, griffin_lim(log_mel.numpy(), cfg))


def test_griffin_lim_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="80"):
        griffin_lim(torch.zeros(40, 10), AudioConfig())
