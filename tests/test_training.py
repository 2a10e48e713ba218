"""The training loop end to end on a small real corpus: it learns, resumes exactly, survives."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from services.trainer.config import TrainConfig
from services.trainer.training import METRICS_FILE, SUMMARY_FILE, Trainer

pytestmark = pytest.mark.slow


def _trainer(cfg: TrainConfig, corpus: Path, run_dir: Path, **kwargs) -> Trainer:
    return Trainer(cfg, corpus, run_dir, cache_dir=corpus / ".features", progress=False,
                   **kwargs)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_short_training_lowers_the_loss(small_corpus, small_config, tmp_path):
    small_config.run.eval_every = 10
    small_config.run.checkpoint_every = 20
    trainer = _trainer(small_config, small_corpus, tmp_path / "run")
    summary = trainer.train(max_steps=60)
    steps = _records(tmp_path / "run", "step")
    assert len(steps) == 60 and all(s["finite"] for s in steps)
    train_start = sum(s["objective"] for s in steps[:5]) / 5
    train_end = sum(s["objective"] for s in steps[-5:]) / 5
    assert train_end < 0.85 * train_start, (train_start, train_end)
    # BatchNorm running statistics make the very first evaluations noisy; compare the
    # validation loss after 10 steps with the one after 60.
    evals = {e["step"]: e["objective"] for e in _records(tmp_path / "run", "eval")}
    assert evals[60] < evals[10], evals
    assert summary["validation"]["objective"] == evals[60]
    # the verdict names all five indicators, and the files a person looks at exist
    assert [i["name"] for i in summary["indicators"]] == [
        "grad norm (pre-clip)", "diagonality", "restarts", "loss", "quality %"]
    assert json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())["step"] == 60
    plots = sorted((tmp_path / "run" / "plots").glob("alignment-*.png"))
    assert plots and plots[-1].read_bytes().startswith(b"\x89PNG")
    assert [e.step for e in trainer.checkpoints.entries()] == [20, 40, 60]
    # the logged grad norm is the pre-clip one: it may exceed the threshold of 1.0
    assert all(s["clip_threshold"] == 1.0 for s in steps)
    assert max(s["grad_norm"] for s in steps) > 1.0


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(small_corpus, small_config, tmp_path, one_thread):
    straight = _trainer(small_config.model_copy(deep=True), small_corpus, tmp_path / "a")
    straight.train(max_steps=8)
    first = _trainer(small_config.model_copy(deep=True), small_corpus, tmp_path / "b")
    first.train(max_steps=5)
    first.set_lr(5e-4, source="test")  # an applied override must survive the resume
    first.save_checkpoint()
    del first
    resumed = _trainer(small_config.model_copy(deep=True), small_corpus, tmp_path / "b",
                       resume=True)
    assert resumed.step == 5 and resumed.overrides[-1]["after"] == 5e-4
    assert resumed.run_state.restarts == 0  # the first process exited cleanly
    resumed.lr.load_state_dict({"override": None})  # compare the schedules on equal terms
    resumed.train(max_steps=8)
    a, b = _weights(straight.model), _weights(resumed.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_a_crash_counts_as_a_restart_and_resume_skips_a_corrupt_checkpoint(
        small_corpus, small_config, tmp_path, caplog):
    run = tmp_path / "run"
    trainer = _trainer(small_config, small_corpus, run)
    trainer.train(max_steps=10)  # checkpoints at 5 and 10
    # simulate a crash: the process never reached its clean exit
    state = json.loads((run / "run_state.json").read_text())
    (run / "run_state.json").write_text(json.dumps(state | {"clean_exit": False}))
    newest = run / "checkpoints" / "ckpt-00000010.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        resumed = _trainer(small_config, small_corpus, run, resume=True)
    assert resumed.step == 5
    assert "ckpt-00000010.pt" in caplog.text and "truncated" in caplog.text
    assert resumed.run_state.restarts == 1 and resumed.run_state.consecutive_restarts == 1
    assert not resumed.verdict().indicators[2].met  # "no restarts" is no longer true


def test_non_finite_gradients_skip_the_step_and_keep_weights_finite(
        small_corpus, small_config, tmp_path):
    trainer = _trainer(small_config, small_corpus, tmp_path / "run")
    batches = trainer._batches()
    trainer.train_step(next(batches))
    before = _weights(trainer.model)
    poison = trainer.model.decoder.projection.weight.register_hook(
        lambda grad: torch.full_like(grad, float("nan")))
    metrics = trainer.train_step(next(batches))
    poison.remove()
    assert not metrics.finite and math.isnan(metrics.grad_norm)
    assert metrics.skipped_steps == 1 and trainer.skipped_steps == 1
    after = _weights(trainer.model)
    for name in before:
        torch.testing.assert_close(before[name], after[name], rtol=0, atol=0, msg=name)
    healthy = trainer.train_step(next(batches))
    assert healthy.finite and math.isfinite(healthy.grad_norm)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # a checkpoint taken with a skipped step in its window is not a rollback target
    assert trainer.save_checkpoint().healthy is False


def test_non_finite_loss_is_skipped_before_backward(small_corpus, small_config, tmp_path,
                                                    monkeypatch):
    trainer = _trainer(small_config, small_corpus, tmp_path / "run")
    forward = trainer.engine.forward

    def nan_loss(batch, step):
        output, terms = forward(batch, step)
        terms.total = terms.total * float("nan")
        return output, terms

    monkeypatch.setattr(trainer.engine, "forward", nan_loss)
    metrics = trainer.train_step(next(trainer._batches()))
    assert not metrics.finite and trainer.skipped_steps == 1
    assert all(p.grad is None for p in trainer.model.parameters())


def test_setters_record_overrides_and_rollback_restores_last_good(
        small_corpus, small_config, tmp_path):
    trainer = _trainer(small_config, small_corpus, tmp_path / "run")
    trainer.train(max_steps=5)  # healthy checkpoint at step 5
    good = _weights(trainer.model)
    assert trainer.checkpoints.entries()[-1].healthy
    trainer.set_lr(2e-4, source="test")
    trainer.set_guided_attention_weight(3.0, source="test")
    trainer.set_grad_clip(2.0, source="test")
    batches = trainer._batches()
    metrics = trainer.train_step(next(batches))
    assert metrics.lr == pytest.approx(2e-4)
    assert metrics.guided_attention_weight == pytest.approx(3.0)
    assert metrics.clip_threshold == 2.0
    info = trainer.rollback(source="test")
    assert info is not None and info.step == 5 and trainer.step == 5
    # the corrective settings outlive the rollback
    after_rollback = trainer.train_step(next(batches))
    assert after_rollback.lr == pytest.approx(2e-4) and after_rollback.clip_threshold == 2.0
    trainer.rollback(source="test")
    for name, value in _weights(trainer.model).items():
        torch.testing.assert_close(value, good[name], rtol=0, atol=0, msg=name)
    kinds = [o["kind"] for o in trainer.overrides]
    assert kinds == ["set_lr", "set_guided_attention_weight", "set_grad_clip", "rollback",
                     "rollback"]
    assert trainer.overrides[0]["before"] == pytest.approx(1e-3)
    assert trainer.overrides[-1]["before"] == 6.0 and trainer.overrides[-1]["after"] == 5.0


def test_rollback_across_an_epoch_takes_the_restored_epochs_order(small_corpus, small_config,
                                                                   tmp_path):
    """The live batch stream after a rollback to an earlier epoch serves exactly the batches
    a fresh resume from that checkpoint would."""
    small_config.run.checkpoint_every = 1000  # only the explicit checkpoint below
    trainer = _trainer(small_config, small_corpus, tmp_path / "run")
    batches = trainer._batches()
    next(batches)
    saved = (trainer.epoch, trainer.batch_in_epoch)
    while trainer.epoch < saved[0] + 2:  # two epoch boundaries later
        next(batches)
    trainer.epoch, trainer.batch_in_epoch = saved  # what rollback restores with the weights
    resumed = next(batches)
    fresh = _trainer(small_config, small_corpus, tmp_path / "fresh")
    fresh.epoch, fresh.batch_in_epoch = saved
    expected = next(fresh._batches())
    assert torch.equal(resumed.text, expected.text)
    assert (trainer.epoch, trainer.batch_in_epoch) == (saved[0], saved[1] + 1)
