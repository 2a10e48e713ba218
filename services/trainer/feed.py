"""The batch feed: the run's data and the endless stream of training batches.

It prepares the corpus once (features cached on disk, texts encoded, the train/validation
split), holds the fixed validation batch, and serves training batches epoch after epoch
from a length-bucketing sampler. Its position (epoch, batch within it) is what a
checkpoint records and a resume or rollback restores, so the stream continues exactly
where it left off. Distributed, each rank reads its own shard of every epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.trainer import distributed
from services.trainer import text as text_frontend
from services.trainer.config import TrainConfig
from services.trainer.dataset import (
    Batch,
    LengthBucketSampler,
    TextMelCollate,
    TTSDataset,
    prepare_features,
    read_metadata,
    split_train_val,
)
from services.trainer.distributed import DistInfo
from services.trainer.probes import corpus_languages, frames_per_symbol

# A child of the trainer's logger: what was logged by the trainer before the split still is
# (a level or handler set on services.trainer.training covers it).
log = logging.getLogger("services.trainer.training.feed")


class Feed:
    """One run's data and its position in the stream of training batches."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, cache_dir: Path, dist: DistInfo,
                 progress: bool = True):
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.dist = dist
        # Where the stream stands: the next batch is batch ``batch_in_epoch`` of ``epoch``.
        self.epoch = 0
        self.batch_in_epoch = 0
        # Utterances left out of training from now on (services/trainer/quarantine.py). The
        # batches keep their places in the epoch, so positions mean the same with or
        # without them: a resume or a rollback lands where it did.
        self.excluded: set[str] = set()
        # Rank 0 fills the feature cache first; the other ranks then only read it.
        distributed.in_turns(dist, lambda: self._prepare(cache_dir, progress))

    def _prepare(self, cache_dir: Path, progress: bool) -> None:
        """Features, datasets, the sampler and the validation batch (once per process)."""
        utterances = read_metadata(self.data_dir)
        if len(utterances) <= self.cfg.run.val_size:
            raise ValueError(f"{self.data_dir}: {len(utterances)} utterances; need more than "
                             f"val_size={self.cfg.run.val_size}")
        self.store = prepare_features(utterances, self.cfg.audio, cache_dir, progress=progress)
        train, val = split_train_val(utterances, self.cfg.run.val_size, self.cfg.run.seed)
        # Each text is normalised once, by the datasets; the characters it loses are
        # collected on the way and reported together.
        unknown: Counter[str] = Counter()

        def encode(text: str) -> list[int]:
            encoded = text_frontend.text_to_sequence(text, self.cfg.text.language,
                                                     stress=self.cfg.text.stress == "keep")
            unknown.update(encoded.unknown)
            return encoded.ids

        self.train_set = TTSDataset(train, self.store, encode)
        self.collate = TextMelCollate(self.cfg.model.n_frames_per_step)
        self.sampler = LengthBucketSampler(self.train_set.mel_lengths, self.cfg.run.batch_size,
                                           self.cfg.run.seed)
        val_set = TTSDataset(val, self.store, encode)
        self.val_batch = self.collate([val_set[i] for i in range(len(val_set))])
        if unknown:
            listed = ", ".join(f"{c!r}×{n}" for c, n in unknown.most_common())
            log.warning("characters outside the symbol table were removed: %s", listed)
        # What the probes need to judge inference: the corpus's languages and speaking rate.
        self.languages = corpus_languages([u.text for u in train])
        self.frames_per_symbol = frames_per_symbol(self.train_set.mel_lengths,
                                                   self.train_set.text_lengths)

    def state_dict(self) -> dict[str, Any]:
        """The position a checkpoint keeps, and the utterances left out (the keys of the
        checkpoint format)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "excluded_utterances": sorted(self.excluded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the position ``state_dict`` saved (a checkpoint's dict; one from
        before exclusions excludes nothing)."""
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.excluded = set(state.get("excluded_utterances", ()))

    def batches(self) -> Iterator[Batch]:
        """Endless batches; resumes inside an epoch exactly where the position says.

        Distributed, each rank reads its own shard of every epoch's batches: the same
        number of batches on every rank, disjoint, together the whole epoch.
        """
        while True:
            epoch = self.epoch
            self.sampler.set_epoch(epoch)
            batches = list(self.sampler)
            if self.dist.distributed:
                batches = distributed.shard_batches(batches, self.dist.rank,
                                                    self.dist.world_size)
            # A rollback between two batches may restore another epoch (and its position):
            # then that epoch's order is rebuilt, exactly as a resume would.
            while self.epoch == epoch:
                if self.batch_in_epoch >= len(batches):
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    break
                indices = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                if self.excluded:
                    indices = [i for i in indices
                               if self.train_set.utterances[i].id not in self.excluded]
                    if not indices:
                        continue  # every utterance of it left out: the next one
                yield self.collate([self.train_set[i] for i in indices])
