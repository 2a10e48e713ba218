"""The notifier's HTTP side: Alertmanager's webhook receiver, liveness and Prometheus metrics.

Alertmanager posts each group of alerts here; the fresh ones (not yet reported in the same
state) become one Telegram message per allowed chat. The answer tells Alertmanager whether
to retry: 200 when every chat got it, 202 when it is queued and still being retried by the
outbox, 503 (after forgetting the alerts, so the retry is not deduplicated away) when a
chat's delivery finally failed. A payload that does not parse is answered 422 with the
reason and logged: Alertmanager does not retry 4xx, and retrying would not help.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response, Security
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel

from services.notifier.alerts import AlertDeduplicator, AlertmanagerPayload, alerts_report
from services.notifier.config import WEBHOOK_PATH
from services.notifier.delivery import Outbox
from services.notifier.reports import Language

log = logging.getLogger(__name__)

DELIVERY_WAIT_S = 5.0  # well inside Alertmanager's default webhook timeout


class WebhookMetrics:
    """Alerts received, by status, and what became of them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter(
            "smart_tuner_notifier_alerts_received", "Alerts in Alertmanager notifications, "
            "by status and outcome (reported, duplicate)", ["status", "outcome"],
            registry=registry)
        self.invalid = Counter(
            "smart_tuner_notifier_alert_payloads_invalid",
            "Webhook bodies refused because they did not parse", registry=registry)
        for status in ("firing", "resolved"):
            for outcome in ("reported", "duplicate"):
                self.alerts.labels(status, outcome)


@dataclass
class WebhookContext:
    """What the webhook needs: where to send, in which language, and what it has sent."""

    outbox: Outbox
    chat_ids: tuple[int, ...]
    language: Language
    registry: CollectorRegistry
    token: bytes | None = field(default=None, repr=False)
    dedup: AlertDeduplicator = field(default_factory=AlertDeduplicator)
    metrics: WebhookMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = WebhookMetrics(self.registry)


class WebhookAnswer(BaseModel):
    """What happened to a notification."""

    status: Literal["delivered", "queued", "duplicate"]
    fresh: int
    duplicates: int


BEARER = HTTPBearer(auto_error=False, description="SMART_TUNER_NOTIFIER_WEBHOOK_TOKEN")
router = APIRouter()


def _context(request: Request) -> WebhookContext:
    return request.app.state.context


def _check_token(request: Request,
                 credentials: HTTPAuthorizationCredentials | None) -> None:
    token = _context(request).token
    if token is None:
        return
    if credentials is None:
        log.warning("webhook call without a bearer token from %s", request.client)
        raise HTTPException(401, detail="missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), token):
        log.warning("webhook call with a wrong bearer token from %s", request.client)
        raise HTTPException(403, detail="invalid bearer token")


@router.post(WEBHOOK_PATH, summary="Alertmanager webhook receiver",
             responses={200: {"model": WebhookAnswer}, 202: {"model": WebhookAnswer}})
async def receive(payload: AlertmanagerPayload, request: Request, response: Response,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Security(BEARER)] = None) -> WebhookAnswer:
    """Report the fresh alerts of one notification to every allowed chat."""
    _check_token(request, credentials)
    ctx = _context(request)
    fresh = ctx.dedup.fresh(payload)
    fresh_ids = {id(alert) for alert in fresh}
    for alert in payload.alerts:
        outcome = "reported" if id(alert) in fresh_ids else "duplicate"
        ctx.metrics.alerts.labels(alert.status, outcome).inc()
    duplicates = len(payload.alerts) - len(fresh)
    log.info("alertmanager group %s (%s): %d fresh, %d already reported", payload.group_key,
             payload.status, len(fresh), duplicates)
    if not fresh:
        return WebhookAnswer(status="duplicate", fresh=0, duplicates=duplicates)
    text = alerts_report(payload, fresh, ctx.language)
    futures = [ctx.outbox.send_text(chat_id, text) for chat_id in ctx.chat_ids]
    done, _ = await asyncio.wait(futures, timeout=DELIVERY_WAIT_S)
    if any(future in done and not future.result() for future in futures):
        ctx.dedup.forget(fresh)
        raise HTTPException(503, detail="Telegram delivery failed; retry later")
    if len(done) < len(futures):
        response.status_code = 202
        return WebhookAnswer(status="queued", fresh=len(fresh), duplicates=duplicates)
    return WebhookAnswer(status="delivered", fresh=len(fresh), duplicates=duplicates)


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """The notifier's HTTP side answers."""
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    """Every notifier series: deliveries, bot commands and refusals, alerts."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(_context(request).registry), media_type=content_type)


async def _on_invalid(request: Request, error: RequestValidationError) -> Response:
    if request.url.path == WEBHOOK_PATH:
        _context(request).metrics.invalid.inc()
        log.warning("refused a webhook body that does not parse: %s", error.errors()[:3])
    return await request_validation_exception_handler(request, error)


def create_app(ctx: WebhookContext) -> FastAPI:
    """The notifier's FastAPI app over ``ctx``."""
    app = FastAPI(title="Smart Tuner notifier", version="1",
                  description=(__doc__ or "").split("\n\n", 1)[1])
    app.state.context = ctx
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.include_router(router)
    if ctx.token is None:
        log.warning("no webhook token configured: the Alertmanager webhook is open")
    return app
