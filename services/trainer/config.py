"""Configuration of a training run: audio features, model sizes, optimisation, presets.

Every run writes its resolved config next to its checkpoints, and a checkpoint carries
it too, so a resumed or synthesised run always sees the sizes it was trained with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class AudioConfig(_Strict):
    """Log-mel feature extraction (LJSpeech defaults, as NVIDIA/tacotron2)."""

    sample_rate: int = Field(22050, gt=0)
    n_fft: int = Field(1024, gt=0)
    hop_length: int = Field(256, gt=0)
    win_length: int = Field(1024, gt=0)
    n_mels: int = Field(80, gt=0)
    fmin: float = Field(0.0, ge=0)
    fmax: float = Field(8000.0, gt=0)
    # Leading/trailing silence below this many dB under the clip's peak is trimmed: long
    # silent edges teach the attention to wait on the first token.
    trim_top_db: float | None = Field(40.0, gt=0)
    griffin_lim_iters: int = Field(60, ge=1)
    # Sharpening of the magnitude before Griffin-Lim, as in the Tacotron paper.
    griffin_lim_power: float = Field(1.5, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AudioConfig:
        if self.win_length > self.n_fft:
            raise ValueError("win_length must not exceed n_fft")
        if self.fmax > self.sample_rate / 2:
            raise ValueError("fmax must not exceed the Nyquist frequency")
        return self


class ModelConfig(_Strict):
    """Tacotron2 sizes. ``n_symbols`` is filled from the text front-end."""

    n_symbols: int = Field(0, ge=0)
    symbols_embedding_dim: int = 512
    encoder_n_convolutions: int = 3
    encoder_embedding_dim: int = 512
    encoder_kernel_size: int = 5
    attention_rnn_dim: int = 1024
    decoder_rnn_dim: int = 1024
    attention_dim: int = 128
    attention_location_n_filters: int = 32
    attention_location_kernel_size: int = 31
    prenet_dim: int = 256
    prenet_dropout: float = Field(0.5, ge=0, lt=1)
    postnet_embedding_dim: int = 512
    postnet_kernel_size: int = 5
    postnet_n_convolutions: int = 5
    n_frames_per_step: int = Field(1, ge=1, le=8)
    p_attention_dropout: float = Field(0.1, ge=0, lt=1)
    p_decoder_dropout: float = Field(0.1, ge=0, lt=1)
    gate_threshold: float = Field(0.5, gt=0, lt=1)
    max_decoder_steps: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.encoder_embedding_dim % 2:
            raise ValueError("encoder_embedding_dim must be even (bidirectional LSTM halves)")
        if self.symbols_embedding_dim != self.encoder_embedding_dim:
            raise ValueError("symbols_embedding_dim must equal encoder_embedding_dim")
        return self


class OptimConfig(_Strict):
    """Adam, warm-up, decay, clipping and guided attention."""

    # The plan's conservative default. Presets override it only with a measured reason.
    learning_rate: float = Field(1e-4, gt=0, le=1e-1)
    min_learning_rate: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(1000, ge=0)
    decay_start: int = Field(50_000, ge=0)
    decay_rate: float = Field(0.5, gt=0, le=1)
    decay_steps: int = Field(50_000, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-6, gt=0)

    grad_clip: float = Field(1.0, gt=0)
    clip_mode: Literal["fixed", "adaptive"] = "fixed"
    # AutoClip: clip at this percentile of the recent pre-clip norms.
    adaptive_clip_percentile: float = Field(10.0, gt=0, le=100)
    adaptive_clip_history: int = Field(1000, ge=10)

    guided_attention_weight: float = Field(1.0, ge=0)
    guided_attention_sigma: float = Field(0.2, gt=0)
    guided_attention_decay_start: int = Field(10_000, ge=0)
    guided_attention_decay_rate: float = Field(0.5, gt=0, le=1)
    guided_attention_decay_steps: int = Field(10_000, gt=0)
    guided_attention_min_weight: float = Field(0.0, ge=0)

    gate_positive_weight: float = Field(5.0, gt=0)
    amp: bool = Field(False, description="fp16 autocast + GradScaler, CUDA only")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.min_learning_rate > self.learning_rate:
            raise ValueError("min_learning_rate must not exceed learning_rate")
        return self


class RunConfig(_Strict):
    """Batching, evaluation and checkpoint cadence."""

    batch_size: int = Field(16, ge=1)
    val_size: int = Field(16, ge=1, description="utterances held out as the fixed validation batch")
    eval_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(3, ge=1)
    max_steps: int = Field(100_000, ge=1)
    seed: int = 1234
    num_workers: int = Field(0, ge=0)


class TextConfig(_Strict):
    """How transcripts become symbols (services/trainer/text.py)."""

    # "auto" detects each utterance's language from its script.
    language: Literal["auto", "en", "ru"] = "auto"
    # Stress marks ("вол+ос", U+0301) become the stress symbol; "drop" removes them, for
    # corpora that mark stress only in some transcripts.
    stress: Literal["keep", "drop"] = "keep"


class TrainConfig(_Strict):
    """Everything a run needs besides its data and output folder."""

    preset: str = "custom"
    text: TextConfig = Field(default_factory=TextConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)


def _tiny() -> TrainConfig:
    return TrainConfig(
        preset="tiny",
        model=ModelConfig(
            symbols_embedding_dim=128,
            encoder_embedding_dim=128,
            attention_rnn_dim=256,
            decoder_rnn_dim=256,
            attention_dim=64,
            attention_location_n_filters=16,
            attention_location_kernel_size=15,
            prenet_dim=128,
            postnet_embedding_dim=256,
            # r=3: the decoder loop dominates CPU step time; three frames per step was the
            # fastest to a clean alignment in wall-clock terms (shared/notes/cpu-feasibility.md).
            n_frames_per_step=3,
            max_decoder_steps=400,
        ),
        optim=OptimConfig(
            # Measured on 2 CPU cores (cpu-feasibility.md and bench/alignment.py): with guided
            # attention, lr 1e-3 aligns (diagonality > 0.7) in ~100 steps, while 1e-4 had not
            # aligned after 427 steps. The plan's 1e-4 was a reaction to gradient norms that
            # were an fp16 unscaling artefact; the tuner lowers the LR if norms really misbehave.
            learning_rate=1e-3,
            min_learning_rate=1e-5,
            warmup_steps=30,
            decay_start=2_000,
            decay_steps=2_000,
            guided_attention_decay_start=1_500,
            guided_attention_decay_steps=1_500,
            guided_attention_min_weight=0.05,
        ),
        run=RunConfig(batch_size=16, val_size=16, eval_every=25, checkpoint_every=100,
                      max_steps=1_000),
    )


def _base() -> TrainConfig:
    # The paper's sizes (ModelConfig defaults) with the plan's LR; meant for a GPU.
    return TrainConfig(
        preset="base",
        model=ModelConfig(n_frames_per_step=2),
        optim=OptimConfig(amp=False),
        run=RunConfig(batch_size=32, val_size=32, eval_every=500, checkpoint_every=1000),
    )


PRESETS = {"tiny": _tiny, "base": _base}


def preset(name: str) -> TrainConfig:
    """A fresh copy of a named preset; raises ValueError naming the known presets."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
