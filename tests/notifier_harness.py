"""A real notifier process-in-a-thread for tests: its own event loop, the real bot polling
the Telegram stand-in, the real feed on Redis and the real webhook server on a free port."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

from services.notifier.config import NotifierSettings, load_notifier_settings
from services.notifier.delivery import DeliveryPolicy
from services.notifier.service import Notifier, build, run
from tests.telegram_stand_in import TEST_TOKEN, TelegramStandIn

# Fast but real: the outbox still spaces, retries and backs off, just on a shorter clock.
TEST_POLICY = DeliveryPolicy(per_chat_interval_s=0.02, global_rate_per_s=200.0,
                             backoff_base_s=0.05, backoff_max_s=0.5)
START_TIMEOUT_S = 20.0


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def notifier_settings(telegram: TelegramStandIn, runs_dir: Path,
                      **overrides: Any) -> NotifierSettings:
    """Settings pointing at the stand-in, on a free port; ``overrides`` win."""
    values: dict[str, Any] = dict(telegram_token=TEST_TOKEN, chat_ids=(1001,),
                                  telegram_api_url=telegram.base_url, port=free_port(),
                                  runs_dir=runs_dir, ack_wait_s=15.0)
    values.update(overrides)
    return load_notifier_settings(**values)


class RunningNotifier:
    """``build`` + ``run`` on a background thread; ``close`` stops it as SIGTERM would."""

    def __init__(self, settings: NotifierSettings, redis_url: str,
                 telegram: TelegramStandIn, catch_up_s: float | None = None,
                 policy: DeliveryPolicy = TEST_POLICY):
        self.settings = settings
        self.redis_url = redis_url
        self.telegram = telegram
        self.catch_up_s = catch_up_s
        self.policy = policy
        self.notifier: Notifier | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="notifier", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the webhook server."""
        return f"http://127.0.0.1:{self.settings.port}"

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by close()
            self.error = error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.notifier = build(self.settings, self.redis_url, self.policy)
        if self.catch_up_s is not None:
            self.notifier.feed.catch_up_s = self.catch_up_s
        await run(self.notifier, self._stop, self.settings.language)

    def start(self) -> RunningNotifier:
        """Start, and return once the bot polls and the webhook server listens."""
        self._thread.start()
        self.telegram.wait_for(lambda calls: any(c.method.lower() == "getupdates"
                                                 for c in calls), START_TIMEOUT_S)
        deadline = START_TIMEOUT_S
        while not (self.notifier is not None and self.notifier.server.started):
            if self.error is not None or deadline <= 0:
                raise RuntimeError("the notifier did not start") from self.error
            threading.Event().wait(0.05)
            deadline -= 0.05
        return self

    def close(self) -> None:
        """Stop every part, drain the outbox; re-raise what the notifier died of."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the notifier did not stop"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> RunningNotifier:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
