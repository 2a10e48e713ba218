"""The notifier's HTTP side: Alertmanager's webhook receiver, liveness and Prometheus metrics.

Alertmanager posts each group of alerts here; the fresh ones (not yet reported in the same
state) become one Telegram message per allowed chat. The answer tells Alertmanager whether
to retry: 200 when every chat got it, 202 when it is queued and still being retried by the
outbox, 503 (after forgetting the alerts, so the retry is not deduplicated away) when a
chat's delivery finally failed. A payload that does not parse is answered 422 with the
reason and logged: Alertmanager does not retry 4xx, and retrying would not help.

The bearer token is checked before a byte of the body is read, and the body is read in
pieces up to ``max_body_bytes`` (413 beyond it, also when Content-Length announces more):
a stranger's large POST costs neither memory nor parsing.
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
from pydantic import BaseModel, ValidationError

from services.notifier.alerts import AlertDeduplicator, AlertmanagerPayload, alerts_report
from services.notifier.config import WEBHOOK_MAX_BODY_BYTES, WEBHOOK_PATH
from services.notifier.delivery import Outbox
from services.notifier.reports import Language

log = logging.getLogger(__name__)

DELIVERY_WAIT_S = 5.0  # well inside Alertmanager's default webhook timeout
PREVIEW_BYTES = 200  # how much of a refused body a validation error keeps


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
        self.too_large = Counter(
            "smart_tuner_notifier_alert_payloads_too_large",
            "Webhook bodies refused unread (413) because they exceed the size cap",
            registry=registry)
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
    max_body_bytes: int = WEBHOOK_MAX_BODY_BYTES
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


def _too_large(ctx: WebhookContext, request: Request, size: str) -> HTTPException:
    ctx.metrics.too_large.inc()
    log.warning("refused a webhook body of %s from %s: over the %d-byte cap", size,
                request.client, ctx.max_body_bytes)
    return HTTPException(413, detail=f"body over {ctx.max_body_bytes} bytes")


async def _read_body(ctx: WebhookContext, request: Request) -> bytes:
    """The body, read piece by piece and never past the cap; 413 once it is over."""
    announced = request.headers.get("content-length")
    if announced is not None and announced.isascii() and announced.isdigit() \
            and int(announced) > ctx.max_body_bytes:
        raise _too_large(ctx, request, f"{announced} bytes (announced)")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > ctx.max_body_bytes:
            raise _too_large(ctx, request, f"over {len(body)} bytes (still coming)")
    return bytes(body)


async def _payload(ctx: WebhookContext, request: Request) -> AlertmanagerPayload:
    """The body parsed as Alertmanager's payload; 413 or 422 (as FastAPI would) if not."""
    body = await _read_body(ctx, request)
    try:
        return AlertmanagerPayload.model_validate_json(body)
    except ValidationError as error:
        errors = [{**item, "loc": ("body", *item["loc"])}
                  for item in error.errors(include_url=False)]
        raise RequestValidationError(errors, body=body[:PREVIEW_BYTES]) from error


@router.post(WEBHOOK_PATH, summary="Alertmanager webhook receiver",
             responses={200: {"model": WebhookAnswer}, 202: {"model": WebhookAnswer},
                        413: {"description": "the body is over the size cap"}},
             openapi_extra={"requestBody": {"required": True, "description": (
                 "Alertmanager's webhook payload (version 4), read only after the token "
                 "is checked and only up to the size cap"),
                 "content": {"application/json": {"schema": {"type": "object"}}}}})
async def receive(request: Request, response: Response,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Security(BEARER)] = None) -> WebhookAnswer:
    """Report the fresh alerts of one notification to every allowed chat."""
    # The body is not a parameter: FastAPI would read and parse all of it before this
    # function, and so before the token is checked.
    _check_token(request, credentials)
    ctx = _context(request)
    payload = await _payload(ctx, request)
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
