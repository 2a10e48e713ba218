"""Inference probes: unseen sentences spoken free-running, judged on stopping and alignment."""

from __future__ import annotations

import json
import math

import pytest
import torch

from services.core import indicators
from services.trainer.checkpoints import load_checkpoint
from services.trainer.config import TrainConfig
from services.trainer.probes import (
    PROBES,
    STOP_RATIO_MAX,
    ProbeRunner,
    corpus_languages,
    frames_per_symbol,
    judge,
    probes_for,
    run_probes,
    summarize,
)
from services.trainer.synthesis import Synthesizer
from services.trainer.text import text_to_sequence
from services.trainer.training import CHECKPOINT_DIR, METRICS_FILE, PROBES_FILE, Trainer

SCORES = {"diagonality": 0.8, "quality": 85.0}


def test_the_probe_set_covers_what_breaks_inference() -> None:
    for language in ("en", "ru"):
        probes = probes_for([language])
        kinds = {p.kind for p in probes}
        assert {"long sentence", "repeated words", "numbers and dates", "question",
                "list"} <= kinds
        long = next(p for p in probes if p.kind == "long sentence")
        assert len(long.text.split()) >= 30
        assert all(p.language == language for p in probes)
        # Every probe is spoken as written: nothing falls outside the symbol table.
        assert all(not text_to_sequence(p.text, language).unknown for p in probes)
    assert len({p.id for p in PROBES}) == len(PROBES)


def test_corpus_languages_and_speaking_rate() -> None:
    assert corpus_languages(["Hello.", "Привет."]) == ["en", "ru"]
    assert corpus_languages(["Привет."]) == ["ru"]
    assert frames_per_symbol([100, 300, 50], [10, 20, 10]) == 10.0
    with pytest.raises(ValueError):
        frames_per_symbol([], [])


@pytest.mark.parametrize(("stopped", "frames", "ok"), [
    (True, 100, True),     # stopped at the expected length
    (True, 51, True),      # just above half
    (True, 40, False),     # stopped far too early
    (True, 210, False),    # stopped, but said it in more than twice the time
    (False, 150, False),   # the gate never fired: cut
])
def test_judge_needs_a_stop_at_a_sane_length(stopped: bool, frames: int, ok: bool) -> None:
    result = judge(PROBES[0], stopped, frames, 100.0, SCORES)
    assert result.ok is ok
    assert result.length_ratio == pytest.approx(frames / 100)


def test_summary_and_the_inference_indicator() -> None:
    passing = [judge(p, True, 100, 100.0, SCORES) for p in PROBES[:9]]
    failing = [judge(PROBES[9], False, 300, 100.0, {"diagonality": 0.2, "quality": 10.0})]
    summary = summarize(passing + failing, step=100, seconds=1.0)
    assert summary.stop_share == pytest.approx(0.9)
    assert summary.median_diagonality == pytest.approx(0.8)
    checks = {c.name: c for c in summary.indicators()}
    assert checks[indicators.PROBES_STOP].met  # 90 % >= 90 %
    assert checks[indicators.INFERENCE_DIAGONALITY].met
    worse = summarize(passing[:8] + failing * 2, step=200, seconds=1.0)
    assert not {c.name: c for c in worse.indicators()}[indicators.PROBES_STOP].met
    assert worse.score < summary.score
    pending = indicators.evaluate_inference(math.nan, math.nan)
    assert not any(c.met for c in pending)


def _trainer(cfg: TrainConfig, corpus, run_dir) -> Trainer:
    return Trainer(cfg, corpus, run_dir, cache_dir=corpus / ".features", progress=False)


def test_an_untrained_model_does_not_stop_and_is_cut_early(small_corpus, small_config,
                                                          tmp_path, one_thread) -> None:
    trainer = _trainer(small_config, small_corpus, tmp_path / "run")
    synthesizer = Synthesizer.from_model(trainer.model, small_config, trainer.store.mean,
                                         trainer.store.std, step=0)
    probes = probes_for(["ru"])
    stream = torch.get_rng_state()
    summary = run_probes(synthesizer, probes, trainer.frames_per_symbol, step=0)
    # The probes run beside training: they neither reseed nor consume its random stream.
    assert torch.equal(torch.get_rng_state(), stream)
    assert summary.n == len(probes)
    for result in summary.results:
        # Untrained, it either never stops or stops at once: neither is speaking.
        assert not result.ok
        # The free run was cut a little past the longest acceptable length.
        assert result.length_ratio <= STOP_RATIO_MAX * 1.1 + 0.05
    assert summary.stop_share == 0.0


def test_the_runner_probes_a_snapshot_while_the_model_changes(small_corpus, small_config,
                                                             tmp_path, one_thread) -> None:
    trainer = _trainer(small_config, small_corpus, tmp_path / "run")
    runner = ProbeRunner(small_config, trainer.store.mean, trainer.store.std,
                         probes_for(["en"])[-2:], trainer.frames_per_symbol)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    runner.submit(trainer.model, step=5)
    with torch.no_grad():  # training moves on meanwhile: the snapshot must not see it
        for parameter in trainer.model.parameters():
            parameter.add_(1.0)
    finished = runner.wait(timeout=120)
    runner.close()
    assert [s.step for s in finished] == [5]
    reference = Synthesizer.from_model(trainer.model, small_config, trainer.store.mean,
                                       trainer.store.std, step=5)
    reference.model.load_state_dict(before)
    again = run_probes(reference, probes_for(["en"])[-2:], trainer.frames_per_symbol, 5)
    assert [r.frames for r in again.results] == [r.frames for r in finished[0].results]


@pytest.mark.slow
def test_training_probes_every_checkpoint_and_ranks_them(small_corpus, small_config,
                                                         tmp_path, one_thread) -> None:
    cfg = small_config
    cfg.probes.enabled = True
    cfg.probes.background = False  # deterministic: each pass is in before the next step
    cfg.probes.wer = False
    run = tmp_path / "run"
    summary = _trainer(cfg, small_corpus, run).train(max_steps=10)

    passes = [json.loads(line) for line in (run / PROBES_FILE).read_text().splitlines()]
    assert [p["step"] for p in passes] == [5, 10]
    assert all(len(p["results"]) == 12 for p in passes)  # the corpus speaks en and ru
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "probes"] == [5, 10]
    names = [c["name"] for c in summary["indicators"]]
    assert names[-2:] == [indicators.PROBES_STOP, indicators.INFERENCE_DIAGONALITY]
    assert summary["probes"]["step"] == 10
    assert not summary["all_indicators_met"]  # an untrained model does not speak

    manifest = json.loads((run / CHECKPOINT_DIR / "checkpoints.json").read_text())
    scores = {e["step"]: e["probe_score"] for e in manifest["checkpoints"]}
    assert set(scores) >= {5, 10} and all(v is not None for v in scores.values())
    best_step = max(scores, key=lambda s: (scores[s], s))
    assert load_checkpoint(run, best=True).info.step == best_step
    assert Synthesizer(run, best=True).step == best_step


def test_probes_off_keeps_the_plans_five_and_best_says_why(small_corpus, small_config,
                                                           tmp_path, one_thread) -> None:
    small_config.probes.enabled = False
    run = tmp_path / "run"
    summary = _trainer(small_config, small_corpus, run).train(max_steps=5)
    assert len(summary["indicators"]) == 5 and summary["probes"] is None
    assert not (run / PROBES_FILE).exists()
    with pytest.raises(FileNotFoundError, match="probe scores"):
        load_checkpoint(run, best=True)


@pytest.mark.slow
def test_once_it_spoke_a_checkpoint_that_no_longer_does_is_no_rollback_target(
        small_corpus, small_config, tmp_path, one_thread) -> None:
    cfg = small_config
    cfg.probes.enabled = True
    cfg.probes.background = False
    cfg.probes.wer = False
    run = tmp_path / "run"
    trainer = _trainer(cfg, small_corpus, run)
    trainer.train(max_steps=5)
    assert trainer.checkpoints.entries()[-1].healthy  # untrained, but never spoke: fine
    # Pretend the step-5 pass spoke, as a trained model's would; the next one does not.
    trainer.run_state.spoke_once = True
    trainer.train(max_steps=10)
    by_step = {e.step: e for e in trainer.checkpoints.entries()}
    assert not by_step[10].healthy and by_step[10].probe_score is not None
    assert trainer.checkpoints.last_good().info.step == 5
    resumed = Trainer(cfg, small_corpus, run, cache_dir=small_corpus / ".features",
                      progress=False, resume=True, resume_from="best")
    best = max(trainer.checkpoints.entries(), key=lambda e: (e.probe_score, e.step))
    assert resumed.step == best.step


@pytest.mark.slow
def test_probe_passes_reach_the_bus_and_prometheus(small_corpus, small_config, tmp_path,
                                                   redis_url, run_id, one_thread) -> None:
    """Real Redis and a real metrics endpoint: a probes event per pass, the newest in the
    run store (what the API and the bot read), and the gauges the alert rule reads."""
    import httpx
    import redis

    from services.core.runstore import RunStore
    from services.trainer.exporter import serve_metrics
    from services.trainer.link import attach

    cfg = small_config
    cfg.probes.enabled = True
    cfg.probes.background = False
    cfg.probes.wer = False
    trainer = Trainer(cfg, small_corpus, tmp_path / "run", progress=False, run_id=run_id,
                      cache_dir=small_corpus / ".features")
    link = attach(trainer, redis_url, enqueue_scoring=False)
    _, server, _ = serve_metrics(trainer, 0, addr="127.0.0.1")
    try:
        trainer.train(max_steps=10)
        assert link.close()
        text = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).text
    finally:
        server.shutdown()
    store = RunStore(redis.Redis.from_url(redis_url))
    latest = store.latest_probes(run_id)
    assert latest is not None and latest.checkpoint_step == 10 and latest.n == 12
    assert latest.stop_percent == 100 * trainer.last_probes.stop_share
    assert len(latest.failures) == sum(not r.ok for r in trainer.last_probes.results)
    assert f'smart_tuner_trainer_probes_checkpoint_step{{run="{run_id}"}} 10.0' in text
    assert f'smart_tuner_trainer_probes_stop_ratio{{run="{run_id}"}}' in text
