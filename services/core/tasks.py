"""Celery task names and queue: the contract between whoever enqueues and the worker.

The trainer (or any service) enqueues by name with ``make_client(url).send_task(NAME, ...)``
and never imports worker code, so it needs neither matplotlib nor the worker's settings.
"""

from __future__ import annotations

import os

import celery

SCORE_ALIGNMENT = "diagnostics.score_alignment"  # args: run_id, entry_id of an attention entry
RENDER_ALIGNMENT = "diagnostics.render_alignment"  # args: run_id, entry_id | None, sample
DIAGNOSTICS_QUEUE = "diagnostics"
# Overrides DIAGNOSTICS_QUEUE for both sides, e.g. so that a test worker gets its own queue.
DIAGNOSTICS_QUEUE_ENV = "SMART_TUNER_DIAGNOSTICS_QUEUE"
SERIALIZER = "json"  # the only content type either side accepts: no pickle from the network


def diagnostics_queue() -> str:
    """The queue diagnostics tasks go to: ``$SMART_TUNER_DIAGNOSTICS_QUEUE`` or the default."""
    return os.environ.get(DIAGNOSTICS_QUEUE_ENV) or DIAGNOSTICS_QUEUE


def make_client(broker_url: str, *, queue: str | None = None,
                backend_url: str | None = None) -> celery.Celery:
    """A minimal Celery app for ``send_task`` to the diagnostics queue (no task imports).

    ``backend_url`` is only needed to wait for results (``AsyncResult.get``); the trainer
    fires and forgets, so by default the client does not subscribe to result channels.
    """
    app = celery.Celery("smart-tuner-client", broker=broker_url, backend=backend_url,
                        set_as_current=False)
    app.conf.update(
        task_default_queue=queue or diagnostics_queue(),
        task_serializer=SERIALIZER,
        result_serializer=SERIALIZER,
        accept_content=[SERIALIZER],
        broker_connection_retry_on_startup=True,
    )
    return app
