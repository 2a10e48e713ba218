"""The control API of the tuner: read a run's state over HTTP, send it commands.

Reads come straight from the run's Redis streams; a command is validated exactly as the
tuner's own (``schemas.Command`` and ``bounds.check_command``), written to the run's
``commands`` stream and, on request, followed until the trainer acks it. Mutating calls
need ``Authorization: Bearer <SMART_TUNER_API_TOKEN>``; with no token configured they are
all refused. The token is checked before a request's body is read, and bodies are capped
(``SMART_TUNER_API_MAX_BODY_BYTES``, 413 beyond it), so a stranger's huge POST costs
nothing. Drawn alignment pictures are cached per snapshot and their drawing is rate-limited
per client and in total (429 with ``Retry-After``).

Non-finite floats (a diverged gradient norm is a fact worth showing) are written as
``NaN``/``Infinity`` in responses, exactly as on the bus.

Run it with ``uvicorn --factory services.tuner.api:create_app_from_settings`` (or
``uvicorn services.tuner.api:app``, built from settings on first access).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, Literal, get_args

import redis
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    Security,
)
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from services.core.bounds import check_command
from services.core.bus import connect
from services.core.indicators import Verdict
from services.core.logging import setup_logging
from services.core.runstore import RunStore, RunSummary, StreamCounts
from services.core.schemas import (
    COMMAND_TTL_S,
    MAX_NOTE_CHARS,
    Ack,
    ActionRecord,
    AlignmentReport,
    Approval,
    AttentionSnapshot,
    Command,
    CommandAction,
    Event,
    MessageError,
    MetricsMessage,
    ProbeReport,
    decode,
)
from services.core.settings import ConfigError, get_settings
from services.core.streams import (
    RUN_ID_PATTERN,
    Stream,
)
from services.diagnostics.plots import render_snapshot
from services.tuner.limits import ApiLimits, PngCache, RenderLimiter

log = logging.getLogger(__name__)

API_TITLE = "Smart Tuner control API"
API_VERSION = "1"
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
RECENT_EVENTS = 10  # events in a run's state
MAX_WAIT_S = 30.0  # longest a POST may wait for the trainer's ack
MAX_EXPIRES_IN_S = 7 * 24 * 3600.0
REQUESTED_BY = "api"
PNG_MEDIA_TYPE = "image/png"
OUT_OF_BOUNDS = "out_of_bounds"  # the validation error type of a bounds rejection
COMMAND_ROUTE = "post_command"  # route name of POST /runs/{run_id}/commands
UNMATCHED_ROUTE = "<unmatched>"  # route label of requests no route matched
# Label values a client chooses are folded into OTHER_LABEL unless known, so no request can
# add a metric series (every series lives as long as the process).
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
OTHER_LABEL = "other"
# Methods that change nothing: no token needed, no body read.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STATUS_RANGE = range(100, 600)

RejectCause = Literal["disabled", "unauthenticated", "forbidden", "unknown_run", "invalid",
                      "out_of_bounds", "too_large"]

TAGS = [
    {"name": "health", "description": "Liveness of the API and its Redis, Prometheus metrics."},
    {"name": "runs", "description": "What a run is doing: read from its Redis streams."},
    {"name": "commands", "description": "Corrective commands for the trainer (bearer token)."},
]

# --------------------------------------------------------------------------- response models


class ErrorResponse(BaseModel):
    """An error, as FastAPI writes an HTTPException."""

    detail: str = Field(description="what went wrong, in one line")


class Health(BaseModel):
    """The API answers and reaches Redis."""

    status: Literal["ok"] = "ok"
    redis_latency_ms: float = Field(ge=0, description="round trip of a PING")


class RunOverview(BaseModel):
    """A run at a glance."""

    run_id: str
    verdict: Verdict | None = Field(
        description="the trainer's newest verdict on every success indicator (none before "
                    "its first evaluation): the one verdict every surface shows")
    latest_metrics: MetricsMessage | None
    latest_alignment: AlignmentReport | None
    latest_probes: ProbeReport | None = Field(
        description="inference probes of the newest probed checkpoint (the sixth indicator)")
    recent_events: list[Event] = Field(description=f"the last {RECENT_EVENTS}, newest last")
    counts: StreamCounts


class CommandRequest(BaseModel):
    """A command as a person sends it; the API fills in the rest of ``schemas.Command``."""

    model_config = ConfigDict(extra="forbid")

    action: CommandAction
    value: float | None = Field(
        default=None, description="required by set_* actions, refused by the others")
    reason_text: str = Field(default="", max_length=MAX_NOTE_CHARS,
                             description="why; recorded as the command's note")
    expires_in_s: float = Field(
        default=COMMAND_TTL_S, gt=0, le=MAX_EXPIRES_IN_S,
        description="the trainer drops the command if it has not applied it by then (the "
                    "default is every command's: the bot's and the tuner's too)")


class CommandAccepted(BaseModel):
    """A command written to the run's commands stream, and the trainer's ack if awaited."""

    command_id: str
    stream_id: str = Field(description="entry id in the commands stream")
    command: Command
    ack: Ack | None = Field(description="the trainer's ack, when it came within wait_s")


BODY_ERRORS = {413: {"model": ErrorResponse,
                     "description": "Body over SMART_TUNER_API_MAX_BODY_BYTES"}}
ERROR_404 = {404: {"model": ErrorResponse, "description": "Unknown run"}}
ERROR_503 = {503: {"model": ErrorResponse, "description": "Redis unreachable"}}
AUTH_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing bearer token"},
    403: {"model": ErrorResponse, "description": "Wrong bearer token"},
    503: {"model": ErrorResponse,
          "description": "No API token configured (mutating calls disabled), or Redis "
                         "unreachable"},
}


def _json_error(description: str, model: str = "ErrorResponse") -> dict[str, Any]:
    """An error response documented by reference to a schema that other routes list.

    For a route whose success is not JSON (FastAPI documents a ``model`` under the route's
    own media type) and to describe a 422 without losing FastAPI's own error schema.
    """
    schema = {"$ref": f"#/components/schemas/{model}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


class PngResponse(Response):
    """A PNG picture."""

    media_type = PNG_MEDIA_TYPE


class PrometheusResponse(Response):
    """A Prometheus exposition (text format unless OpenMetrics was negotiated)."""

    media_type = CONTENT_TYPE_PLAIN_0_0_4


# --------------------------------------------------------------------------- Redis access


# --------------------------------------------------------------------------- app context


class ApiMetrics:
    """The API's own Prometheus registry: requests and the fate of commands."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "smart_tuner_api_requests", "HTTP requests served, by route template and status",
            ["method", "route", "status"], registry=self.registry)
        self.commands_accepted = Counter(
            "smart_tuner_api_commands_accepted", "Commands written to a commands stream",
            ["action"], registry=self.registry)
        self.commands_rejected = Counter(
            "smart_tuner_api_commands_rejected", "Command (mutating) requests refused, by cause",
            ["cause"], registry=self.registry)
        self.png_renders = Counter(
            "smart_tuner_api_png_renders", "Alignment pictures drawn (cache misses)",
            registry=self.registry)
        self.png_limited = Counter(
            "smart_tuner_api_png_rate_limited", "Picture requests refused with 429",
            registry=self.registry)
        for action in get_args(CommandAction):  # every series exists from the start, at 0
            self.commands_accepted.labels(action)
        for cause in get_args(RejectCause):
            self.commands_rejected.labels(cause)


@dataclass(frozen=True)
class ApiContext:
    """What every request of one app shares (kept on ``app.state.context``)."""

    store: RunStore
    metrics: ApiMetrics
    token: bytes | None = field(repr=False)
    limits: ApiLimits = field(default_factory=ApiLimits)
    limiter: RenderLimiter | None = None
    pngs: PngCache | None = None


def get_context(request: Request) -> ApiContext:
    """The app's context (a dependency)."""
    return request.app.state.context


def get_store(request: Request) -> RunStore:
    """The app's Redis store (a dependency)."""
    return get_context(request).store


Store = Annotated[RunStore, Depends(get_store)]
RunIdPath = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="a run id",
                                examples=["ljspeech-base-1"])]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="how many, newest last")]


def refuse(request: Request, cause: RejectCause, reason: str) -> None:
    """Count and log a refused command request (the caller then answers the error)."""
    get_context(request).metrics.commands_rejected.labels(cause).inc()
    log.warning("command for run %s refused (%s): %s",
                request.path_params.get("run_id", "?"), cause, reason)


def known_run(run_id: RunIdPath, store: Store) -> str:
    """The path's run id, if the run is known (a dependency); 404 otherwise."""
    if not store.exists(run_id):
        raise HTTPException(404, detail=f"unknown run {run_id!r}")
    return run_id


KnownRun = Annotated[str, Depends(known_run)]
BEARER = HTTPBearer(auto_error=False, description="SMART_TUNER_API_TOKEN")


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
                  ) -> None:
    """Let a mutating call through only with the configured bearer token (a dependency)."""
    token = get_context(request).token
    if token is None:
        refuse(request, "disabled", "no API token configured")
        raise HTTPException(503, detail="mutating calls are disabled: no API token is "
                                        "configured (set SMART_TUNER_API_TOKEN)")
    if credentials is None:
        refuse(request, "unauthenticated", "no bearer token")
        raise HTTPException(401, detail="missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), token):
        refuse(request, "forbidden", "wrong bearer token")
        raise HTTPException(403, detail="invalid bearer token")


def _rejection(errors: list[dict[str, Any]]) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for errors found after the body parsed."""
    return RequestValidationError([{"type": e["type"], "loc": ("body", *e["loc"]),
                                    "msg": e["msg"]} for e in errors])


def _summary(errors: Any) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)


# --------------------------------------------------------------------------- endpoints
# Each asks the store and shapes the answer; rules live in schemas, bounds and the store.

router = APIRouter()


@router.get("/healthz", tags=["health"], summary="Liveness", responses=ERROR_503)
def healthz(store: Store) -> Health:
    """200 when the API answers and Redis replies to a PING, 503 otherwise."""
    return Health(redis_latency_ms=store.ping())


@router.get("/metrics", tags=["health"], summary="Prometheus metrics",
            response_class=PrometheusResponse,
            responses={200: {"description": "Prometheus text format (OpenMetrics if the "
                                            "Accept header asks for it)",
                             "content": {CONTENT_TYPE_PLAIN_0_0_4: {"schema": {"type": "string"}},
                                         OPENMETRICS_CONTENT_TYPE: {
                                             "schema": {"type": "string"}}}}})
def metrics(request: Request) -> PrometheusResponse:
    """Requests by route and status; commands accepted by action, refused by cause."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return PrometheusResponse(encoder(get_context(request).metrics.registry),
                              media_type=content_type)


@router.get("/runs", tags=["runs"], summary="List runs", responses=ERROR_503)
def list_runs(store: Store) -> list[RunSummary]:
    """Every run in the runs set, with its last step and its last event."""
    return store.summaries()


@router.get("/runs/{run_id}", tags=["runs"], summary="A run's state",
            responses=ERROR_404 | ERROR_503)
def run_overview(run_id: KnownRun, store: Store) -> RunOverview:
    """The trainer's newest verdict, newest metrics, newest alignment report, newest probe
    pass, the last few events, stream lengths."""
    return RunOverview(run_id=run_id, verdict=store.latest_verdict(run_id),
                    latest_metrics=store.latest(run_id, MetricsMessage),
                    latest_alignment=store.latest(run_id, AlignmentReport),
                    latest_probes=store.latest_probes(run_id),
                    recent_events=store.recent(run_id, Event, RECENT_EVENTS),
                    counts=store.counts(run_id))


@router.get("/runs/{run_id}/verdict", tags=["runs"], summary="The success indicators",
            responses={**ERROR_503, 404: {"model": ErrorResponse, "description":
                       "Unknown run, or no evaluation yet"}})
def run_verdict(run_id: KnownRun, store: Store) -> Verdict:
    """The trainer's newest verdict: each indicator's value, threshold, whether it is met
    and how it was measured; the step it was judged at and when all were first met."""
    verdict = store.latest_verdict(run_id)
    if verdict is None:
        raise HTTPException(404, f"run {run_id!r} has no verdict yet (no evaluation)")
    return verdict


@router.get("/runs/{run_id}/metrics", tags=["runs"], summary="Recent step metrics",
            responses=ERROR_404 | ERROR_503)
def run_metrics(run_id: KnownRun, store: Store,
                limit: Limit = DEFAULT_LIMIT) -> list[MetricsMessage]:
    """The last ``limit`` per-step metrics messages, newest last."""
    return store.recent(run_id, MetricsMessage, limit)


@router.get("/runs/{run_id}/diagnostics", tags=["runs"], summary="Recent alignment reports",
            responses=ERROR_404 | ERROR_503)
def run_diagnostics(run_id: KnownRun, store: Store,
                    limit: Limit = DEFAULT_LIMIT) -> list[AlignmentReport]:
    """The last ``limit`` alignment reports of the diagnostics worker, newest last."""
    return store.recent(run_id, AlignmentReport, limit)


@router.get("/runs/{run_id}/actions", tags=["runs"], summary="Recent tuner actions",
            responses=ERROR_404 | ERROR_503)
def run_actions(run_id: KnownRun, store: Store,
                limit: Limit = DEFAULT_LIMIT) -> list[ActionRecord]:
    """The last ``limit`` audit records (trigger → command → ack → effect), newest last."""
    return store.recent(run_id, ActionRecord, limit)


@router.get("/runs/{run_id}/events", tags=["runs"], summary="Recent events",
            responses=ERROR_404 | ERROR_503)
def run_events(run_id: KnownRun, store: Store, limit: Limit = DEFAULT_LIMIT) -> list[Event]:
    """The last ``limit`` lifecycle and health events, newest last."""
    return store.recent(run_id, Event, limit)


@router.get("/runs/{run_id}/acks", tags=["runs"], summary="Recent command acks",
            responses=ERROR_404 | ERROR_503)
def run_acks(run_id: KnownRun, store: Store, limit: Limit = DEFAULT_LIMIT) -> list[Ack]:
    """The trainer's last ``limit`` acks, newest last."""
    return store.recent(run_id, Ack, limit)


@router.get("/runs/{run_id}/alignment.png", tags=["runs"], summary="Latest alignment picture",
            response_class=PngResponse,
            responses={200: {"description": "The attention matrix of sample 0",
                             "content": {PNG_MEDIA_TYPE: {"schema": {"type": "string",
                                                                     "format": "binary"}}}},
                       404: _json_error("Unknown run, or no picture yet"),
                       429: _json_error("Too many pictures drawn: see Retry-After"),
                       503: _json_error(ERROR_503[503]["description"])})
def alignment_png(run_id: KnownRun, store: Store, request: Request) -> PngResponse:
    """The PNG the diagnostics worker stored; else sample 0 of the newest attention snapshot,
    drawn now (with its scores when the newest alignment report is of that snapshot).

    A drawn picture is cached per snapshot; drawing (0.3-0.5 s of CPU) is rate-limited per
    client and in total, 429 with ``Retry-After`` beyond.
    """
    png = store.stored_png(run_id)
    if png is None:
        png = _drawn_png(request, store, run_id)
    return PngResponse(png, headers={"Cache-Control": "no-store"})


def _drawn_png(request: Request, store: RunStore, run_id: str) -> bytes:
    """Sample 0 of the newest snapshot: from the cache, else drawn if the limits allow."""
    context = get_context(request)
    newest = store.newest_entry(run_id, Stream.ATTENTION)
    if newest is None:
        raise HTTPException(404, detail=f"no alignment picture for run {run_id!r} yet")
    entry_id, fields = newest
    report = store.latest(run_id, AlignmentReport)
    key = (run_id, entry_id, "" if report is None else report.snapshot_id)
    if context.pngs is not None and (png := context.pngs.get(key)) is not None:
        return png
    if context.limiter is not None:
        client = request.client.host if request.client else OTHER_LABEL
        wait = context.limiter.acquire(client)
        if wait is not None:
            context.metrics.png_limited.inc()
            raise HTTPException(429, detail="too many alignment pictures drawn; try later",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
    try:
        png = render_snapshot(decode(fields, AttentionSnapshot), report)
    except MessageError as error:
        raise HTTPException(404, detail=f"the newest attention snapshot of run "
                                        f"{run_id!r} does not decode: {error.reason}"
                            ) from error
    context.metrics.png_renders.inc()
    if context.pngs is not None:
        context.pngs.put(key, png)
    return png


@router.post("/runs/{run_id}/commands", name=COMMAND_ROUTE, tags=["commands"],
             summary="Send a command", status_code=202, dependencies=[Depends(require_token)],
             responses={200: {"model": CommandAccepted,
                              "description": "Written, and acked by the trainer within wait_s "
                                             "(the ack is in the body)"},
                        202: {"description": "Written to the run's commands stream; not acked "
                                           "yet, or not awaited"},
                        404: ERROR_404[404],
                        422: _json_error("Invalid command (unknown action, value missing or "
                                         "not taken, outside the trainer's bounds, bad expiry) "
                                         "or run id; each error's msg is the reason",
                                         "HTTPValidationError")} | AUTH_ERRORS
             | BODY_ERRORS)
def post_command(run_id: RunIdPath, body: CommandRequest, request: Request, response: Response,
                 store: Store, wait_s: Annotated[float, Query(
                     ge=0, le=MAX_WAIT_S, description="wait up to this long for the ack")] = 0.0,
                 ) -> CommandAccepted:
    """Validate a command as the tuner's are (the schema, then the trainer's bounds), write
    it to the run's commands stream, and, with ``wait_s``, wait for the trainer's ack.

    A command that fails validation is answered 422 with the reason and never written.
    """
    if not store.exists(run_id):
        refuse(request, "unknown_run", f"unknown run {run_id!r}")
        raise HTTPException(404, detail=f"unknown run {run_id!r}")
    expires_at = time.time() + body.expires_in_s
    try:
        command = Command(run_id=run_id, action=body.action, value=body.value, source="api",
                          requested_by=REQUESTED_BY, note=body.reason_text,
                          expires_at=expires_at)
    except ValidationError as error:
        raise _rejection(error.errors()) from error
    reason = check_command(command)
    if reason is not None:
        raise _rejection([{"type": OUT_OF_BOUNDS, "loc": ("value",), "msg": reason}])
    stream_id, ack = store.submit(command, wait_s)
    get_context(request).metrics.commands_accepted.labels(command.action).inc()
    log.info("command %s for run %s written: %s %s (%s)", command.command_id, run_id,
             command.action, command.value, command.note)
    if ack is not None:
        response.status_code = 200
    return CommandAccepted(command_id=command.command_id, stream_id=stream_id, command=command,
                           ack=ack)


class ApprovalRequest(BaseModel):
    """A person's answer to a tuner proposal (supervised mode), as sent to the API."""

    model_config = ConfigDict(extra="forbid")

    approved: bool = Field(description="true: send the proposed command; false: drop it")


class ApprovalAccepted(BaseModel):
    """The answer, written to the run's approvals stream; the tuner decides what it does."""

    stream_id: str = Field(description="entry id in the approvals stream")
    approval: Approval


@router.post("/runs/{run_id}/approvals/{action_id}", tags=["commands"],
             summary="Answer a proposal", status_code=202,
             dependencies=[Depends(require_token)],
             responses={404: {"model": ErrorResponse, "description": "Unknown run, or no "
                              "proposal of that id awaiting an answer"},
                        422: _json_error("Invalid body or ids", "HTTPValidationError")}
             | AUTH_ERRORS | BODY_ERRORS)
def post_approval(run_id: RunIdPath, action_id: Annotated[str, Path(
                      min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")],
                  body: ApprovalRequest, request: Request, store: Store) -> ApprovalAccepted:
    """Approve or reject a command the tuner proposed in supervised mode: the same path as
    the bot's buttons (the run's approvals stream), so the first answer from anywhere wins
    and a later one is recorded as ignored by the tuner."""
    if not store.exists(run_id):
        refuse(request, "unknown_run", f"unknown run {run_id!r}")
        raise HTTPException(404, detail=f"unknown run {run_id!r}")
    record = store.latest_action(run_id, action_id)
    if record is None or record.stage != "proposed":
        raise HTTPException(404, detail=f"no proposal {action_id!r} awaiting an answer in "
                                        f"run {run_id!r}")
    approval = Approval(run_id=run_id, action_id=action_id, approved=body.approved,
                        by=REQUESTED_BY)
    stream_id = store.answer(approval)
    log.info("proposal %s of run %s %s via the API", action_id, run_id,
             "approved" if body.approved else "rejected")
    return ApprovalAccepted(stream_id=stream_id, approval=approval)


# --------------------------------------------------------------------------- the app


def method_label(method: str) -> str:
    """The method as a label: a standard one, else OTHER_LABEL (clients invent methods)."""
    return method if method in KNOWN_METHODS else OTHER_LABEL


def status_label(status: int) -> str:
    """The status as a label (an HTTP status code, else OTHER_LABEL)."""
    return str(status) if status in STATUS_RANGE else OTHER_LABEL


def route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The template of the route that served (or would serve) the request, never the raw
    path; UNMATCHED_ROUTE when none matches."""
    route = scope.get("route")
    if route is None:  # answered before routing (the guard): find the route it was for
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path", UNMATCHED_ROUTE)


class RequestMetricsMiddleware:
    """Count every HTTP request by method, route template (not raw path) and status; every
    label a client influences is bounded (method_label, route_label, status_label)."""

    def __init__(self, app: ASGIApp, counter: Counter, routes: Sequence[BaseRoute] = ()):
        self.app = app
        self.counter = counter
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, noting the status it was answered with."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_noting_status(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.counter.labels(method_label(scope["method"]), route_label(scope, self.routes),
                                status_label(status)).inc()


def bearer_refusal(authorization: str | None, token: bytes | None
                   ) -> tuple[int, RejectCause, str] | None:
    """Why a mutating request with this Authorization header is refused (status, cause,
    detail), or None when it carries the token. The same answers as ``require_token``."""
    if token is None:
        return 503, "disabled", ("mutating calls are disabled: no API token is configured "
                                 "(set SMART_TUNER_API_TOKEN)")
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return 401, "unauthenticated", "missing bearer token"
    if not hmac.compare_digest(credentials.strip().encode("utf-8", "surrogateescape"), token):
        return 403, "forbidden", "invalid bearer token"
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            # Raw bytes; surrogateescape keeps any byte, so the token compare sees them all.
            return value.decode("utf-8", "surrogateescape")
    return None


class MutationGuardMiddleware:
    """Before a mutating request's body is read: check its bearer token, then its size.

    A refused request is answered at once, its body never read (the server closes the
    connection rather than drain it). An admitted body is read here, at most
    ``max_body_bytes`` of it whatever Content-Length or chunking says (413 beyond), and
    handed on. ``require_token`` still guards each mutating route behind this.
    """

    def __init__(self, app: ASGIApp, token: bytes | None, max_body_bytes: int,
                 on_refuse: Callable[[RejectCause, str], None]):
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse, or pass the request on with its (bounded) body."""
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        refusal = bearer_refusal(_header(scope, b"authorization"), self.token)
        if refusal is not None:
            status, cause, detail = refusal
            self.on_refuse(cause, f"{scope['method']} {scope['path']!r}: {detail}")
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            await _answer(send, status, detail, headers)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._too_large(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> AsgiMessage:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        detail = f"request body over {self.max_body_bytes} bytes"
        self.on_refuse("too_large", f"{scope['method']} {scope['path']!r}: {detail}")
        await _answer(send, 413, detail, {})


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    """A JSON error as an HTTPException's, closing the connection (its body is unread)."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close"),
           *((name.lower().encode(), value.encode()) for name, value in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _on_validation_error(request: Request, error: RequestValidationError) -> Response:
    """FastAPI's own 422, after counting and logging it when it refuses a command."""
    if getattr(request.scope.get("route"), "name", None) == COMMAND_ROUTE:
        errors = error.errors()
        cause = "out_of_bounds" if any(e["type"] == OUT_OF_BOUNDS for e in errors) else "invalid"
        refuse(request, cause, _summary(errors))
    return await request_validation_exception_handler(request, error)


async def _on_redis_down(request: Request, error: Exception) -> Response:
    """503 instead of a stack trace while Redis is unreachable."""
    log.warning("%s %s: Redis unreachable: %s", request.method, request.url.path, error)
    return JSONResponse({"detail": f"Redis unreachable: {error}"}, status_code=503)


def create_app(client: redis.Redis, api_token: str | None,
               limits: ApiLimits | None = None) -> FastAPI:
    """The control API over ``client``; an empty or missing ``api_token`` disables commands."""
    app = FastAPI(title=API_TITLE, version=API_VERSION, openapi_tags=TAGS,
                  description=(__doc__ or "").split("\n\n", 1)[1])
    metrics = ApiMetrics()
    limits = limits or ApiLimits()
    token = api_token.encode() if api_token else None
    app.state.context = ApiContext(
        RunStore(client), metrics, token, limits,
        RenderLimiter(limits.renders_per_client, limits.renders_total, limits.render_window_s,
                      limits.max_tracked_clients),
        PngCache(limits.png_cache_entries))
    if not api_token:
        log.warning("no API token configured: every command request will be refused")

    def on_refuse(cause: RejectCause, reason: str) -> None:
        metrics.commands_rejected.labels(cause).inc()
        log.warning("request refused (%s): %s", cause, reason)

    # Added last runs first: the metrics see every answer, the guard's refusals too.
    app.add_middleware(MutationGuardMiddleware, token=token,
                       max_body_bytes=limits.max_body_bytes, on_refuse=on_refuse)
    app.add_middleware(RequestMetricsMiddleware, counter=metrics.requests,
                       routes=app.router.routes)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    for error in (redis.ConnectionError, redis.TimeoutError):
        app.add_exception_handler(error, _on_redis_down)
    app.include_router(router)
    return app


def create_app_from_settings() -> FastAPI:
    """The control API as configured by the environment (``uvicorn --factory`` target)."""
    settings = get_settings()
    setup_logging(settings.log_level)
    if settings.redis_url is None:
        raise ConfigError("the control API needs SMART_TUNER_REDIS_URL")
    token = settings.api_token.get_secret_value() if settings.api_token else None
    return create_app(connect(settings.redis_url), token, ApiLimits.from_settings(settings))


@lru_cache(maxsize=1)
def _default_app() -> FastAPI:
    return create_app_from_settings()


def __getattr__(name: str) -> Any:
    """``app``: the app built from settings on first access (``uvicorn ...api:app``)."""
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
