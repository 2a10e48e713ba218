"""From an attention snapshot to an alignment report: pure, no Redis, no Celery.

A snapshot carries a few samples, each with its own shape and lengths. They are cropped to
their valid blocks and zero-padded into one batch, so the metrics run vectorised once per
snapshot; the metrics only look inside each sample's valid block, so padding never changes
a score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.core.schemas import (
    AlignmentReport,
    AlignmentScores,
    AttentionSample,
    AttentionSnapshot,
    MessageError,
)
from services.diagnostics.metrics import SCORE_KEYS, alignment_scores_per_sample


def stack_samples(samples: Sequence[AttentionSample]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode samples into one zero-padded batch [B, T, N] plus input and output lengths.

    Raises MessageError when a payload does not decode.
    """
    if not samples:
        raise MessageError("snapshot has no samples")
    # float16 views: the copy into the float32 batch below is the only conversion.
    blocks = [s.to_float16()[:s.output_length, :s.input_length] for s in samples]
    steps = max(block.shape[0] for block in blocks)
    tokens = max(block.shape[1] for block in blocks)
    batch = np.zeros((len(blocks), steps, tokens), dtype=np.float32)
    for index, block in enumerate(blocks):
        batch[index, :block.shape[0], :block.shape[1]] = block
    input_lengths = np.array([s.input_length for s in samples], dtype=np.int64)
    output_lengths = np.array([s.output_length for s in samples], dtype=np.int64)
    return batch, input_lengths, output_lengths


def score_samples(samples: Sequence[AttentionSample]
                  ) -> tuple[AlignmentScores, list[AlignmentScores]]:
    """Batch means and per-sample scores of a snapshot's samples.

    Raises MessageError when a payload does not decode or holds values no attention can
    (NaN, infinities, negative weights).
    """
    batch, input_lengths, output_lengths = stack_samples(samples)
    try:
        per_sample = alignment_scores_per_sample(batch, input_lengths, output_lengths)
    except ValueError as error:
        raise MessageError(f"attention not scorable: {error}") from error
    # float() first: pydantic must see plain floats, and the bounds check must see the
    # same value that is serialised.
    rows = [AlignmentScores(**{key: float(per_sample[key][i]) for key in SCORE_KEYS})
            for i in range(len(samples))]
    means = AlignmentScores(**{key: float(np.mean(per_sample[key])) for key in SCORE_KEYS})
    return means, rows


def build_report(snapshot: AttentionSnapshot, worker: str = "") -> AlignmentReport:
    """The AlignmentReport of ``snapshot`` (same run, snapshot id and step).

    Raises MessageError when the snapshot's attention cannot be scored.
    """
    means, rows = score_samples(snapshot.samples)
    return AlignmentReport(run_id=snapshot.run_id, snapshot_id=snapshot.snapshot_id,
                           step=snapshot.step, scores=means, per_sample=rows, worker=worker)
