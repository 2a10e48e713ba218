"""LJSpeech-style metadata, a cached log-mel feature store, batching and length bucketing.

Features are computed once per audio configuration and kept under a folder named by a hash of
that configuration, so changing e.g. ``hop_length`` can never silently reuse stale features.
Mels reach the model normalised per mel band (mean 0, std 1 over the corpus).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset
from tqdm import tqdm

from services.trainer.audio import MelSpectrogram, load_wav, trim_silence
from services.trainer.config import AudioConfig
from services.trainer.text import PAD_ID

METADATA_FILE = "metadata.csv"
WAVS_DIR = "wavs"
FIELD_SEPARATOR = "|"
# At most this many problems are listed in one error; the rest are counted.
MAX_REPORTED_ERRORS = 10

# Bump when the feature computation changes without a config change, to invalidate caches.
FEATURE_VERSION = 1
# Settings that only affect synthesis, not features: changing them must not rebuild the cache.
_NON_FEATURE_FIELDS = frozenset({"griffin_lim_iters", "griffin_lim_power"})
CACHE_KEY_CHARS = 12
# float16 halves the cache; its quantisation step (< 0.008 nats on log-mels in [-11.5, 8])
# is a < 1% amplitude error, far below what the model reproduces.
CACHE_DTYPE = np.float16
LENGTHS_FILE = "lengths.json"
STATS_FILE = "stats.npz"
CONFIG_FILE = "audio_config.json"
# Floor of a band's std so a constant band (e.g. above a low-pass) does not divide by zero.
MIN_STD = 1e-5

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


class MetadataError(ValueError):
    """``metadata.csv`` is malformed or refers to missing audio."""


class Utterance(BaseModel):
    """One clip: its id, raw text, normalised text (numbers etc. spelled out) and audio file."""

    model_config = ConfigDict(frozen=True)

    id: str
    text: str
    normalized_text: str
    wav_path: Path


def _report(header: str, problems: list[str]) -> str:
    shown = "\n".join(f"  {p}" for p in problems[:MAX_REPORTED_ERRORS])
    more = len(problems) - MAX_REPORTED_ERRORS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{header} ({len(problems)}):\n{shown}{tail}"


def read_metadata(data_dir: str | Path, require_audio: bool = True) -> list[Utterance]:
    """Parse ``data_dir/metadata.csv`` (``id|text|normalized_text`` per line, utf-8).

    The third field may be absent or empty, in which case ``text`` is used. Fields are split on
    ``|`` literally: LJSpeech texts contain quotes, so CSV quoting rules would corrupt them.
    Audio is expected at ``data_dir/wavs/<id>.wav``. Raises ``FileNotFoundError`` when the file
    is missing and ``MetadataError`` listing every bad line (field count, empty id or text,
    duplicate id) or else every missing wav, each with its line number (``require_audio=False``
    returns utterances whose wav is missing too: the data check reports them itself).
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"metadata file not found: {meta_path}")
    # utf-8-sig drops a BOM; splitting on "\n" only (not str.splitlines) because splitlines
    # also breaks on rare Unicode separators that may legitimately occur inside a text.
    lines = meta_path.read_text(encoding="utf-8-sig").split("\n")

    utterances: list[Utterance] = []
    line_of: dict[str, int] = {}
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split(FIELD_SEPARATOR)
        where = f"{meta_path}:{number}"
        if len(fields) not in (2, 3):
            problems.append(f"{where}: expected 2 or 3 '|'-separated fields, got {len(fields)}")
            continue
        utt_id, text = fields[0].strip(), fields[1].strip()
        normalized = fields[2].strip() if len(fields) == 3 else ""
        if not utt_id:
            problems.append(f"{where}: empty id")
            continue
        if "/" in utt_id or "\\" in utt_id or utt_id.startswith("."):
            problems.append(f"{where}: id {utt_id!r} is not a plain file name")
            continue
        if utt_id in line_of:
            problems.append(f"{where}: duplicate id {utt_id!r} (first on line {line_of[utt_id]})")
            continue
        if not text:
            problems.append(f"{where}: empty text for id {utt_id!r}")
            continue
        line_of[utt_id] = number
        utterances.append(
            Utterance(
                id=utt_id,
                text=text,
                normalized_text=normalized or text,
                wav_path=data_dir / WAVS_DIR / f"{utt_id}.wav",
            )
        )
    if problems:
        raise MetadataError(_report(f"bad lines in {meta_path}", problems))
    if not utterances:
        raise MetadataError(f"no utterances in {meta_path}")

    missing = [
        f"{meta_path}:{line_of[u.id]}: {u.wav_path}" for u in utterances if not u.wav_path.is_file()
    ]
    if missing and require_audio:
        raise MetadataError(_report("missing wav files", missing))
    return utterances


def split_train_val(
    utterances: Sequence[Utterance], val_size: int, seed: int
) -> tuple[list[Utterance], list[Utterance]]:
    """Hold out ``val_size`` random utterances; returns ``(train, val)``, each sorted by id.

    The draw depends only on ``seed`` and the set of ids, not on the metadata's line order.
    """
    if not 0 <= val_size < len(utterances):
        raise ValueError(
            f"val_size must be in [0, {len(utterances)}) to leave training data, got {val_size}"
        )
    ordered = sorted(utterances, key=lambda u: u.id)
    order = np.random.default_rng(seed).permutation(len(ordered))
    val_idx = set(order[:val_size].tolist())
    train = [u for i, u in enumerate(ordered) if i not in val_idx]
    val = [u for i, u in enumerate(ordered) if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------------


def feature_key(audio_cfg: AudioConfig) -> str:
    """Short hash naming the cache folder of features computed with ``audio_cfg``."""
    settings = audio_cfg.model_dump(mode="json", exclude=set(_NON_FEATURE_FIELDS))
    payload = json.dumps({"version": FEATURE_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:CACHE_KEY_CHARS]


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    # An interrupted run must never leave a truncated file that a later run takes as cached.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    _write_atomic(path, write)


def _save_json(path: Path, obj: object) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def compute_features(
    utterance: Utterance, audio_cfg: AudioConfig, mel: MelSpectrogram
) -> np.ndarray:
    """Log-mel ``[n_mels, frames]`` (float32) of one utterance: load, trim, extract."""
    wav = load_wav(utterance.wav_path, audio_cfg.sample_rate)
    if audio_cfg.trim_top_db is not None:
        wav = trim_silence(
            wav, audio_cfg.trim_top_db, frame_length=audio_cfg.win_length,
            hop_length=audio_cfg.hop_length,
        )
    with torch.no_grad():
        return mel(wav).numpy()


class FeatureStore:
    """Cached raw log-mels of one audio configuration, their lengths and per-band statistics.

    ``root`` is ``cache_dir/<feature_key>``. ``mel`` loads a cached ``[n_mels, frames]`` array;
    ``normalize``/``denormalize`` apply the per-band mean/std to numpy arrays or tensors shaped
    ``[n_mels, T]`` or ``[B, n_mels, T]``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        lengths_path = self.root / LENGTHS_FILE
        stats_path = self.root / STATS_FILE
        if not lengths_path.is_file() or not stats_path.is_file():
            raise FileNotFoundError(f"no prepared features in {self.root}; run prepare_features")
        self._lengths: dict[str, int] = json.loads(lengths_path.read_text())
        with np.load(stats_path) as stats:
            self.mean: np.ndarray = stats["mean"].astype(np.float32)
            self.std: np.ndarray = stats["std"].astype(np.float32)

    @classmethod
    def open(cls, cache_dir: str | Path, audio_cfg: AudioConfig) -> FeatureStore:
        """The store prepared earlier for ``audio_cfg`` under ``cache_dir``."""
        return cls(Path(cache_dir) / feature_key(audio_cfg))

    @property
    def ids(self) -> list[str]:
        """Ids of every cached utterance."""
        return sorted(self._lengths)

    def path(self, utt_id: str) -> Path:
        """File of one utterance's cached log-mel."""
        return self.root / f"{utt_id}.npy"

    def mel(self, utt_id: str) -> np.ndarray:
        """Raw (un-normalised) log-mel ``[n_mels, frames]`` as float32."""
        if utt_id not in self._lengths:
            raise KeyError(f"utterance {utt_id!r} is not in the feature cache {self.root}")
        return np.load(self.path(utt_id)).astype(np.float32)

    def n_frames(self, utt_id: str) -> int:
        """Frame count of one utterance, from the lengths index (no file read)."""
        try:
            return self._lengths[utt_id]
        except KeyError:
            raise KeyError(
                f"utterance {utt_id!r} is not in the feature cache {self.root}"
            ) from None

    def normalize(self, mel: ArrayT) -> ArrayT:
        """``(mel - mean) / std`` per mel band."""
        mean, std = self._stats_like(mel)
        return (mel - mean) / std

    def denormalize(self, mel: ArrayT) -> ArrayT:
        """``mel * std + mean`` per mel band: back to raw log-mel."""
        mean, std = self._stats_like(mel)
        return mel * std + mean

    def _stats_like(self, mel: ArrayT) -> tuple[ArrayT, ArrayT]:
        # Shaped [n_mels, 1] so they broadcast over frames and over a leading batch axis.
        if isinstance(mel, torch.Tensor):
            kw = {"device": mel.device, "dtype": mel.dtype}
            return (torch.as_tensor(self.mean, **kw)[:, None],
                    torch.as_tensor(self.std, **kw)[:, None])
        return self.mean[:, None].astype(mel.dtype), self.std[:, None].astype(mel.dtype)


def _cached_frames(path: Path) -> int | None:
    try:
        return int(np.load(path, mmap_mode="r").shape[1])
    except (OSError, ValueError, IndexError):
        return None  # unreadable or truncated: recompute it


def prepare_features(
    utterances: Sequence[Utterance],
    audio_cfg: AudioConfig,
    cache_dir: str | Path,
    progress: bool = True,
) -> FeatureStore:
    """Compute (or reuse) log-mels of ``utterances`` under ``cache_dir/<feature_key>``.

    Writes ``<id>.npy`` per utterance, a ``lengths.json`` index and ``stats.npz`` with the
    per-band mean/std over every frame of ``utterances``; stats are recomputed when a feature
    was new or the set of utterances changed. Single process: extraction is a few ms per clip
    and the trainer shares the machine's few cores.
    """
    if not utterances:
        raise ValueError("prepare_features needs at least one utterance")
    root = Path(cache_dir) / feature_key(audio_cfg)
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        _save_json(config_path, audio_cfg.model_dump(mode="json"))
    lengths_path = root / LENGTHS_FILE
    lengths: dict[str, int] = (
        json.loads(lengths_path.read_text()) if lengths_path.is_file() else {}
    )

    mel = MelSpectrogram(audio_cfg)
    new = 0
    for utt in tqdm(utterances, desc="features", unit="utt", disable=not progress):
        path = root / f"{utt.id}.npy"
        if path.is_file():
            if utt.id in lengths:
                continue
            frames = _cached_frames(path)
            if frames is not None:  # a file whose index entry was lost
                lengths[utt.id] = frames
                new += 1
                continue
        features = compute_features(utt, audio_cfg, mel)
        _save_npy(path, features.astype(CACHE_DTYPE))
        lengths[utt.id] = int(features.shape[1])
        new += 1
    if new:
        _save_json(lengths_path, lengths)

    ids = [u.id for u in utterances]
    stats_path = root / STATS_FILE
    digest = _ids_digest(ids)
    stale = new > 0 or not stats_path.is_file()
    if not stale:
        with np.load(stats_path) as stats:
            stale = str(stats["ids_digest"]) != digest
    if stale:
        mean, std = _band_stats(root, ids, audio_cfg.n_mels)

        def write_stats(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, mean=mean, std=std, ids_digest=digest)

        _write_atomic(stats_path, write_stats)
    return FeatureStore(root)


def _band_stats(root: Path, ids: Sequence[str], n_mels: int) -> tuple[np.ndarray, np.ndarray]:
    # Sums in float64 over the stored (float16) values, so normalisation matches what loads.
    total = np.zeros(n_mels)
    total_sq = np.zeros(n_mels)
    count = 0
    for utt_id in ids:
        m = np.load(root / f"{utt_id}.npy").astype(np.float64)
        total += m.sum(axis=1)
        total_sq += (m * m).sum(axis=1)
        count += m.shape[1]
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    return mean.astype(np.float32), np.maximum(np.sqrt(var), MIN_STD).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Dataset, collation, sampling
# ---------------------------------------------------------------------------------------------


class TTSItem(NamedTuple):
    """One dataset item: utterance id, text ids ``[N]`` (long), normalised mel ``[n_mels, T]``."""

    id: str
    text: torch.Tensor
    mel: torch.Tensor


class TTSDataset(Dataset[TTSItem]):
    """Text ids and normalised log-mels of ``utterances`` from a prepared ``FeatureStore``.

    ``encode_text`` maps a normalised text to symbol ids (``PAD_ID`` must not be a real
    symbol's id); texts are encoded once here, which also gives their lengths.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        store: FeatureStore,
        encode_text: Callable[[str], Sequence[int]],
    ) -> None:
        self.utterances = list(utterances)
        self.store = store
        self._texts: list[torch.Tensor] = []
        for utt in self.utterances:
            ids = torch.as_tensor(list(encode_text(utt.normalized_text)), dtype=torch.long)
            if ids.numel() == 0:
                raise ValueError(f"utterance {utt.id!r} encodes to no symbols: {utt.text!r}")
            self._texts.append(ids)
        # Fails now, naming the utterance, rather than mid-epoch.
        self._frames = [store.n_frames(u.id) for u in self.utterances]

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> TTSItem:
        utt = self.utterances[index]
        mel = torch.from_numpy(self.store.normalize(self.store.mel(utt.id)))
        return TTSItem(id=utt.id, text=self._texts[index], mel=mel)

    @property
    def text_lengths(self) -> list[int]:
        """Encoded text length of each item."""
        return [t.numel() for t in self._texts]

    @property
    def mel_lengths(self) -> list[int]:
        """Mel frame count of each item (what ``LengthBucketSampler`` should bucket on)."""
        return list(self._frames)


@dataclass
class Batch:
    """A padded batch, sorted by text length descending (for ``pack_padded_sequence``).

    ``text`` [B, N] long padded with ``PAD_ID``; ``mel`` [B, n_mels, T] padded with 0 where
    ``T`` is a multiple of ``n_frames_per_step``; ``gate`` [B, T] is 1 from each item's last
    frame onward; ``input_lengths``/``output_lengths`` [B] long; ``ids`` in batch order.
    """

    text: torch.Tensor
    input_lengths: torch.Tensor
    mel: torch.Tensor
    gate: torch.Tensor
    output_lengths: torch.Tensor
    ids: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return Batch(
            text=self.text.to(device, non_blocking=non_blocking),
            input_lengths=self.input_lengths.to(device, non_blocking=non_blocking),
            mel=self.mel.to(device, non_blocking=non_blocking),
            gate=self.gate.to(device, non_blocking=non_blocking),
            output_lengths=self.output_lengths.to(device, non_blocking=non_blocking),
            ids=list(self.ids),
        )

    def __len__(self) -> int:
        return len(self.ids)


class TextMelCollate:
    """Collate ``TTSItem``s into a ``Batch`` (NVIDIA/tacotron2's ``TextMelCollate``)."""

    def __init__(self, n_frames_per_step: int) -> None:
        if n_frames_per_step < 1:
            raise ValueError(f"n_frames_per_step must be >= 1, got {n_frames_per_step}")
        self.n_frames_per_step = n_frames_per_step

    def __call__(self, items: Sequence[TTSItem]) -> Batch:
        """Pad, sort by text length descending and build gate targets."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        # Stable sort: equal-length texts keep their sampler order.
        order = sorted(range(len(items)), key=lambda i: -items[i].text.numel())
        items = [items[i] for i in order]
        batch_size = len(items)

        input_lengths = torch.tensor([it.text.numel() for it in items], dtype=torch.long)
        text = torch.full((batch_size, int(input_lengths[0])), PAD_ID, dtype=torch.long)
        output_lengths = torch.tensor([it.mel.shape[1] for it in items], dtype=torch.long)
        r = self.n_frames_per_step
        max_frames = int(output_lengths.max())
        max_frames = math.ceil(max_frames / r) * r
        n_mels = items[0].mel.shape[0]
        mel = torch.zeros(batch_size, n_mels, max_frames)
        gate = torch.zeros(batch_size, max_frames)
        for i, it in enumerate(items):
            text[i, : it.text.numel()] = it.text
            frames = it.mel.shape[1]
            mel[i, :, :frames] = it.mel
            # The stop token fires on the last real frame and stays on through the padding.
            gate[i, frames - 1 :] = 1.0
        return Batch(
            text=text,
            input_lengths=input_lengths,
            mel=mel,
            gate=gate,
            output_lengths=output_lengths,
            ids=[it.id for it in items],
        )


class LengthBucketSampler:
    """Batch sampler grouping items of similar length, to waste little compute on padding.

    Each epoch the indices are shuffled, cut into pools of ``batch_size * bucket_size_multiplier``,
    sorted by length within each pool and cut into batches, and the batches are shuffled. The
    order depends only on ``(seed, epoch)``; call ``set_epoch`` before each epoch. Only the last
    batch of an epoch can be short (dropped with ``drop_last``). Pass mel frame counts as
    ``lengths``: the decoder's time steps dominate a step's cost.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        bucket_size_multiplier: int = 8,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_size_multiplier < 1:
            raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.bucket_size_multiplier = bucket_size_multiplier
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pool_size = self.batch_size * self.bucket_size_multiplier
        batches: list[list[int]] = []
        for start in range(0, n, pool_size):
            pool = order[start : start + pool_size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches.extend(
                pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)
            )
        # Pools are whole multiples of batch_size except the last, so only the final batch
        # can be short; drop it before shuffling so drop_last really drops the short one.
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        yield from batches
