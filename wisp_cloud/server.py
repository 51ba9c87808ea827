"""The verifier's HTTP API (FastAPI on uvicorn): the session API, centralized mode, health and metrics.

`create_app(service, text_model, tokenizer, access=...)` builds the app around an already loaded
model; `wisp-cloud serve` builds the runtime from settings and runs uvicorn. The same app fronts a fleet
of replicas on Ray Serve (`cluster/`), given a `FleetService` with the service's methods. Every request first
passes the access gate (`access.py`: API keys, per-key rate limit, body size and time), so no
handler runs and no body is read for a caller without a key. Every refusal is a JSON body
``{"error": {"message", "type", "code", ...}}`` with a 4xx/5xx status, plus ``Retry-After`` on
429/503, so clients can tell a bad request from an overload from an evicted session.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from wisp_cloud.access import AccessGate, AccessPolicy, KeyRing
from wisp_cloud.openai_api import build_router
from wisp_cloud.service import VerifierService
from wisp_edge.wire.errors import ApiError, ErrorReply, error_body
from wisp_edge.wire.openai import TextModel
from wisp_edge.wire.protocol import SessionStart, SessionStarted, VerifyBlock, VerifyReply

log = logging.getLogger("wisp.server")

ERRORS = {code: {"model": ErrorReply} for code in (400, 401, 404, 408, 409, 410, 413, 422, 429, 503)}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
EXTRA_FIELD = "Extra inputs are not permitted"
REPLICA_HEADER = "x-wisp-replica"


def _error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, **extra), status_code=status, headers=headers)


async def _settled(value):
    """A service answers in place (`VerifierService`) or after a call to a replica (`cluster.FleetService`)."""
    return await value if inspect.isawaitable(value) else value


class ServedBy:
    """Adds `x-wisp-replica: <id>` to every answer (outermost, so refusals by the gate carry it too)."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def _key_of(request: Request) -> str | None:
    """The caller's key id, set by the access gate (None when the server runs without keys)."""
    return getattr(request.state, "key_id", None)


def create_app(service: VerifierService, text_model: TextModel, tokenizer, *, api_key: str | None = None,
               access: AccessPolicy | None = None, served_by: str | None = None) -> FastAPI:
    """`access` carries the keys and limits; `api_key` alone is a shorthand for one key and default limits.
    `served_by`: a replica's id, sent back in an `x-wisp-replica` header on every answer (a fleet's operator
    and tests see which replica answered)."""
    if access is None:
        access = AccessPolicy(KeyRing([api_key] if api_key else []))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="WISP verifier", version="0.1.0", lifespan=lifespan,
                  description="Batched lossless verification of edge drafts, and centralized OpenAI-compatible "
                              "decoding, over one target model.")
    app.add_middleware(AccessGate, policy=access, refused=lambda reason: service.metrics.rejected.labels(reason).inc(),
                       served=lambda route, status: service.metrics.http.labels(route, str(status)).inc())
    if served_by:
        app.add_middleware(ServedBy, replica=served_by)
    # Declares the bearer key in the OpenAPI schema; the gate has already enforced it.
    keyed = [Security(HTTPBearer(auto_error=False))] if access.keys.enabled else []

    @app.exception_handler(ApiError)
    async def service_error(request: Request, exc: ApiError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after else None
        return _error(exc.status, exc.code, exc.message, headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        service.metrics.rejected.labels("invalid").inc()
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            position = first.get("loc", ("body", "?"))[-1]
            return _error(422, "invalid_json", f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')} "
                                               f"at character {position}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        # The session bodies are pydantic dataclasses: an unknown field reads as it does for a model.
        unknown_field = first.get("type") == "unexpected_keyword_argument"
        reason = EXTRA_FIELD if unknown_field else first.get("msg", "invalid request")
        return _error(422, "invalid_request", f"{where}: {reason}" if where else reason)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                      getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    # --- operations --------------------------------------------------------------------------------

    @app.get("/health", tags=["operations"], summary="200 when the batch loop runs (no key needed; details with one)")
    async def health(request: Request):
        if not service.running:
            return _error(503, "not_ready", "the batch loop is not running", {"Retry-After": "1"})
        if access.keys.enabled and _key_of(request) is None:
            return {"status": "ok"}
        return {"status": "ok", **(await _settled(service.status()))}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (series prefixed wisp_)",
             dependencies=keyed, response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, 401: {"model": ErrorReply}})
    async def metrics():
        return Response(await _settled(service.render_metrics()), media_type=CONTENT_TYPE_LATEST)

    # --- the session API ---------------------------------------------------------------------------

    sessions = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=keyed, responses=ERRORS)

    @sessions.post("", response_model=SessionStarted, status_code=201,
                   summary="Open a session: prefill the prompt, reply with the target's first token")
    async def create_session(body: SessionStart, request: Request):
        return await service.create_session(
            body.prompt_ids, body.sampling, slo_rate=body.slo_tokens_per_s, vocab_fingerprint=body.vocab_fingerprint,
            resume=body.resume, owner=_key_of(request))

    @sessions.post("/{session_id}/verify", response_model=VerifyReply,
                   summary="Verify a draft block; retrying a round id returns the same answer")
    async def verify(session_id: str, body: VerifyBlock, request: Request):
        return await service.verify(session_id, owner=_key_of(request), position=body.position, round_id=body.round_id,
                                    draft=body.draft_ids, q=body.q, drafting_ms=body.drafting_ms, rtt_ms=body.rtt_ms)

    @sessions.delete("/{session_id}", status_code=204, summary="Close a session and free its KV")
    async def close_session(session_id: str, request: Request):
        await _settled(service.close(session_id, owner=_key_of(request)))  # 404/410 with the reason, or another key's session
        return Response(status_code=204)

    app.include_router(sessions)
    app.include_router(build_router(service, text_model, tokenizer), dependencies=keyed, responses=ERRORS)

    @app.get("/v1/info", tags=["sessions"], dependencies=keyed, responses=ERRORS,
             summary="What an edge needs before opening sessions")
    async def info():
        return {"model": text_model.model_id, "vocab_size": text_model.vocab_size,
                "max_seq_len": text_model.max_seq_len, **service.info(),
                "chat_template": text_model.chat_template[0] if text_model.chat_template else None,
                "bos_token": text_model.chat_template[1] if text_model.chat_template else None,
                "eos_token": text_model.chat_template[2] if text_model.chat_template else None}

    return app
