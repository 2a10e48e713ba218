"""Celery task names and queue: the contract between whoever enqueues and the worker.

The trainer (or any service) enqueues by name with ``make_client(url).send_task(NAME, ...)``
and never imports worker code, so it needs neither matplotlib nor the worker's settings.
"""

from __future__ import annotations

import logging

import celery

from services.core.redis_url import celery_ssl_conf

# The defaults are settings; re-exported here, where both sides of the contract look.
from services.core.settings import DIAGNOSTICS_QUEUE as DIAGNOSTICS_QUEUE
from services.core.settings import ENV_PREFIX, load_settings
from services.core.settings import VISIBILITY_TIMEOUT_S as VISIBILITY_TIMEOUT_S

log = logging.getLogger(__name__)

SCORE_ALIGNMENT = "diagnostics.score_alignment"  # args: run_id, entry_id of an attention entry
RENDER_ALIGNMENT = "diagnostics.render_alignment"  # args: run_id, entry_id | None, sample
# Overrides DIAGNOSTICS_QUEUE for both sides, e.g. so that a test worker gets its own queue.
DIAGNOSTICS_QUEUE_ENV = f"{ENV_PREFIX}DIAGNOSTICS_QUEUE"
SERIALIZER = "json"  # the only content type either side accepts: no pickle from the network

# A task runs for well under a second; the hard limit stops a wedged one, and the Redis
# visibility timeout (after which an unacked task is handed to another worker) must exceed
# the hard limit plus the time a prefetched task may wait, or healthy tasks get run twice.
TASK_SOFT_TIME_LIMIT_S = 60
TASK_TIME_LIMIT_S = 120
# Also how long the tasks of a worker killed outright (SIGKILL, OOM, a lost node) wait before
# another worker gets them; set it lower where task times allow. Both sides read it: the
# worker's broker and the sender's outbox (services.trainer.scoring), which must not resend
# a task the broker is still bound to redeliver.
VISIBILITY_TIMEOUT_ENV = f"{ENV_PREFIX}DIAGNOSTICS_VISIBILITY_TIMEOUT_S"


def diagnostics_queue() -> str:
    """The queue diagnostics tasks go to (setting ``diagnostics_queue``)."""
    return load_settings().diagnostics_queue


def visibility_timeout() -> float:
    """The broker's visibility timeout (setting ``diagnostics_visibility_timeout_s``);
    ConfigError if bad, a warning if a slow task could run twice."""
    seconds = load_settings().diagnostics_visibility_timeout_s
    if seconds <= TASK_TIME_LIMIT_S:
        log.warning("%s=%g is below the task time limit (%d s): a slow task may be run "
                    "twice (harmless: reports are published once)", VISIBILITY_TIMEOUT_ENV,
                    seconds, TASK_TIME_LIMIT_S)
    return seconds


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
        **celery_ssl_conf(broker_url),  # rediss://: verified TLS (see redis_url)
    )
    return app
