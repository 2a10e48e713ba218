"""The one verdict: computed by the trainer, published with every evaluation, kept in the summary.

A real Redis carries the verdict messages, as it does for every other surface that shows
them (the tuner, the API, the bot); what they read must be what the trainer decided.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from services.core import indicators
from services.core.indicators import Verdict
from services.core.schemas import VerdictMessage, decode
from services.core.streams import Stream, stream_key
from services.trainer.config import TrainConfig
from services.trainer.link import attach
from services.trainer.training import EvalResult, Trainer, TrainingObserver

pytestmark = pytest.mark.slow


class _Evaluations(TrainingObserver):
    """The steps the trainer evaluated at."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        self.steps.append(result.step)


def _train(cfg: TrainConfig, corpus: Path, run_dir: Path, redis_url: str, run_id: str,
           max_steps: int) -> tuple[Trainer, dict, list[int], list[Verdict]]:
    trainer = Trainer(cfg, corpus, run_dir, cache_dir=corpus / ".features", progress=False,
                      run_id=run_id)
    evaluations = _Evaluations()
    trainer.observers.append(evaluations)
    link = attach(trainer, redis_url, enqueue_scoring=False)
    assert link is not None
    try:
        summary = trainer.train(max_steps=max_steps)
    finally:
        assert link.close()
    entries = redis.Redis.from_url(redis_url).xrange(stream_key(run_id, Stream.VERDICT))
    published = [decode(fields, VerdictMessage) for _, fields in entries]
    assert all(message.run_id == run_id for message in published)
    return trainer, summary, evaluations.steps, [message.verdict for message in published]


def test_every_evaluation_publishes_the_verdict_the_summary_keeps(
        small_corpus, small_config, tmp_path, redis_url, run_id):
    small_config.run.eval_every = 2
    small_config.run.checkpoint_every = 4
    trainer, summary, evaluated, published = _train(small_config, small_corpus,
                                                    tmp_path / "run", redis_url, run_id, 6)
    # one verdict per evaluation, in order, each judged at its evaluation's step
    assert evaluated == [2, 4, 6]
    assert [verdict.step for verdict in published] == evaluated
    # the last one published is the trainer's and the summary's
    final = trainer.verdict()
    assert published[-1] == final == Verdict.model_validate(summary["verdict"])
    # the summary's older keys are the same verdict
    assert summary["indicators"] == [check.model_dump() for check in final.indicators]
    assert summary["all_indicators_met"] == final.all_met
    assert (summary["indicators_first_met"] or {}).get("step") == final.first_met_step
    # every indicator says how it was measured, at the step it was judged
    measured = {check.name: check.measured for check in final.indicators}
    assert measured[indicators.GRAD_NORM] == \
        "largest pre-clip grad norm of the last 2 finite steps to step 6"
    assert measured[indicators.LOSS] == "validation loss mel+postnet+gate at step 6"
    assert measured[indicators.DIAGONALITY] == "diagonality of the validation batch at step 6"
    assert measured[indicators.RESTARTS].startswith("restarts of this run")
    assert all(check.measured for verdict in published for check in verdict.indicators)
    # the grad norm is the largest pre-clip norm of the window the evaluation closed
    assert final.get(indicators.GRAD_NORM).value == max(trainer.recent_norms)


def test_a_verdict_waits_for_the_probes_of_its_checkpoint(
        small_corpus, small_config, tmp_path, redis_url, run_id, one_thread):
    cfg = small_config
    cfg.probes.enabled = True
    cfg.probes.background = False  # each pass is in before the next step
    cfg.probes.wer = False
    trainer, summary, evaluated, published = _train(cfg, small_corpus, tmp_path / "run",
                                                    redis_url, run_id, 10)
    assert evaluated == [5, 10]  # with a checkpoint (and a probe pass) at each
    assert [verdict.step for verdict in published] == evaluated
    for verdict in published:
        for name in (indicators.PROBES_STOP, indicators.INFERENCE_DIAGONALITY):
            check = verdict.get(name)
            assert check is not None
            assert f"probe pass of checkpoint step {verdict.step} (12 probes)" in \
                check.measured, check.measured
    # NaN-safe comparison: the JSON the bus carries
    final = trainer.verdict()
    assert published[-1].model_dump_json() == final.model_dump_json() == \
        Verdict.model_validate(summary["verdict"]).model_dump_json()
    assert not final.all_met and final.first_met_step is None  # it does not speak yet


def test_every_surface_shows_the_trainers_verdict(
        small_corpus, small_config, tmp_path, redis_url, run_id):
    """One real run on the real Redis; then each surface reads it its own way: the tuner
    service from its consumer group, the API over HTTP, the bot's /status and the notifier's
    progress report from the stream, Prometheus from the trainer's exporter (what Grafana
    shows). Every one carries the trainer's verdict: the same step, values and marks."""
    import httpx

    from services.core.runstore import RunStore
    from services.core.schemas import SCHEMAS, decode
    from services.notifier.planner import ReportPlanner
    from services.notifier.reports import MESSAGES, format_number, status_report
    from services.trainer.exporter import PrometheusObserver, TrainerMetrics
    from services.tuner.api import create_app
    from services.tuner.config import TunerConfig
    from services.tuner.service import TunerService
    from tests.test_api import serve

    small_config.run.eval_every = 3
    trainer = Trainer(small_config, small_corpus, tmp_path / "run", progress=False,
                      cache_dir=small_corpus / ".features", run_id=run_id)
    exporter = PrometheusObserver(TrainerMetrics(), run_id)
    trainer.observers.append(exporter)
    link = attach(trainer, redis_url, enqueue_scoring=False)
    assert link is not None
    try:
        trainer.train(max_steps=6)
    finally:
        assert link.close()
    truth = trainer.verdict()
    assert truth.step == 6
    client = redis.Redis.from_url(redis_url)

    # the tuner: its window holds the trainer's verdict, and it announces nothing unmet
    tuner = TunerService(client, TunerConfig(), group=f"g-{run_id}", runs=[run_id])
    while tuner.run_once(block_ms=50):
        pass
    assert tuner.windows[run_id].verdict == truth
    events = [decode(f, SCHEMAS[Stream.EVENTS]) for _, f in
              client.xrange(stream_key(run_id, Stream.EVENTS))]
    assert ("indicators_met" in {e.event for e in events}) == truth.all_met

    # the API, over HTTP
    with serve(create_app(redis.Redis.from_url(redis_url), None)) as base:
        served = httpx.get(f"{base}/runs/{run_id}/verdict", timeout=10).json()
    assert Verdict.model_validate(served).model_dump_json() == truth.model_dump_json()

    # the bot's /status reads the store; the notifier's progress report follows the streams
    store = RunStore(client)
    assert store.latest_verdict(run_id) == truth
    words = MESSAGES["en"]
    status = status_report(run_id, None, None, None, 0, "en", store.latest_verdict(run_id))
    assert words["status_verdict"].format(step=truth.step, met=truth.met_count,
                                          total=len(truth.indicators)) in status
    planner = ReportPlanner("en", every_steps=10_000, every_s=3600.0)
    for stream in (Stream.METRICS, Stream.VERDICT):
        for _, fields in client.xrange(stream_key(run_id, stream)):
            planner.observe(decode(fields, SCHEMAS[stream]))
    progress = planner.progress(run_id)
    assert progress is not None
    assert words["verdict_header"].format(step=truth.step, met=truth.met_count,
                                          total=len(truth.indicators)) in progress.text
    for check in truth.indicators:
        line = next(li for li in progress.text.split("\n") if check.measured in li)
        assert format_number(check.value) in line and ("✅" in line) == check.met

    # Prometheus (the dashboards' indicator panels)
    value = exporter.metrics.registry.get_sample_value
    assert value("smart_tuner_verdict_step", {"run": run_id}) == truth.step
    assert value("smart_tuner_indicators_met", {"run": run_id}) == truth.met_count
    for check in truth.indicators:
        labels = {"run": run_id, "indicator": check.name}
        assert value("smart_tuner_indicator_met", labels) == float(check.met)
        assert value("smart_tuner_indicator_value", labels) == pytest.approx(check.value)
    client.close()
