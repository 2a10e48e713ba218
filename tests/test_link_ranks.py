"""Only rank 0 of a distributed run publishes telemetry and reads commands."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from services.core.bus import connect
from services.core.streams import Stream, stream_key

WORLD = 2


def _rank_main(rank: int, init_file: str, redis_url: str, run_id: str, out: str) -> None:
    from services.core.schemas import Event
    from services.trainer.link import attach, process_rank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    # attach() needs only these attributes of a Trainer
    trainer = SimpleNamespace(run_state=SimpleNamespace(run_id=run_id),
                              cfg=SimpleNamespace(run=SimpleNamespace(eval_every=5)),
                              observers=[], controllers=[])
    link = attach(trainer, redis_url, enqueue_scoring=False)
    if link is not None:
        link.publisher.publish(Stream.EVENTS, Event(run_id=run_id, event="run_started",
                                                    detail=f"rank {rank}"))
        link.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": process_rank(), "linked": link is not None,
        "observers": len(trainer.observers), "controllers": len(trainer.controllers)}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned rank processes, each importing torch
def test_only_rank_zero_attaches(tmp_path, redis_url, run_id):
    mp.spawn(_rank_main, args=(str(tmp_path / "pg"), redis_url, run_id, str(tmp_path)),
             nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert results[0] == {"rank": 0, "linked": True, "observers": 1, "controllers": 1}
    assert results[1] == {"rank": 1, "linked": False, "observers": 0, "controllers": 0}
    events = connect(redis_url).xrange(stream_key(run_id, Stream.EVENTS))
    assert len(events) == 1 and b"rank 0" in events[0][1][b"data"]
