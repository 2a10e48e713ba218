"""Prometheus pieces every service shares: the dead-letter count."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

DEAD_LETTERS_METRIC = "smart_tuner_bus_dead_letters"


class DeadLetterCounter:
    """``smart_tuner_bus_dead_letters_total{consumer}``, kept up with a consumer's own count.

    Consumers count what they dead-letter (``Consumer.dead_lettered``); this turns that
    running total into a Prometheus counter without touching the bus code.
    """

    def __init__(self, registry: CollectorRegistry, consumer: str) -> None:
        self.consumer = consumer
        self.counter = Counter(DEAD_LETTERS_METRIC, "Entries moved to the dead-letter stream, "
                               "by consumer", ["consumer"], registry=registry)
        self.counter.labels(consumer)
        self._seen = 0

    def sync(self, total: int) -> None:
        """Bring the counter up to the consumer's running ``total``."""
        if total > self._seen:
            self.counter.labels(self.consumer).inc(total - self._seen)
            self._seen = total
