"""Benchmark of the closed loop, measured in one run on this machine.

1. Step time of the tiny preset with telemetry and command polling on vs off (goal: ratio
   <= 1.02). Steps alternate on/off over the same batches, so data and model size cancel.
2. Red flag -> command applied: a grad-norm spike is injected into short real runs with a
   tuner thread watching; per trial, the time from the metrics message that completed the
   tuner's trigger to the trainer's ack of the applied command, and in steps.
3. Alignment reports scored per second per worker process: the worker's own report builder
   on snapshots of 4 matrices of 200x80, then end to end through one Celery worker process.
4. Events per second through the bus: publisher and consumer-group throughput.

    python bench/loop.py [--pairs 30] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from services.core.bus import Consumer, Publisher, connect
from services.core.indicators import GRAD_NORM_RED_FLAG
from services.core.logging import setup_logging
from services.core.schemas import (
    Ack,
    AttentionSample,
    AttentionSnapshot,
    Command,
    MetricsMessage,
    decode,
    encode,
)
from services.core.streams import PREFIX, RUNS_KEY, Stream, stream_key
from services.core.tasks import SCORE_ALIGNMENT
from services.diagnostics.reports import build_report
from services.launcher.redis_server import RedisProcess, answers
from services.trainer.config import TrainConfig, preset
from services.trainer.corpus import build_demo_corpus
from services.trainer.faults import FaultPlan
from services.trainer.link import attach
from services.trainer.training import Trainer
from services.tuner.config import TunerConfig
from services.tuner.service import TunerService

DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _cleanup(client, run_id: str) -> None:
    keys = list(client.scan_iter(match=f"{PREFIX}:{run_id}:*"))
    if keys:
        client.delete(*keys)
    client.srem(RUNS_KEY, run_id)


def bench_step_overhead(data: Path, redis_url: str, pairs: int, workdir: Path) -> None:
    """Same batches, alternating telemetry on and off."""
    cfg = preset("tiny")
    cfg.run.eval_every = 10**6  # steps only: evaluation costs the same either way
    cfg.probes.enabled = False  # a probe pass beside the steps would blur the ratio
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    trainer = Trainer(cfg, data, workdir / "overhead", progress=False, run_id=run_id)
    link = attach(trainer, redis_url, enqueue_scoring=False)
    observers, controllers = list(trainer.observers), list(trainer.controllers)
    batches = trainer._batches()
    on, off = [], []
    trainer.train_step(next(batches))  # warm-up, not measured
    for i in range(pairs):
        batch = next(batches)
        for telemetry in ((True, False) if i % 2 else (False, True)):
            trainer.observers = observers if telemetry else []
            trainer.controllers = controllers if telemetry else []
            started = time.perf_counter()
            for controller in trainer.controllers:
                controller.before_step(trainer)
            metrics = trainer.train_step(batch)
            for observer in trainer.observers:
                observer.on_step(trainer, metrics)
            (on if telemetry else off).append(time.perf_counter() - started)
    link.close()
    _cleanup(connect(redis_url), run_id)
    # Each pair ran the same batch twice: the per-pair ratio cancels the batch's length,
    # and the median over pairs resists the odd step that the OS interrupted.
    pair_ratio = statistics.median(a / b for a, b in zip(on, off, strict=True))
    print(f"[1] step time, tiny preset, {pairs} pairs: telemetry off median "
          f"{statistics.median(off):.3f} s, on {statistics.median(on):.3f} s; median per-pair "
          f"ratio on/off {pair_ratio:.4f} (goal <= 1.02); ratio of means "
          f"{statistics.mean(on) / statistics.mean(off):.4f}")


def _micro(cfg: TrainConfig) -> TrainConfig:
    """Tiny preset at half width on 4-utterance batches: fast steps, same loop."""
    m = cfg.model
    m.symbols_embedding_dim = m.encoder_embedding_dim = 64
    m.attention_rnn_dim = m.decoder_rnn_dim = 128
    m.prenet_dim = m.postnet_embedding_dim = 64
    cfg.run.batch_size = cfg.run.val_size = 4
    cfg.run.eval_every = cfg.run.checkpoint_every = 10**6
    return cfg


def bench_reaction(data: Path, redis_url: str, trials: int, workdir: Path, width: str) -> None:
    """Inject a spike, let a tuner thread react, measure until the trainer's ack."""
    config = TunerConfig.model_validate({
        "warmup_steps": 10**6,
        "grad_norm": {"window": 2, "min_above": 1, "cooldown_steps": 1000,
                      "recover_window": 4},
        "service": {"metrics_window": 60, "measure_after_steps": 4}})
    latencies, steps_late, reaction = [], [], []
    client = connect(redis_url)
    for trial in range(trials):
        cfg = _micro(preset("tiny")) if width == "micro" else preset("tiny")
        cfg.run.eval_every = cfg.run.checkpoint_every = 10**6
        cfg.probes.enabled = False
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        trainer = Trainer(cfg, data, workdir / f"reaction-{width}-{trial}", progress=False,
                          run_id=run_id, fault=FaultPlan(kind="grad_spike", start=3, steps=3,
                                                         factor=1e4))
        link = attach(trainer, redis_url, enqueue_scoring=False)
        tuner = TunerService(connect(redis_url), config, group=f"tuner-{run_id}", runs=[run_id])
        stop = threading.Event()
        thread = threading.Thread(target=tuner.run_forever, args=(stop, 50), daemon=True)
        thread.start()
        trainer.train(max_steps=9)
        link.close()
        stop.set()
        thread.join(10)
        metrics = {m.step: m for m in (decode(f, MetricsMessage) for _, f in
                                       client.xrange(stream_key(run_id, Stream.METRICS)))}
        command = next(c for c in (decode(f, Command) for _, f in
                                   client.xrange(stream_key(run_id, Stream.COMMANDS)))
                       if c.action == "set_lr")
        ack = next(a for a in (decode(f, Ack) for _, f in
                               client.xrange(stream_key(run_id, Stream.ACKS)))
                   if a.command_id == command.command_id)
        # with a window of 2 and 1 above, the first spiked step completes the trigger
        trigger = min((m for m in metrics.values() if m.grad_norm > GRAD_NORM_RED_FLAG),
                      key=lambda m: m.step)
        assert command.reason.value == trigger.grad_norm
        latencies.append(ack.ts - trigger.ts)
        reaction.append(command.ts - trigger.ts)
        steps_late.append(ack.step - trigger.step - 1)  # 0: applied before the next step
        _cleanup(client, run_id)
    p95 = float(np.percentile(latencies, 95))
    print(f"[2] red flag -> command applied, {width} model, {trials} trials: tuner reaction "
          f"median {statistics.median(reaction) * 1000:.1f} ms; flag -> applied median "
          f"{statistics.median(latencies):.3f} s, p95 {p95:.3f} s (goal <= 0.5 s); applied "
          f"before step trigger+1+{max(steps_late)} at worst (0 = the next step; median "
          f"{statistics.median(steps_late):.0f})")


def _snapshot(run_id: str, step: int, diffuse: bool = False) -> AttentionSnapshot:
    """4 samples of 200x80: a sharp (trained) diagonal, or a diffuse early-training one."""
    rng = np.random.default_rng(step)
    samples = []
    for _ in range(4):
        t = np.arange(200)[:, None] / 200
        n = np.arange(80)[None, :] / 80
        matrix = np.exp(-((n - t) ** 2) / 0.002)
        if diffuse:
            matrix = matrix + rng.random((200, 80)) * 0.01
        matrix /= matrix.sum(1, keepdims=True)
        samples.append(AttentionSample.from_array(matrix, 80, 200))
    return AttentionSnapshot(run_id=run_id, snapshot_id=f"{run_id}-{step}", step=step,
                             samples=samples)


def bench_scoring(redis_url: str, workdir: Path, count: int) -> None:
    """Pure report building, then through one real Celery worker process."""
    for kind, diffuse in (("sharp (trained)", False), ("diffuse (early)", True)):
        snapshots = [_snapshot("bench", i, diffuse) for i in range(32)]
        started = time.perf_counter()
        done = 0
        while time.perf_counter() - started < 3.0:
            build_report(snapshots[done % len(snapshots)], worker="bench")
            done += 1
        seconds = time.perf_counter() - started
        print(f"[3a] report builder, one process, {kind} attention: {done / seconds:.0f} "
              f"snapshots/s = {4 * done / seconds:.0f} matrices of 200x80 per second "
              "(goal >= 2,000)")



    # The worker harness is a test fixture (tests/celery_worker.py), not part of the package;
    # run as a script, only bench/ is on sys.path, so the repository root is added here.
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.celery_worker import start_worker

    client = connect(redis_url)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    key = stream_key(run_id, Stream.ATTENTION)
    entries = [client.xadd(key, encode(_snapshot(run_id, i))).decode() for i in range(count)]
    with start_worker(redis_url, workdir / "worker", concurrency=1) as worker:
        started = time.perf_counter()
        for entry in entries:
            worker.app.send_task(SCORE_ALIGNMENT, args=[run_id, entry])
        reports = stream_key(run_id, Stream.DIAGNOSTICS)
        while client.xlen(reports) < count and time.perf_counter() - started < 300:
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    done = client.xlen(reports)
    print(f"[3b] through Celery, one worker process: {done} snapshots in {seconds:.2f} s = "
          f"{done / seconds:.0f} snapshots/s = {4 * done / seconds:.0f} matrices/s "
          "(task overhead included)")
    _cleanup(client, run_id)


def bench_bus(redis_url: str, count: int) -> None:
    """Publisher throughput, then consumer-group read + ack throughput."""
    client = connect(redis_url)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    message = MetricsMessage(run_id=run_id, step=1, loss=1.0, mel=0.4, mel_postnet=0.4,
                             gate=0.1, guided_attention=0.1, objective=0.9, grad_norm=1.0,
                             lr=1e-3, guided_attention_weight=1.0, clip_threshold=1.0,
                             step_seconds=0.5, finite=True, skipped_steps=0)
    publisher = Publisher(client, run_id, buffer_size=count + 1)
    started = time.perf_counter()
    for _ in range(count):
        publisher.publish(Stream.METRICS, message)
    enqueue_s = time.perf_counter() - started
    publisher.close(120)
    seconds = time.perf_counter() - started
    consumer = Consumer(client, {stream_key(run_id, Stream.METRICS): Stream.METRICS},
                        "bench", "c1")
    started = time.perf_counter()
    read = 0
    while read < count:
        deliveries = consumer.poll(block_ms=None, count=500)
        if not deliveries:
            break
        pipe = client.pipeline(transaction=False)
        for delivery in deliveries:
            pipe.xack(delivery.key, "bench", delivery.entry_id)
        pipe.execute()
        read += len(deliveries)
    read_s = time.perf_counter() - started
    print(f"[4] bus: publish() {count / enqueue_s:,.0f} calls/s (never waits on Redis); "
          f"delivered to Redis {count / seconds:,.0f} events/s; consumer group read+ack "
          f"{read / read_s:,.0f} events/s")
    _cleanup(client, run_id)


def main() -> None:
    """Run the four measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="corpus (default: a fresh 24-utterance espeak corpus)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--snapshots", type=int, default=200)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--only", default="bus,scoring,overhead,reaction",
                        help="comma-separated subset of: bus, scoring, overhead, reaction")
    args = parser.parse_args()
    setup_logging("WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    server = None
    redis_url = args.redis_url
    if not answers(redis_url):
        server = RedisProcess(workdir).start()
        redis_url = server.url
    data = args.data
    if data is None:
        data = workdir / "corpus"
        build_demo_corpus(data, n_english=20, n_russian=4, seed=3, progress=False)
    try:
        parts = set(args.only.split(","))
        if "bus" in parts:
            bench_bus(redis_url, args.events)
        if "scoring" in parts:
            bench_scoring(redis_url, workdir, args.snapshots)
        if "overhead" in parts:
            bench_step_overhead(data, redis_url, args.pairs, workdir)
        if "reaction" in parts:
            bench_reaction(data, redis_url, args.trials, workdir, "micro")
            bench_reaction(data, redis_url, max(1, args.trials // 2), workdir, "tiny")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
