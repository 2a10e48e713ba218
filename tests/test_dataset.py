"""Metadata parsing, the feature cache, the train/val split, collation and length bucketing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from services.trainer.audio import load_wav, trim_silence
from services.trainer.config import AudioConfig
from services.trainer.dataset import (
    PAD_ID,
    Batch,
    FeatureStore,
    LengthBucketSampler,
    MetadataError,
    TextMelCollate,
    TTSDataset,
    TTSItem,
    Utterance,
    feature_key,
    prepare_features,
    read_metadata,
    split_train_val,
)

SR = 22050
N_MELS = 80


def encode(text: str) -> list[int]:
    """A stand-in text front-end: one id per character, never PAD_ID."""
    return [ord(c) % 60 + 1 for c in text]


def write_tone(path: Path, seconds: float, sr: int, freq: float, stereo: bool = False) -> None:
    """A tone with 0.1 s of silence on each side."""
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.5 * np.sin(2 * np.pi * freq * t)
    edge = np.zeros(int(0.1 * sr))
    wav = np.concatenate([edge, tone, edge]).astype(np.float32)
    if stereo:
        wav = np.stack([wav, 0.5 * wav], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav, sr, subtype="PCM_16")


def make_corpus(root: Path, n: int = 6) -> Path:
    """An LJSpeech-like folder of ``n`` tones of varied length, rate and channel count."""
    lines = []
    for i in range(n):
        utt_id = f"LJ001-{i:04d}"
        sr = 16000 if i % 2 else SR
        write_tone(root / "wavs" / f"{utt_id}.wav", 0.2 + 0.07 * i, sr, 200 + 100 * i, i % 3 == 0)
        lines.append(f'{utt_id}|Text "{i}" here, {i}.|Text "{i}" here, number {i}.')
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_metadata(root: Path, text: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text(text, encoding="utf-8")


# --- metadata --------------------------------------------------------------------------------


def test_read_metadata_parses_two_and_three_fields(tmp_path: Path) -> None:
    write_metadata(
        tmp_path,
        'a1|He said "1 dog".|He said "one dog".\r\n'  # CRLF and quotes kept verbatim
        "a2|Two fields only\n"
        "\n"  # blank lines are ignored
        "a3|Empty third|\n",
    )
    for name in ("a1", "a2", "a3"):
        write_tone(tmp_path / "wavs" / f"{name}.wav", 0.1, SR, 300)

    utts = read_metadata(tmp_path)

    assert [u.id for u in utts] == ["a1", "a2", "a3"]
    assert utts[0].text == 'He said "1 dog".'
    assert utts[0].normalized_text == 'He said "one dog".'
    assert utts[1].normalized_text == "Two fields only"
    assert utts[2].normalized_text == "Empty third"
    assert utts[0].wav_path == tmp_path / "wavs" / "a1.wav"


def test_read_metadata_reports_every_bad_line_with_its_number(tmp_path: Path) -> None:
    write_metadata(
        tmp_path,
        "ok|fine|fine\n"
        "no separator here\n"
        "x|a|b|c\n"
        "|empty id|\n"
        "ok|duplicate|\n",
    )
    with pytest.raises(MetadataError) as err:
        read_metadata(tmp_path)
    message = str(err.value)
    assert "metadata.csv:2: expected 2 or 3" in message and "got 1" in message
    assert "metadata.csv:3: expected 2 or 3" in message and "got 4" in message
    assert "metadata.csv:4: empty id" in message
    assert "metadata.csv:5: duplicate id 'ok' (first on line 1)" in message


def test_read_metadata_reports_missing_wavs_together(tmp_path: Path) -> None:
    write_metadata(tmp_path, "".join(f"id{i}|text {i}\n" for i in range(13)))
    write_tone(tmp_path / "wavs" / "id0.wav", 0.1, SR, 300)

    with pytest.raises(MetadataError) as err:
        read_metadata(tmp_path)
    message = str(err.value)
    assert "missing wav files (12)" in message
    assert "metadata.csv:2:" in message and "id1.wav" in message
    assert "metadata.csv:11:" in message and "metadata.csv:12:" not in message  # 10 shown
    assert "and 2 more" in message


def test_read_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metadata\.csv"):
        read_metadata(tmp_path)


# --- split -----------------------------------------------------------------------------------


def _utts(n: int) -> list[Utterance]:
    return [
        Utterance(id=f"u{i:03d}", text="t", normalized_text="t", wav_path=Path(f"u{i}.wav"))
        for i in range(n)
    ]


def test_split_train_val_is_deterministic_and_partitions() -> None:
    utts = _utts(50)
    train, val = split_train_val(utts, 7, seed=3)
    assert len(val) == 7 and len(train) == 43
    assert {u.id for u in train} | {u.id for u in val} == {u.id for u in utts}
    assert not {u.id for u in train} & {u.id for u in val}
    # Same seed and ids give the same split whatever the metadata order; another seed differs.
    assert split_train_val(list(reversed(utts)), 7, seed=3) == (train, val)
    assert split_train_val(utts, 7, seed=4)[1] != val
    with pytest.raises(ValueError):
        split_train_val(utts, 50, seed=3)


# --- feature cache ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Utterance], Path]:
    root = make_corpus(tmp_path_factory.mktemp("corpus"))
    return read_metadata(root), root


@pytest.fixture(scope="module")
def store(
    corpus: tuple[list[Utterance], Path], tmp_path_factory: pytest.TempPathFactory
) -> FeatureStore:
    return prepare_features(corpus[0], AudioConfig(), tmp_path_factory.mktemp("cache"), False)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_feature_cache_is_written_once(
    corpus: tuple[list[Utterance], Path], tmp_path: Path
) -> None:
    utts, _ = corpus
    cfg = AudioConfig()
    first = prepare_features(utts, cfg, tmp_path, progress=False)
    assert first.root == tmp_path / feature_key(cfg)
    assert {f"{u.id}.npy" for u in utts} <= set(_mtimes(first.root))
    before = _mtimes(first.root)

    second = prepare_features(utts, cfg, tmp_path, progress=False)

    assert _mtimes(second.root) == before  # nothing rewritten, stats included
    for u in utts:
        np.testing.assert_array_equal(second.mel(u.id), first.mel(u.id))
    np.testing.assert_array_equal(second.mean, first.mean)


def test_changed_feature_settings_use_another_key() -> None:
    base = AudioConfig()
    assert feature_key(AudioConfig(hop_length=128)) != feature_key(base)
    assert feature_key(AudioConfig(trim_top_db=None)) != feature_key(base)
    # Synthesis-only settings do not invalidate features.
    assert feature_key(AudioConfig(griffin_lim_iters=5, griffin_lim_power=1.2)) == feature_key(base)
    assert len(feature_key(base)) <= 16


def test_features_match_trimmed_log_mel(
    corpus: tuple[list[Utterance], Path], store: FeatureStore
) -> None:
    cfg = AudioConfig()
    for u in corpus[0]:
        wav = load_wav(u.wav_path, SR)
        wav = trim_silence(wav, cfg.trim_top_db, cfg.win_length, cfg.hop_length)
        mel = store.mel(u.id)
        assert mel.dtype == np.float32 and mel.shape == (N_MELS, 1 + len(wav) // cfg.hop_length)
        assert store.n_frames(u.id) == mel.shape[1]
    with pytest.raises(KeyError, match="nope"):
        store.n_frames("nope")


def test_stats_match_numpy_and_normalize_round_trips(
    corpus: tuple[list[Utterance], Path], store: FeatureStore
) -> None:
    frames = np.concatenate([store.mel(u.id) for u in corpus[0]], axis=1).astype(np.float64)
    np.testing.assert_allclose(store.mean, frames.mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.std, frames.std(axis=1), rtol=1e-4, atol=1e-5)

    mel = store.mel(corpus[0][0].id)
    normalized = store.normalize(mel)
    np.testing.assert_allclose(store.denormalize(normalized), mel, atol=1e-4)
    as_tensor = store.normalize(torch.from_numpy(mel)[None])  # batched tensors too
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor[0].numpy(), normalized, atol=1e-5)
    all_normalized = store.normalize(frames.astype(np.float32))
    np.testing.assert_allclose(all_normalized.mean(axis=1), 0.0, atol=1e-3)


def test_stats_follow_the_utterance_set(
    corpus: tuple[list[Utterance], Path], tmp_path: Path
) -> None:
    utts, _ = corpus
    cfg = AudioConfig()
    subset = prepare_features(utts[:3], cfg, tmp_path, progress=False)
    full = prepare_features(utts, cfg, tmp_path, progress=False)
    assert not np.allclose(subset.mean, full.mean)
    again = prepare_features(utts[:3], cfg, tmp_path, progress=False)  # all cached, set differs
    np.testing.assert_allclose(again.mean, subset.mean)
    assert FeatureStore.open(tmp_path, cfg).root == full.root


# --- dataset and collation -------------------------------------------------------------------


def test_dataset_items(corpus: tuple[list[Utterance], Path], store: FeatureStore) -> None:
    utts, _ = corpus
    ds = TTSDataset(utts, store, encode)
    assert len(ds) == len(utts)
    item = ds[2]
    assert isinstance(item, TTSItem) and item.id == utts[2].id
    assert item.text.dtype == torch.long
    assert item.text.tolist() == encode(utts[2].normalized_text)
    assert item.mel.dtype == torch.float32
    np.testing.assert_allclose(item.mel.numpy(), store.normalize(store.mel(utts[2].id)))
    assert ds.mel_lengths == [store.n_frames(u.id) for u in utts]
    assert ds.text_lengths == [len(encode(u.normalized_text)) for u in utts]


def _item(utt_id: str, n_text: int, n_frames: int) -> TTSItem:
    return TTSItem(
        id=utt_id,
        text=torch.arange(1, n_text + 1, dtype=torch.long),
        mel=torch.randn(N_MELS, n_frames),
    )


def test_collate_pads_sorts_and_builds_gates() -> None:
    items = [_item("short", 3, 7), _item("long", 9, 10), _item("mid", 5, 4)]
    batch = TextMelCollate(n_frames_per_step=3)(items)

    assert batch.ids == ["long", "mid", "short"]  # text length descending
    assert batch.input_lengths.tolist() == [9, 5, 3]
    assert batch.output_lengths.tolist() == [10, 4, 7]
    assert batch.text.shape == (3, 9) and batch.text.dtype == torch.long
    assert batch.text[2].tolist() == [1, 2, 3] + [PAD_ID] * 6
    assert batch.mel.shape == (3, N_MELS, 12)  # 10 rounded up to a multiple of 3
    assert torch.equal(batch.mel[1, :, :4], items[2].mel)
    assert batch.mel[1, :, 4:].abs().sum() == 0
    assert batch.gate.shape == (3, 12) and batch.gate.dtype == torch.float32
    for row, frames in enumerate([10, 4, 7]):
        expected = [0.0] * (frames - 1) + [1.0] * (12 - frames + 1)
        assert batch.gate[row].tolist() == expected
    assert len(batch) == 3


def test_collate_r1_and_batch_to() -> None:
    batch = TextMelCollate(1)([_item("a", 4, 5), _item("b", 4, 3)])
    assert batch.mel.shape[2] == 5 and batch.ids == ["a", "b"]  # ties keep their order
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.mel.device.type == "cpu" and moved.ids == batch.ids


def test_dataloader_end_to_end(corpus: tuple[list[Utterance], Path], store: FeatureStore) -> None:
    ds = TTSDataset(corpus[0], store, encode)
    sampler = LengthBucketSampler(ds.mel_lengths, batch_size=4, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=TextMelCollate(2))
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(ds)
    assert all(b.mel.shape[2] % 2 == 0 and b.mel.shape[1] == N_MELS for b in batches)


# --- bucketing -------------------------------------------------------------------------------


def _epoch(sampler: LengthBucketSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_sampler_covers_every_index(drop_last: bool) -> None:
    lengths = np.random.default_rng(0).integers(50, 800, size=103).tolist()
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=1, drop_last=drop_last,
                                  bucket_size_multiplier=4)
    batches = _epoch(sampler, 0)
    assert len(batches) == len(sampler) == (103 // 8 if drop_last else math.ceil(103 / 8))
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert all(len(b) == 8 for b in batches) and len(flat) == 96
    else:
        assert sorted(flat) == list(range(103))


def test_bucket_sampler_groups_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 800, size=512)
    sampler = LengthBucketSampler(lengths.tolist(), batch_size=16, seed=0)
    bucketed = np.mean([np.ptp(lengths[b]) for b in _epoch(sampler, 0)])
    random = np.mean([np.ptp(lengths[b]) for b in rng.permutation(512).reshape(-1, 16)])
    assert bucketed < 0.3 * random


def test_bucket_sampler_is_deterministic_per_seed_and_epoch() -> None:
    lengths = list(range(100))
    a = LengthBucketSampler(lengths, batch_size=5, seed=7)
    b = LengthBucketSampler(lengths, batch_size=5, seed=7)
    assert _epoch(a, 3) == _epoch(b, 3)
    assert _epoch(a, 3) != _epoch(a, 4)
    assert _epoch(a, 0) != _epoch(LengthBucketSampler(lengths, batch_size=5, seed=8), 0)
    fixed = LengthBucketSampler(lengths, batch_size=5, seed=7, shuffle=False)
    assert _epoch(fixed, 0) == _epoch(fixed, 1) == [list(range(i, i + 5)) for i in range(0, 100, 5)]
