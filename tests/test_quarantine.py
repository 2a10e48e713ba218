"""A rollback leaves out the utterances of the failed steps it undoes.

The pure rule (services/trainer/quarantine.py) and a real (small) training run with a fault
tied to the data (``replay=1``): without skipping, the rolled-back run fails again on the
same utterances; with it, it trains on cleanly, and the checkpoint keeps the exclusion.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer.config import TrainConfig
from services.trainer.faults import FaultInjector, FaultPlan
from services.trainer.quarantine import Quarantine
from services.trainer.training import Trainer


def test_a_rollback_excludes_the_undone_failed_batches_most_recurrent_first() -> None:
    quarantine = Quarantine(train_size=40, max_share=0.1)  # room for 4 utterances
    quarantine.note(3, ["a", "b"], "non-finite")  # before the checkpoint: not undone
    quarantine.note(11, ["c", "d", "e"], "non-finite")
    quarantine.note(12, ["e", "f"], "withheld spike")
    quarantine.note(13, ["e", "d", "g"], "spike")
    excluded: set[str] = {"z"}
    exclusion = quarantine.exclude_undone(10, excluded)
    # e failed three times, d twice: they go first; the cap leaves room for 3 more (z is one)
    assert exclusion.ids == ("e", "d", "c") and exclusion.capped == 2
    assert excluded == {"z", "e", "d", "c"}
    assert exclusion.steps == (11, 12, 13)
    assert "skipping 3 utterances" in exclusion.describe()
    assert "withheld spike" in exclusion.describe() and "cap" in exclusion.describe()
    # the undone steps are forgotten; the one before the checkpoint stays
    assert [f.step for f in quarantine.failed] == [3]
    assert quarantine.exclude_undone(10, excluded).ids == ()


def test_switched_off_it_excludes_nothing_and_says_so() -> None:
    quarantine = Quarantine(train_size=100, enabled=False)
    quarantine.note(5, ["a"], "non-finite")
    excluded: set[str] = set()
    exclusion = quarantine.exclude_undone(0, excluded)
    assert excluded == set() and exclusion.ids == ()
    assert "not skipped" in exclusion.describe()


def test_a_replayed_fault_follows_its_utterances() -> None:
    injector = FaultInjector(FaultPlan.parse("nan_grad:start=2,steps=1,replay=1"))
    assert not injector.fires(0, ["a", "b"]) and not injector.fires(1, ["c"])
    assert injector.fires(2, ["d", "e"])  # the schedule's one firing poisons d and e
    assert not injector.fires(3, ["f"])  # the schedule is spent
    assert injector.fires(40, ["x", "e"])  # e comes back: it faults again
    with pytest.raises(ValueError, match="replay"):
        FaultPlan.parse("crash:start=2,replay=1")
    with pytest.raises(ValueError, match="every"):
        FaultPlan.parse("nan_grad:start=2,every=5,replay=1")


def _bad_data_run(cfg: TrainConfig, corpus: Path, run_dir: Path) -> tuple[Trainer, int]:
    """Train past a data-bound NaN fault, roll back, train 8 more steps; returns the
    trainer and the non-finite steps after the rollback."""
    cfg.run.checkpoint_every = 3  # a healthy checkpoint at step 3, before the fault
    cfg.run.skip_max_share = 1.0  # 10 training utterances: room for all of them
    trainer = Trainer(cfg, corpus, run_dir, cache_dir=corpus / ".features", progress=False,
                      fault=FaultPlan.parse("nan_grad:start=3,steps=1,replay=1"))
    trainer.train(max_steps=8)
    assert trainer.skipped_steps >= 2  # the schedule's firing and a replay at least
    info = trainer.rollback(source="test")
    assert info is not None and info.step == 3
    before = trainer.skipped_steps
    batches = trainer._batches()
    for _ in range(8):
        trainer.train_step(next(batches))
    return trainer, trainer.skipped_steps - before


def test_without_skipping_the_same_utterances_fail_again(small_corpus, small_config,
                                                         tmp_path) -> None:
    small_config.run.skip_failed_batches = False
    trainer, failed_again = _bad_data_run(small_config, small_corpus, tmp_path / "run")
    assert trainer.feed.excluded == set()
    assert failed_again > 0


def test_with_skipping_the_run_trains_on_cleanly_and_remembers(small_corpus, small_config,
                                                               tmp_path) -> None:
    trainer, failed_again = _bad_data_run(small_config, small_corpus, tmp_path / "run")
    poisoned = trainer.engine.fault.poisoned
    assert poisoned and poisoned <= trainer.feed.excluded
    assert failed_again == 0
    kinds = [o["kind"] for o in trainer.overrides]
    assert kinds[-2:] == ["rollback", "skip_utterances"]
    assert trainer.quarantine.last is not None
    assert trainer.quarantine.last.ids and "skipping" in trainer.quarantine.last.describe()
    # a checkpoint keeps the exclusion, and a resume serves none of those utterances
    trainer.save_checkpoint()
    resumed = Trainer(small_config, small_corpus, tmp_path / "run", resume=True,
                      cache_dir=small_corpus / ".features", progress=False)
    assert resumed.feed.excluded == trainer.feed.excluded
    batches = resumed._batches()
    served = {u for _ in range(6) for u in next(batches).ids}
    assert served and not served & resumed.feed.excluded


def test_skipping_without_a_rollback_keeps_the_progress(small_corpus, small_config,
                                                        tmp_path) -> None:
    """The tuner's first answer to non-finite steps: the weights never took a non-finite
    update, so only the data is left out; the step does not move back."""
    small_config.run.skip_max_share = 1.0
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", progress=False,
                      cache_dir=small_corpus / ".features",
                      fault=FaultPlan.parse("nan_grad:start=2,steps=1,replay=1"))
    batches = trainer._batches()
    for _ in range(6):
        trainer.train_step(next(batches))
    assert trainer.skipped_steps >= 1
    exclusion = trainer.skip_failed_batches(50, source="test")
    assert trainer.step == 6  # no rollback
    assert trainer.engine.fault.poisoned <= set(exclusion.ids) == trainer.feed.excluded
    before = trainer.skipped_steps
    for _ in range(8):
        trainer.train_step(next(batches))
    assert trainer.skipped_steps == before
    assert trainer.overrides[-1]["kind"] == "skip_utterances"
    assert trainer.skip_failed_batches(50, source="test").ids == ()  # nothing failed since
