"""Multi-process training: DDP over gloo on CPU, one voice on the bus, ranks that never diverge."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from services.core.bus import connect
from services.core.schemas import Ack, Command, Event, MetricsMessage, decode, encode
from services.core.streams import Stream, stream_key
from services.trainer.config import TrainConfig
from services.trainer.dataset import LengthBucketSampler
from services.trainer.distributed import (
    SINGLE,
    broadcast_object,
    current,
    init_from_env,
    shard_batches,
)
from services.trainer.training import SUMMARY_FILE, Trainer, TrainingObserver

WORLD = 2
MAX_STEPS = 60  # a bound only: the test stops the run with a command long before
TEST_TIMEOUT_S = 150


# ------------------------------------------------------------------ sharding


def _shards(n_items: int, batch_size: int, world: int, epoch: int) -> tuple[list, list]:
    lengths = np.random.default_rng(n_items).integers(20, 400, size=n_items)
    sampler = LengthBucketSampler(lengths, batch_size, seed=5)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    return batches, [shard_batches(batches, rank, world) for rank in range(world)]


@pytest.mark.parametrize(("n_items", "batch_size", "world"), [
    (10, 4, 2),  # the small corpus: 3 batches for 2 ranks
    (14, 4, 2), (16, 4, 2), (100, 8, 3), (33, 5, 4), (5, 4, 4),
    (9, 1, 2), (11, 1, 4),  # single items: joined, not repeated
])
def test_shards_are_disjoint_equal_and_cover_the_epoch(n_items, batch_size, world):
    for epoch in range(3):
        batches, shards = _shards(n_items, batch_size, world, epoch)
        # every rank takes the same number of steps per epoch (a DDP step is collective)
        assert len({len(shard) for shard in shards}) == 1
        # the epoch's batches shared out: cut (ceil) or, for single items, joined (floor)
        assert len(batches) // world <= len(shards[0]) <= -(-len(batches) // world)
        items = [i for shard in shards for batch in shard for i in batch]
        assert all(batch for shard in shards for batch in shard)
        # disjoint and together the whole epoch: each item exactly once
        assert sorted(items) == list(range(n_items))
        per_rank = [{i for batch in shard for i in batch} for shard in shards]
        assert sum(map(len, per_rank)) == n_items
        # deterministic: a rank computes its shard alone, from (seed, epoch)
        assert shards == [_shards(n_items, batch_size, world, epoch)[1][r] for r in range(world)]


def test_one_rank_keeps_the_batches_and_more_ranks_than_items_repeat_some():
    batches = [[3, 1], [0, 2]]
    assert shard_batches(batches, 0, 1) == batches
    shards = [shard_batches([[0], [1], [2]], r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [1, 1, 1, 1]  # 3 items for 4 ranks: one repeats
    assert {i for s in shards for b in s for i in b} == {0, 1, 2}
    with pytest.raises(ValueError):
        shard_batches(batches, 2, 2)


def test_a_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cpu") == current() == SINGLE
    assert SINGLE.is_main and not SINGLE.distributed
    payload = {"calls": []}
    assert broadcast_object(payload) is payload  # nothing to send to, nothing sent
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_from_env("cpu")


# ------------------------------------------------------------------ two ranks training


def _state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class _IndexRecorder:
    """Stands in for the training set, remembering which items the loop fetched."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        self.fetched.append(int(index))
        return self.dataset[index]


class _Recorder(TrainingObserver):
    """What one rank did at each step: the step's settings, losses, norm and its items."""

    def __init__(self, items: _IndexRecorder):
        self.items = items
        self.steps: list[dict[str, Any]] = []
        self.events: list[tuple[str, int]] = []

    def on_step(self, trainer: Trainer, metrics: Any) -> None:
        self.steps.append({"step": metrics.step, "lr": metrics.lr, "loss": metrics.loss,
                           "ga": metrics.guided_attention_weight,
                           "grad_norm": metrics.grad_norm, "epoch": trainer.epoch,
                           "items": list(self.items.fetched)})
        self.items.fetched.clear()

    def on_lifecycle(self, trainer: Trainer, event: str, detail: str,
                     data: dict[str, Any]) -> None:
        self.events.append((event, trainer.step))


def _rank_main(rank: int, port: int, cfg: TrainConfig, corpus: str, out: str,
               redis_url: str, run_id: str) -> None:
    from services.trainer import distributed
    from services.trainer.link import attach

    torch.set_num_threads(1)  # two ranks on a shared two-core machine
    # What torchrun puts in each worker's environment.
    os.environ.update({"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    placement = distributed.init_from_env("cpu")
    assert (placement.rank, placement.backend) == (rank, "gloo")
    trainer = Trainer(cfg, Path(corpus), Path(out, f"run{rank}"), progress=False,
                      cache_dir=Path(corpus, ".features"), run_id=run_id)
    items = _IndexRecorder(trainer.train_set)
    trainer.train_set = items
    recorder = _Recorder(items)
    trainer.observers.append(recorder)
    link = attach(trainer, redis_url, enqueue_scoring=False)  # rank 0 only
    try:
        summary = trainer.train(max_steps=MAX_STEPS)
    finally:
        if link is not None:
            link.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": trainer.dist.rank, "linked": link is not None, "step": trainer.step,
        "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
        "hash": _state_hash(trainer.model.state_dict()),
        "overrides": [{k: o[k] for k in ("step", "kind", "before", "after", "source")}
                      for o in trainer.overrides],
        "steps": recorder.steps, "events": recorder.events,
        "summary": {"step": summary["step"], "stop_reason": summary["stop_reason"]},
        "train_items": len(items)}))
    distributed.cleanup()


class _Operator:
    """The tuner's part, played by the test: commands into the run's stream, acks out."""

    def __init__(self, redis_url: str, run_id: str):
        self.client = connect(redis_url)
        self.run_id = run_id
        self.sent: dict[str, Command] = {}

    def send(self, action: str, value: float | None = None) -> str:
        return self.send_together((action, value))[0]

    def send_together(self, *actions: tuple[str, float | None]) -> tuple[str, ...]:
        """Commands written in one transaction: the trainer's reader gets them in one read
        (two plain XADDs could fall either side of a step boundary; CI saw that once)."""
        commands = [Command(run_id=self.run_id, source="test", action=action, value=value)
                    for action, value in actions]
        pipe = self.client.pipeline(transaction=True)
        for command in commands:
            pipe.xadd(stream_key(self.run_id, Stream.COMMANDS), encode(command))
            self.sent[command.command_id] = command
        pipe.execute()
        return tuple(command.command_id for command in commands)

    def acks(self) -> list[Ack]:
        return [decode(f, Ack) for _, f in
                self.client.xrange(stream_key(self.run_id, Stream.ACKS))]

    def acked(self, *command_ids: str) -> bool:
        done = {a.command_id for a in self.acks()}
        return all(c in done for c in command_ids)

    def steps_published(self) -> int:
        return self.client.xlen(stream_key(self.run_id, Stream.METRICS))


def _drive(operator: _Operator, ctx: Any) -> dict[str, Any]:
    """Send the commands one phase at a time while the ranks train; return what was seen."""
    seen: dict[str, Any] = {}
    phase = "warm-up"
    pending: tuple[str, ...] = ()
    deadline = time.monotonic() + TEST_TIMEOUT_S
    while not ctx.join(timeout=0.05):
        assert time.monotonic() < deadline, f"ranks still running in phase {phase}"
        if pending and not operator.acked(*pending):
            continue
        published = operator.steps_published()
        if phase == "warm-up" and published >= 2:
            pending = operator.send_together(("set_lr", 2e-4),
                                             ("set_guided_attention_weight", 3.0))
            phase = "settings"
        elif phase == "settings" and published >= 7:  # the step-5 checkpoint is written
            pending = (operator.send("rollback"),)
            phase = "rollback"
        elif phase == "rollback":
            pending = (operator.send("pause"),)
            phase = "pause"
        elif phase == "pause":
            time.sleep(0.1)  # a step in flight when the pause arrived is published by now
            seen["paused_at"] = operator.steps_published()
            time.sleep(1.0)
            seen["after_pause"] = operator.steps_published()
            pending = (operator.send("resume"),)
            phase = "resume"
        elif phase == "resume" and published >= seen["after_pause"] + 2:
            pending = (operator.send("stop"),)
            phase = "stop"
    assert phase == "stop", f"the run ended in phase {phase}"
    return seen


@pytest.mark.slow
def test_two_ranks_train_as_one_run(small_corpus, small_config, tmp_path, redis_url, run_id):
    operator = _Operator(redis_url, run_id)
    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.spawn(_rank_main, args=(port, small_config, str(small_corpus), str(tmp_path),
                                     redis_url, run_id),
                   nprocs=WORLD, join=False)
    try:
        seen = _drive(operator, ctx)
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    zero, one = ranks
    assert (zero["linked"], one["linked"]) == (True, False)

    # Both ranks stopped at the same step, on the stop command, with identical weights.
    assert zero["step"] == one["step"] == zero["summary"]["step"]
    assert zero["summary"]["stop_reason"] == one["summary"]["stop_reason"] == "stop_requested"
    assert zero["hash"] == one["hash"]
    assert (zero["epoch"], zero["batch_in_epoch"]) == (one["epoch"], one["batch_in_epoch"])

    # Every command was applied once by rank 0's handler and acked exactly once...
    acks = operator.acks()
    assert sorted(a.command_id for a in acks) == sorted(operator.sent)
    assert [a.status for a in acks] == ["applied"] * len(operator.sent), acks
    # ...and both ranks changed the same things at the same steps through the same setters.
    kinds = [o["kind"] for o in zero["overrides"]]
    assert kinds == ["set_lr", "set_guided_attention_weight", "rollback"]
    assert zero["overrides"] == one["overrides"]
    rollback = zero["overrides"][2]
    assert rollback["after"] == 5.0 and rollback["before"] > 5.0

    # The steps taken, the settings in force and the pre-clip norms agree rank by rank.
    def comparable(steps: list[dict]) -> list[dict]:
        return [{k: v for k, v in s.items() if k != "items"} for s in steps]

    assert comparable(zero["steps"]) == comparable(one["steps"])
    applied_at = zero["overrides"][0]["step"]
    assert zero["overrides"][1]["step"] == applied_at  # sent together, applied together
    first = next(s for s in one["steps"] if s["step"] == applied_at)
    assert (first["lr"], first["ga"]) == (pytest.approx(2e-4), 3.0)
    # Pause: no step while paused, and both ranks paused and resumed at the same step.
    assert seen["after_pause"] == seen["paused_at"]
    pauses = [e for e in zero["events"] if e[0] in ("paused", "resumed")]
    assert len(pauses) == 2 and pauses[0][1] == pauses[1][1]
    assert one["events"] == zero["events"]

    # Only rank 0 published: one metrics message per step taken, not one per rank.
    metrics = [decode(f, MetricsMessage) for _, f in operator.client.xrange(
        stream_key(run_id, Stream.METRICS))]
    assert [m.step for m in metrics] == [s["step"] for s in zero["steps"]]
    assert [m.grad_norm for m in metrics] == [s["grad_norm"] for s in one["steps"]]
    events = [decode(f, Event).event for _, f in operator.client.xrange(
        stream_key(run_id, Stream.EVENTS))]
    assert events.count("run_started") == 1 and events.count("stopped") == 1

    # Only rank 0 wrote the run folder; its last checkpoint holds the ranks' common weights.
    assert not (tmp_path / "run1").exists()
    run = tmp_path / "run0"
    for name in ("run_state.json", "metrics.jsonl", "config.json", SUMMARY_FILE):
        assert (run / name).is_file(), name
    assert list((run / "plots").glob("alignment-*.png"))
    last = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert last.name == f"ckpt-{zero['step']:08d}.pt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert _state_hash(saved["model"]) == zero["hash"]

    # The first epoch (3 batches cut into 4, 2 steps a rank): each rank read its own
    # batches, together every training item once.
    assert [s["epoch"] for s in zero["steps"][:3]] == [0, 0, 1]
    epoch_items = [[i for s in r["steps"][:2] for i in s["items"]] for r in ranks]
    assert not set(epoch_items[0]) & set(epoch_items[1])
    assert sorted(epoch_items[0] + epoch_items[1]) == list(range(zero["train_items"]))
