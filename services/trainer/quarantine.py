"""Which utterances a rollback leaves out: the batches of the steps it undoes that failed.

A spike or a burst of non-finite gradients that a rollback undoes often comes with its
data: a corrupt recording, a transcript that does not match its audio, an utterance far
longer than the rest. Rolled back to the same position, the feed would serve the same
batches and the run would fail the same way again. So, as PaLM's authors did by hand and
Lightning's SpikeDetection records, the trainer notes the batch of every step that failed
(non-finite, withheld by the spike guard, or applied with a pre-clip norm over the red
flag), and a rollback excludes the utterances of the failed steps it undoes from then on.

The exclusion is capped at a share of the training set (``run.skip_max_share``): a run
that fails on every batch has no bad data to skip, and skipping would only eat the corpus.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass

log = logging.getLogger("services.trainer.training.quarantine")

MAX_FAILED_BATCHES = 512  # the failed steps remembered; far more than a checkpoint interval


@dataclass(frozen=True)
class FailedBatch:
    """One step that failed, and the utterances of its batch."""

    step: int
    ids: tuple[str, ...]
    reason: str  # "non-finite", "withheld spike" or "spike"


@dataclass(frozen=True)
class Exclusion:
    """What one rollback left out: utterances newly excluded and the steps they came from."""

    ids: tuple[str, ...]
    steps: tuple[int, ...]
    reasons: tuple[str, ...]
    capped: int = 0  # utterances not excluded because the cap was reached
    enabled: bool = True  # the run skips failed batches (run.skip_failed_batches)

    def describe(self) -> str:
        """One line for the command's ack, the audit trail and the log."""
        if not self.steps:
            return "no failed step in that stretch: nothing skipped"
        if not self.enabled:
            return (f"{len(self.steps)} failed steps; their utterances are not "
                    "skipped (run.skip_failed_batches is off)")
        steps = ", ".join(map(str, self.steps[:8])) + (" ..." if len(self.steps) > 8 else "")
        reasons = ", ".join(sorted(set(self.reasons)))
        shown = ", ".join(self.ids[:6]) + (" ..." if len(self.ids) > 6 else "")
        text = (f"skipping {len(self.ids)} utterances from now on ({shown}): the batches of "
                f"the {len(self.steps)} failed steps ({reasons} at step {steps})")
        if self.capped:
            text += f"; {self.capped} more not skipped (the cap, run.skip_max_share, is reached)"
        return text


class Quarantine:
    """The failed steps' batches, and the exclusion a rollback makes of them."""

    def __init__(self, train_size: int, enabled: bool = True, max_share: float = 0.1) -> None:
        self.enabled = enabled
        self.max_share = max_share
        self.limit = int(max_share * train_size)  # utterances, over the whole run
        self.failed: deque[FailedBatch] = deque(maxlen=MAX_FAILED_BATCHES)
        self.last: Exclusion | None = None

    def note(self, step: int, ids: list[str], reason: str) -> None:
        """A step failed on the batch ``ids``."""
        self.failed.append(FailedBatch(step, tuple(ids), reason))

    def exclude_undone(self, back_to: int, excluded: set[str]) -> Exclusion:
        """Add the utterances of the failed steps from ``back_to`` on to ``excluded`` (up to
        the cap) and forget those steps: after a rollback to ``back_to``, or when the
        tuner skips the failed batches of the last steps."""
        undone = [f for f in self.failed if f.step >= back_to]
        self.failed = deque((f for f in self.failed if f.step < back_to),
                            maxlen=MAX_FAILED_BATCHES)
        # An utterance in several failed batches is the likelier culprit: it goes first
        # when the cap leaves room for only some.
        seen = Counter(u for f in undone for u in f.ids if u not in excluded)
        ranked = sorted(seen, key=lambda u: -seen[u])  # stable: first failure first
        room = max(0, self.limit - len(excluded)) if self.enabled else 0
        new, capped = ranked[:room], max(0, len(ranked) - room) if self.enabled else 0
        excluded.update(new)
        self.last = Exclusion(tuple(new), tuple(f.step for f in undone),
                              tuple(f.reason for f in undone), capped, self.enabled)
        if undone and self.enabled:
            log.warning("failed steps from step %d on: %s", max(back_to, 0),
                        self.last.describe())
        return self.last
