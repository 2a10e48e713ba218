"""What one client can make the control API spend: the limits as configured, the token
buckets that rate-limit drawing alignment pictures, and the cache of drawn ones.

Pure logic over an injected clock, thread-safe (FastAPI runs sync endpoints in a thread
pool); services/tuner/api.py applies them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.core.settings import Settings


@dataclass(frozen=True)
class ApiLimits:
    """What one client can make the API spend (settings ``SMART_TUNER_API_*``)."""

    max_body_bytes: int = 64 * 1024  # commands are a few hundred bytes
    renders_per_client: int = 6
    renders_total: int = 30
    render_window_s: float = 60.0
    png_cache_entries: int = 64
    max_tracked_clients: int = 1024  # the limiter forgets the least recent beyond this

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiLimits:
        """The limits as configured."""
        return cls(max_body_bytes=settings.api_max_body_bytes,
                   renders_per_client=settings.api_renders_per_client,
                   renders_total=settings.api_renders_total,
                   render_window_s=settings.api_render_window_s,
                   png_cache_entries=settings.api_png_cache_entries)


class _Bucket:
    """A token bucket: ``capacity`` tokens, refilled at ``capacity / window_s`` per second."""

    def __init__(self, capacity: int, window_s: float, now: float):
        self.capacity = capacity
        self.rate = capacity / window_s
        self.tokens = float(capacity)
        self.at = now

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0: one is there now); refills first."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


class RenderLimiter:
    """Rate limit of picture drawing: ``per_client`` per ``window_s`` for each client and
    ``total`` for all together. Pure logic over an injected clock; thread-safe (FastAPI runs
    sync endpoints in a thread pool)."""

    def __init__(self, per_client: int, total: int, window_s: float,
                 max_clients: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.per_client = per_client
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self.total = _Bucket(total, window_s, clock())
        # LRU: a client forgotten comes back with a full bucket; the total still holds.
        self.clients: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float | None:
        """Take one drawing for ``client``: None if allowed, else seconds to wait."""
        with self._lock:
            now = self.clock()
            bucket = self.clients.get(client)
            if bucket is None:
                bucket = self.clients[client] = _Bucket(self.per_client, self.window_s, now)
                while len(self.clients) > self.max_clients:
                    self.clients.popitem(last=False)
            self.clients.move_to_end(client)
            wait = max(bucket.wait(now), self.total.wait(now))
            if wait > 0:
                return wait
            bucket.tokens -= 1
            self.total.tokens -= 1
            return None


PngKey = tuple[str, str, str]  # run id, attention entry id, snapshot id of the report shown


class PngCache:
    """Drawn pictures by (run, snapshot entry, report), least recently used dropped first."""

    def __init__(self, entries: int):
        self.entries = entries
        self._pngs: OrderedDict[PngKey, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: PngKey) -> bytes | None:
        """The picture drawn for ``key``, if kept."""
        with self._lock:
            png = self._pngs.get(key)
            if png is not None:
                self._pngs.move_to_end(key)
            return png

    def put(self, key: PngKey, png: bytes) -> None:
        """Keep ``png`` for ``key``, dropping the least recently used beyond the bound."""
        with self._lock:
            self._pngs[key] = png
            self._pngs.move_to_end(key)
            while len(self._pngs) > self.entries:
                self._pngs.popitem(last=False)
