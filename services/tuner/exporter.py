"""Prometheus metrics of the tuner service: its decisions by rule, its dead letters."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, start_http_server

from services.core.metrics import DeadLetterCounter
from services.core.settings import ENV_PREFIX, load_settings

log = logging.getLogger(__name__)

METRICS_PORT_ENV = f"{ENV_PREFIX}TUNER_METRICS_PORT"  # setting tuner_metrics_port
DEFAULT_ADDR = "0.0.0.0"  # all interfaces: Prometheus scrapes from another container
EVENT_ACTION = "event"  # the `action` label of a decision that is an event, not a command
DEAD_LETTER_CONSUMER = "tuner"


class TunerMetrics:
    """The tuner's series, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.decisions = Counter(
            "smart_tuner_tuner_decisions", "Decisions published by the tuner, by run, rule "
            "and action (a command, or 'event' for a red flag or recovery)",
            ["run", "rule", "action"], registry=self.registry)
        self.dead_letters = DeadLetterCounter(self.registry, DEAD_LETTER_CONSUMER)

    def decided(self, run_id: str, rule: str, action: str | None) -> None:
        """Count one published decision."""
        self.decisions.labels(run_id, rule, action or EVENT_ACTION).inc()

    def dead_lettered(self, total: int) -> None:
        """Bring the dead-letter counter up to the consumer's running ``total``."""
        self.dead_letters.sync(total)


def metrics_port_from_env() -> int | None:
    """The ``tuner_metrics_port`` setting (None: not served); ConfigError if bad."""
    return load_settings().tuner_metrics_port


def serve(metrics: TunerMetrics, port: int, addr: str = DEFAULT_ADDR) -> int:
    """Serve ``metrics`` on ``addr:port`` from a daemon thread; returns the bound port."""
    server, _ = start_http_server(port, addr=addr, registry=metrics.registry)
    log.info("tuner metrics on http://%s:%d/metrics", addr, server.server_port)
    return server.server_port
