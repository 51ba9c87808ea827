"""The verifier's HTTP API (FastAPI on uvicorn): the session API, centralized mode, health and metrics.

`create_app(runtime)` builds the app around an already loaded model; `wisp-cloud serve` builds the
runtime from settings and runs uvicorn. Every refusal is a JSON body
``{"error": {"message", "type", "code", ...}}`` with a 4xx/5xx status, plus ``Retry-After`` on
429/503, so clients can tell a bad request from an overload from an evicted session.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from wisp_cloud.api_schemas import ErrorReply, SessionCreate, SessionCreated, VerifyBlock, VerifyReply
from wisp_cloud.openai_api import build_router
from wisp_cloud.service import ServiceError, VerifierService
from wisp_edge.openai_compat import ApiError, TextModel, error_body
from wisp_edge.sampling import SamplingParams

log = logging.getLogger("wisp.server")

ERRORS = {code: {"model": ErrorReply} for code in (401, 404, 409, 410, 413, 422, 429, 503)}


def _error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, **extra), status_code=status, headers=headers)


def create_app(service: VerifierService, text_model: TextModel, tokenizer, *, api_key: str | None = None) -> FastAPI:
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

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            service.metrics.rejected.labels("auth").inc()
            raise ServiceError(401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.exception_handler(ApiError)
    async def service_error(request: Request, exc: ApiError):
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(exc.status, exc.code, exc.message, headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        service.metrics.rejected.labels("invalid").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}" if where else
                      first.get("msg", "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "not_found" if exc.status_code == 404 else "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        service.metrics.http.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    # --- operations --------------------------------------------------------------------------------

    @app.get("/health", tags=["operations"], summary="200 when the batch loop runs")
    async def health():
        if not service.running:
            return _error(503, "not_ready", "the batch loop is not running", {"Retry-After": "1"})
        return {"status": "ok", **service.status()}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (series prefixed wisp_)")
    async def metrics():
        service.metrics.kv_used.set(service.pool.used_bytes)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # --- the session API ---------------------------------------------------------------------------

    sessions = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_key)],
                         responses=ERRORS)

    @sessions.post("", response_model=SessionCreated, status_code=201,
                   summary="Open a session: prefill the prompt, reply with the target's first token")
    async def create_session(body: SessionCreate):
        s = body.sampling
        try:
            params = SamplingParams(s.temperature, s.top_k, s.top_p, s.seed)
        except ValueError as exc:
            raise ServiceError(422, "invalid_request", str(exc)) from None
        session, first, timing = await service.create_session(
            body.prompt_ids, params, slo_rate=body.slo_tokens_per_s, vocab_fingerprint=body.vocab_fingerprint,
            resume=body.resume)
        return SessionCreated(session_id=session.id, first_token=first, position=session.target.position,
                              queue_ms=timing.get("queue_ms", 0.0), prefill_ms=timing.get("verify_ms", 0.0),
                              vocab_fingerprint=service.vocab_fingerprint, max_draft=service.settings.max_draft)

    @sessions.post("/{session_id}/verify", response_model=VerifyReply,
                   summary="Verify a draft block; retrying a round id returns the same answer")
    async def verify(session_id: str, body: VerifyBlock):
        q = None if body.q is None else [(d.ids, d.probs) for d in body.q]
        return await service.verify(session_id, position=body.position, round_id=body.round_id,
                                    draft=body.draft_ids, q=q, drafting_ms=body.drafting_ms, rtt_ms=body.rtt_ms)

    @sessions.delete("/{session_id}", status_code=204, summary="Close a session and free its KV")
    async def close_session(session_id: str):
        if not service.close(session_id):
            service.get(session_id)  # raises 404/410 with the reason
        return Response(status_code=204)

    app.include_router(sessions)
    app.include_router(build_router(service, text_model, tokenizer), dependencies=[Depends(require_key)], responses=ERRORS)

    @app.get("/v1/info", tags=["sessions"], dependencies=[Depends(require_key)],
             summary="What an edge needs before opening sessions")
    async def info():
        return {"model": text_model.model_id, "vocab_size": text_model.vocab_size,
                "vocab_fingerprint": service.vocab_fingerprint, "max_seq_len": text_model.max_seq_len,
                "max_draft": service.settings.max_draft, "policy": service.settings.policy,
                "eos_token_ids": sorted(service.eos_ids),
                "chat_template": text_model.chat_template[0] if text_model.chat_template else None,
                "bos_token": text_model.chat_template[1] if text_model.chat_template else None,
                "eos_token": text_model.chat_template[2] if text_model.chat_template else None}

    return app
