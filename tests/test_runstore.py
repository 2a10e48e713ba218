"""RunStore on a real Redis: which run is the most recent, each decision once, restarts."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit

from services.core.bus import connect
from services.core.runstore import RunStore
from services.core.schemas import ActionRecord, Command, Event, Trigger, encode
from services.core.streams import RUNS_KEY, Stream, stream_key
from tests.test_notifier_reports import metrics


def _run(client, prefix: str) -> str:
    run_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client.sadd(RUNS_KEY, run_id)
    return run_id


PRIVATE_DB = 13  # "the most recent run" is about all runs: no other test may write there


def test_most_recent_run_follows_the_newest_entry(redis_url: str) -> None:
    # from_url lets the URL's own db win over a db argument: put ours in the URL
    client = connect(urlsplit(redis_url)._replace(path=f"/{PRIVATE_DB}").geturl())
    assert client.connection_pool.connection_kwargs["db"] == PRIVATE_DB
    client.flushdb()
    store = RunStore(client)
    assert store.most_recent_run() is None
    first, second = _run(client, "store-a"), _run(client, "store-b")
    client.xadd(stream_key(first, Stream.METRICS), encode(metrics(run_id=first, step=1)))
    time.sleep(0.005)  # entry ids order streams to the millisecond
    client.xadd(stream_key(second, Stream.METRICS), encode(metrics(run_id=second, step=1)))
    assert store.most_recent_run() == second
    time.sleep(0.005)
    client.xadd(stream_key(first, Stream.EVENTS), encode(Event(run_id=first, event="paused")))
    assert store.most_recent_run() == first


def test_latest_actions_newest_stage_once_each(redis_url: str) -> None:
    client = connect(redis_url)
    store = RunStore(client)
    run_id = _run(client, "store-c")
    trigger = Trigger(rule="r", metric="grad_norm", value=200.0, threshold=100.0, window=4)
    key = stream_key(run_id, Stream.ACTIONS)
    for action_id, stages in (("a1", ("issued", "acked", "measured")), ("a2", ("issued",)),
                              ("a3", ("issued", "acked"))):
        command = Command(run_id=run_id, action="rollback", source="tuner")
        for stage in stages:
            client.xadd(key, encode(ActionRecord(run_id=run_id, action_id=action_id,
                                                 stage=stage, trigger=trigger,
                                                 command=command)))
    latest = store.latest_actions(run_id, 10)
    assert [(r.action_id, r.stage) for r in latest] == [("a1", "measured"), ("a2", "issued"),
                                                        ("a3", "acked")]
    assert [r.action_id for r in store.latest_actions(run_id, 2)] == ["a2", "a3"]


def test_restarts_from_the_newest_run_started(redis_url: str) -> None:
    client = connect(redis_url)
    store = RunStore(client)
    run_id = _run(client, "store-d")
    assert store.restarts(run_id) == 0
    key = stream_key(run_id, Stream.EVENTS)
    for restarts in (0, 2):
        client.xadd(key, encode(Event(run_id=run_id, event="run_started",
                                      data={"restarts": restarts})))
    client.xadd(key, encode(Event(run_id=run_id, event="paused")))
    assert store.restarts(run_id) == 2
