"""Audio I/O and log-mel features, computed the way NVIDIA/tacotron2 computes them.

Features are the natural log of a Slaney mel projection of the STFT *magnitude* (not power),
clamped at 1e-5, so checkpoints and hyper-parameters from that recipe carry over. Griffin-Lim
turns a log-mel back into a waveform for listening samples when no neural vocoder is at hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from services.trainer.config import AudioConfig

# Floor of the mel magnitude before the log: NVIDIA/tacotron2's dynamic range compression.
LOG_MEL_FLOOR = 1e-5
# Griffin-Lim output is scaled to this peak so that samples are loud but never clip.
GRIFFIN_LIM_PEAK = 0.95
# Seed of Griffin-Lim's initial phase: the same mel always yields the same audio.
GRIFFIN_LIM_SEED = 0
# Fast Griffin-Lim momentum (Perraudin et al. 2013; torchaudio's and librosa's default):
# it reaches in 30-60 iterations what plain Griffin-Lim needs hundreds for.
GRIFFIN_LIM_MOMENTUM = 0.99

# Slaney's mel scale (Auditory Toolbox; librosa htk=False): linear below 1 kHz, log above.
_SLANEY_F_SP = 200.0 / 3
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP  # 15 mel
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


# ---------------------------------------------------------------------------------------------
# Waveform I/O
# ---------------------------------------------------------------------------------------------


def load_wav(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at ``sample_rate``.

    Multi-channel files are averaged to mono; a file at another rate is resampled with a
    polyphase filter. Raises ``FileNotFoundError`` or ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot read audio file {path}: {exc}") from exc
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate:
        g = math.gcd(int(file_rate), int(sample_rate))
        wav = resample_poly(wav, sample_rate // g, file_rate // g)
    # The resampling filter can overshoot a full-scale input by a little.
    return np.clip(wav, -1.0, 1.0).astype(np.float32, copy=False)


def save_wav(path: str | Path, wav: np.ndarray | torch.Tensor, sample_rate: int) -> None:
    """Write ``wav`` (float, nominally in [-1, 1]) as 16-bit PCM, creating parent folders."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    samples = np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, sample_rate, subtype="PCM_16")


def trim_silence(
    wav: np.ndarray, top_db: float, frame_length: int = 1024, hop_length: int = 256
) -> np.ndarray:
    """Cut leading and trailing frames whose RMS is more than ``top_db`` below the loudest.

    Frames are centred on multiples of ``hop_length`` (as librosa.effects.trim); one hop of
    margin is kept on each side so word onsets and releases are not clipped. An all-silent
    clip is returned unchanged rather than emptied.
    """
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"trim_silence expects a 1-D waveform, got shape {wav.shape}")
    if wav.size == 0:
        return wav
    half = frame_length // 2
    padded = np.pad(wav.astype(np.float64, copy=False), (half, half))
    if padded.size < frame_length:
        padded = np.pad(padded, (0, frame_length - padded.size))
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length]
    rms = np.sqrt(np.mean(frames**2, axis=1))
    peak = rms.max()
    if peak <= 0.0:
        return wav
    loud = np.flatnonzero(rms > peak * 10.0 ** (-top_db / 20.0))
    start = max(0, (int(loud[0]) - 1) * hop_length)
    end = min(wav.size, (int(loud[-1]) + 2) * hop_length)
    return wav[start:end]


# ---------------------------------------------------------------------------------------------
# Mel scale
# ---------------------------------------------------------------------------------------------


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel of a frequency in Hz (librosa ``hz_to_mel(htk=False)``)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_F_SP
    with np.errstate(divide="ignore"):
        log = _SLANEY_MIN_LOG_MEL + np.log(np.maximum(hz, 1e-12) / _SLANEY_MIN_LOG_HZ) / (
            _SLANEY_LOGSTEP
        )
    return np.where(hz >= _SLANEY_MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Frequency in Hz of a Slaney mel value (inverse of :func:`hz_to_mel`)."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _SLANEY_F_SP
    log = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (mel - _SLANEY_MIN_LOG_MEL))
    return np.where(mel >= _SLANEY_MIN_LOG_MEL, log, linear)


def mel_band_edges(n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """The ``n_mels + 2`` frequencies (Hz) equally spaced in mel: filter ``i`` rises from
    edge ``i``, peaks at edge ``i + 1`` (its centre) and falls to zero at edge ``i + 2``."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (float32).

    Same as librosa's default ``filters.mel(htk=False, norm="slaney")``: Slaney mel spacing and
    each triangle scaled by ``2 / bandwidth`` so every filter has unit area in Hz, which keeps
    the wide high bands from dominating the spectrum's energy.
    """
    if not 0.0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got {fmin=}, {fmax=}")
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_band_edges(n_mels, fmin, fmax)
    widths = np.diff(edges)
    # ramps[j, k] = edge j - bin k; each filter is the min of its rising and falling slopes.
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Log-mel and its inverse
# ---------------------------------------------------------------------------------------------


def _as_float_tensor(wav: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    return wav.to(device=device, dtype=torch.float32)


class MelSpectrogram(torch.nn.Module):
    """Log-mel extractor: ``log(clamp(mel_basis @ |STFT(wav)|, min=1e-5))``.

    The STFT uses a Hann window of ``win_length`` and centred frames with reflect padding, so a
    waveform of ``L`` samples gives ``1 + L // hop_length`` frames. Being a module, it follows
    ``.to(device)``.
    """

    mel_basis: torch.Tensor
    window: torch.Tensor

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        basis = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        self.register_buffer("mel_basis", torch.from_numpy(basis), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.win_length), persistent=False)

    def n_frames(self, n_samples: int) -> int:
        """Number of frames produced for a waveform of ``n_samples`` samples."""
        return 1 + n_samples // self.cfg.hop_length

    def magnitude(self, wav: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Linear STFT magnitude ``[..., n_fft // 2 + 1, frames]``."""
        x = _as_float_tensor(wav, self.window.device)
        # Reflect padding needs more samples than the pad; a shorter clip is zero-padded.
        pad_mode = "reflect" if x.shape[-1] > self.cfg.n_fft // 2 else "constant"
        spec = torch.stft(
            x,
            n_fft=self.cfg.n_fft,
            hop_length=self.cfg.hop_length,
            win_length=self.cfg.win_length,
            window=self.window,
            center=True,
            pad_mode=pad_mode,
            return_complex=True,
        )
        return spec.abs()

    def forward(self, wav: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Log-mel ``[n_mels, frames]`` of a 1-D waveform (``[B, n_mels, frames]`` for
        ``[B, samples]``)."""
        mel = torch.matmul(self.mel_basis, self.magnitude(wav))
        return torch.log(torch.clamp(mel, min=LOG_MEL_FLOOR))


def griffin_lim(
    log_mel: torch.Tensor | np.ndarray,
    cfg: AudioConfig,
    momentum: float = GRIFFIN_LIM_MOMENTUM,
) -> np.ndarray:
    """Waveform (float32, peak 0.95) from a log-mel ``[n_mels, frames]``.

    The mel is mapped back to a linear magnitude with the filterbank's pseudo-inverse, sharpened
    by ``cfg.griffin_lim_power`` and given a phase by ``cfg.griffin_lim_iters`` iterations of
    (fast) Griffin-Lim from a seeded random phase; ``momentum=0`` is the classic algorithm.
    Output length is ``(frames - 1) * hop_length``.
    """
    if isinstance(log_mel, torch.Tensor):
        log_mel_t = log_mel.detach().to(torch.float32)
    else:
        log_mel_t = _as_float_tensor(log_mel, torch.device("cpu"))
    if log_mel_t.dim() != 2 or log_mel_t.shape[0] != cfg.n_mels:
        raise ValueError(f"expected a log-mel [{cfg.n_mels}, frames], got {tuple(log_mel_t.shape)}")
    # A model that stops almost at once (early in training) gives a handful of frames,
    # fewer than the STFT's reflect padding needs: pad with silence, trim afterwards.
    wanted_length = (log_mel_t.shape[1] - 1) * cfg.hop_length
    min_frames = cfg.n_fft // cfg.hop_length + 2
    if log_mel_t.shape[1] < min_frames:
        silence = (log_mel_t.min() if log_mel_t.numel()
                   else torch.tensor(math.log(LOG_MEL_FLOOR)))
        log_mel_t = torch.cat([log_mel_t, silence.expand(
            cfg.n_mels, min_frames - log_mel_t.shape[1])], dim=1)
    device = log_mel_t.device
    basis = torch.from_numpy(
        mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    ).to(device)
    magnitude = torch.clamp(torch.linalg.pinv(basis) @ torch.exp(log_mel_t), min=0.0)
    magnitude = magnitude**cfg.griffin_lim_power

    window = torch.hann_window(cfg.win_length, device=device)
    n_frames = magnitude.shape[1]
    length = (n_frames - 1) * cfg.hop_length
    stft_args = {
        "n_fft": cfg.n_fft,
        "hop_length": cfg.hop_length,
        "win_length": cfg.win_length,
        "window": window,
        "center": True,
    }

    generator = torch.Generator().manual_seed(GRIFFIN_LIM_SEED)
    phase = torch.rand(magnitude.shape, generator=generator).to(device) * (2 * math.pi)
    angles = torch.polar(torch.ones_like(magnitude), phase)
    previous = torch.zeros_like(angles)
    for _ in range(cfg.griffin_lim_iters):
        wav = torch.istft(magnitude * angles, length=length, **stft_args)
        rebuilt = torch.stft(wav, pad_mode="reflect", return_complex=True, **stft_args)
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        angles = accelerated / accelerated.abs().clamp(min=1e-16)
        previous = rebuilt
    wav = torch.istft(magnitude * angles, length=length, **stft_args)

    out = wav[:wanted_length].cpu().numpy().astype(np.float32)
    peak = float(np.abs(out).max()) if out.size else 0.0
    if peak > 0.0:
        out *= GRIFFIN_LIM_PEAK / peak
    return out
