"""The diagnostics worker's Celery app: Redis as broker and result backend.

Run it with::

    SMART_TUNER_REDIS_URL=redis://localhost:6379/0 \\
    PROMETHEUS_MULTIPROC_DIR=/tmp/smart-tuner-diagnostics-metrics \\
    SMART_TUNER_DIAGNOSTICS_METRICS_PORT=9102 \\
    celery -A services.diagnostics.celery_app worker --pool prefork --concurrency 2 \\
        -Q diagnostics --loglevel INFO

Redis over TLS: a ``rediss://`` URL (``?ssl_ca_certs=/path/ca.pem`` for a private CA) is
enough; the broker and the result backend get the same verified-TLS options from it
(services.core.redis_url.celery_ssl_conf). The password in the URL is masked in every log
record of the worker (services.core.logging.RedactingFilter on Celery's handlers).

Delivery is at-least-once: a task is acked only after it ran (``task_acks_late``) and is
requeued when its pool process dies (``task_reject_on_worker_lost``); the tasks make that
safe by publishing idempotently. Each pool process takes one task at a time
(``worker_prefetch_multiplier=1``), so a slow snapshot never holds others hostage.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from services.core.logging import RedactingFilter
from services.core.redis_url import celery_ssl_conf
from services.core.settings import ConfigError, get_settings
from services.core.tasks import (
    SERIALIZER,
    TASK_SOFT_TIME_LIMIT_S,
    TASK_TIME_LIMIT_S,
    diagnostics_queue,
    visibility_timeout,
)
from services.diagnostics import exporter

log = logging.getLogger(__name__)

RESULT_EXPIRES_S = 3600  # results are for debugging and tests; the report is in the stream


def _redis_url() -> str:
    """The broker URL from settings; a clear error when it is missing."""
    url = get_settings().redis_url
    if not url:
        raise ConfigError("SMART_TUNER_REDIS_URL is not set: the diagnostics worker needs Redis "
                          "as its Celery broker and result backend, e.g. "
                          "SMART_TUNER_REDIS_URL=redis://localhost:6379/0")
    return url


def create_app() -> Celery:
    """The configured diagnostics Celery app (tasks from services.diagnostics.tasks)."""
    url = _redis_url()
    app = Celery("smart_tuner_diagnostics", broker=url, backend=url,
                 include=["services.diagnostics.tasks"])
    app.conf.update(
        task_default_queue=diagnostics_queue(),
        task_serializer=SERIALIZER,
        result_serializer=SERIALIZER,
        accept_content=[SERIALIZER],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT_S,
        task_time_limit=TASK_TIME_LIMIT_S,
        broker_transport_options={"visibility_timeout": visibility_timeout()},
        result_expires=RESULT_EXPIRES_S,
        broker_connection_retry_on_startup=True,
        # rediss://: verified TLS for both (Celery's backend refuses a plain rediss:// URL,
        # and its broker would connect without checking the certificate).
        **celery_ssl_conf(url),
    )
    return app


app = create_app()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_logs(logger: logging.Logger, **_: Any) -> None:
    """Celery's own handlers: no Redis password in any record they write."""
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    """Main process, before the pool forks: start metrics from a clean directory."""
    exporter.reset_multiprocess_dir()


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    """Main process, pool up: serve the aggregated metrics if a port is configured."""
    port = exporter.metrics_port_from_env()
    if port is not None:
        exporter.start_metrics_server(port)


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
    """A pool process is exiting: drop its live-only metric files."""
    exporter.mark_process_dead(pid or os.getpid())
