"""Starting the notifier: refused with the variable named when misconfigured; the launcher
starts it only when a token is set; /sample finds a run's checkpoints where runs live."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.settings import ConfigError
from services.launcher.up import notifier_configured
from services.notifier.sample import NoCheckpointError, run_directory, speak
from tests.telegram_stand_in import TEST_TOKEN

MALFORMED = "123456:this-is-not-a-token"


def _start(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMART_TUNER_")}
    clean.update(env, SMART_TUNER_REDIS_URL="redis://127.0.0.1:6379/15")
    return subprocess.run([sys.executable, "-m", "services.notifier.service"], env=clean,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.slow  # a Python process of its own, importing the service
def test_notifier_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    result = _start({"SMART_TUNER_NOTIFIER_CHAT_IDS": "42"}, tmp_path)
    assert result.returncode == 2
    assert "SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN" in result.stderr


@pytest.mark.slow
def test_notifier_refuses_a_malformed_token_without_echoing_it(tmp_path: Path) -> None:
    result = _start({"SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN": MALFORMED,
                     "SMART_TUNER_NOTIFIER_CHAT_IDS": "42"}, tmp_path)
    assert result.returncode == 2
    assert "SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN" in result.stderr
    assert "not a Telegram bot token" in result.stderr
    assert MALFORMED not in result.stderr + result.stdout


def test_launcher_starts_the_notifier_only_when_configured(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert notifier_configured({}) is False
    (tmp_path / ".env").write_text("SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN=\n")  # as in the example
    assert notifier_configured({}) is False
    monkeypatch.setenv("SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("SMART_TUNER_NOTIFIER_CHAT_IDS", "42")
    assert notifier_configured(os.environ) is True
    monkeypatch.delenv("SMART_TUNER_NOTIFIER_CHAT_IDS")
    with pytest.raises(ConfigError, match="SMART_TUNER_NOTIFIER_CHAT_IDS"):
        notifier_configured(os.environ)  # set but incomplete: fail before starting anything


def test_run_directory_nested_or_the_run_itself(tmp_path: Path) -> None:
    (tmp_path / "runs" / "a" / "checkpoints").mkdir(parents=True)
    assert run_directory(tmp_path / "runs", "a") == tmp_path / "runs" / "a"
    own = tmp_path / "runs" / "a"  # `up` points the notifier at the run's own folder
    assert run_directory(own, "other-id") == own
    with pytest.raises(ValueError, match="invalid run id"):
        run_directory(tmp_path / "runs", "../etc")


def test_sample_without_checkpoints_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(NoCheckpointError):
        speak(tmp_path, "missing", "hello")
    assert not (tmp_path / "missing").exists()


def test_feed_catches_up_silently_then_reports(telegram, redis_url: str) -> None:
    """Old messages (a notifier started late) update the planner's memory but send nothing;
    fresh ones are reported, and every delivery is acked."""
    import asyncio
    import time

    from aiogram import Bot
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import TelegramAPIServer

    from services.core.bus import Delivery, connect
    from services.core.indicators import evaluate_indicators, make_verdict
    from services.core.schemas import VerdictMessage
    from services.notifier.delivery import Outbox
    from services.notifier.feed import ReportFeed
    from services.notifier.planner import ReportPlanner
    from tests.notifier_harness import TEST_POLICY
    from tests.test_notifier_reports import RUN, metrics

    old = time.time() - 3600
    backlog = [Delivery("k", f"{i + 1}-0", metrics(step=i * 10, ts=old)) for i in range(30)]
    # The trainer's verdict in the backlog (it counts one restart): the reports show it.
    verdict = make_verdict(290, evaluate_indicators(3.0, 0.8, 1, 0.5, 85.0))
    backlog.append(Delivery("k", "40-0", VerdictMessage(run_id=RUN, verdict=verdict, ts=old)))
    fresh = [Delivery("k", f"{100 + i}-0", metrics(step=300 + i * 10)) for i in range(11)]
    acked: list[str] = []

    async def main() -> tuple[int, int]:
        session = AiohttpSession(api=TelegramAPIServer.from_base(telegram.base_url))
        bot = Bot(TEST_TOKEN, session=session)
        outbox = Outbox(bot, TEST_POLICY)
        feed = ReportFeed(connect(redis_url), ReportPlanner("en", 100, 3600.0), outbox, (7,),
                          catch_up_s=300)
        feed.consumer.ack = lambda *done: acked.extend(d.entry_id for d in done)  # type: ignore
        quiet = await feed.handle(backlog)
        loud = await feed.handle(fresh)
        await outbox.close()
        await session.close()
        return quiet, loud

    quiet, loud = asyncio.run(main())
    # silent reports were due at steps 100 and 200; fresh ones at 300 and 400
    assert quiet == 0 and loud == 2
    first, message = telegram.calls("sendMessage", 7)
    assert "step 300" in first.params["text"] and "step 400" in message.params["text"]
    restarts = next(line for line in message.params["text"].split("\n") if "Restarts" in line)
    assert "1" in restarts and "❌" in restarts  # the verdict, remembered from the backlog
    assert acked == [d.entry_id for d in backlog + fresh]


class RecordingOutbox:
    """Stands in for the Telegram outbox: keeps what the feed queued."""

    def __init__(self) -> None:
        self.texts: list[tuple[int, str]] = []

    def send_text(self, chat_id: int, text: str) -> None:
        """Record a text message."""
        self.texts.append((chat_id, text))

    def send_photo(self, chat_id: int, png: bytes, filename: str) -> None:
        """Pictures are not this test's subject."""


def test_feed_after_a_restart_handles_every_page_of_its_pending_entries(
        tmp_path: Path) -> None:
    """A feed that died holding more unacked entries than one page gets all of them back
    (it used to mark itself recovered after the first page: the rest stayed pending)."""
    import asyncio
    import time

    from services.core.bus import Consumer, connect
    from services.core.consumer import POLL_COUNT
    from services.core.schemas import encode
    from services.core.streams import RUNS_KEY, Stream, stream_key
    from services.launcher.redis_server import RedisProcess
    from services.notifier.feed import GROUP, ReportFeed
    from services.notifier.planner import ReportPlanner
    from tests.test_notifier_reports import RUN, metrics

    server = RedisProcess(tmp_path).start()  # a runs set of this test's own
    try:
        client = connect(server.url)
        key = stream_key(RUN, Stream.METRICS)
        client.sadd(RUNS_KEY, RUN)
        client.xgroup_create(key, GROUP, id="0", mkstream=True)
        old = time.time() - 3600  # caught up silently: no notices to queue
        total = 2 * POLL_COUNT + 50
        pipe = client.pipeline(transaction=False)
        for step in range(total):
            pipe.xadd(key, encode(metrics(step=step, ts=old)))
        pipe.execute()
        died = Consumer(client, {key: Stream.METRICS}, GROUP, "notifier-1")
        assert len(died.poll(None, total)) == total  # read, never acked

        outbox = RecordingOutbox()
        feed = ReportFeed(client, ReportPlanner("en", 100, 3600.0), outbox,  # type: ignore[arg-type]
                          (7,), catch_up_s=300, block_ms=20)

        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(feed.run(stop))
            deadline = time.monotonic() + 10
            while (client.xpending(key, GROUP)["pending"] and time.monotonic() < deadline):
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 5)

        asyncio.run(main())
        assert client.xpending(key, GROUP)["pending"] == 0
        assert feed.notices_suppressed >= 1 and outbox.texts == []
    finally:
        server.stop()
