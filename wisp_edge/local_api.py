"""`wisp-edge serve`: a local OpenAI-compatible API on the device, for other programs to call.

`/v1/completions` and `/v1/chat/completions` (streaming by SSE) run the edge agent's speculative
engine: drafted here, verified by the WISP server. The drafter serves one generation at a time;
up to `max_waiting` more wait their turn, beyond that 429 with Retry-After. `/health` answers 200
once the verifier has been reached, `/metrics` exposes the `wisp_edge_*` counters.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wisp_edge.agent import EdgeAgent
from wisp_edge.client import VerifierError
from wisp_edge.wire.errors import ApiError, error_body
from wisp_edge.wire.openai import ChatRequest, CompletionRequest, as_response, models_reply, respond

log = logging.getLogger("wisp.edge.api")


def create_app(agent: EdgeAgent) -> FastAPI:
    app = FastAPI(title="WISP edge agent", version="0.1.0",
                  description="OpenAI-compatible completions drafted on this device and verified by a WISP server.")
    waiting = {"n": 0}
    turn = asyncio.Lock()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
        return JSONResponse(error_body(exc.status, exc.code, exc.message, **exc.extra), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}"), 422)

    def tokens_for(prompt_ids: list[int], body):
        params = body.sampling()  # a bad temperature is a 400 before the request waits its turn

        async def run(max_tokens: int):
            if waiting["n"] > agent.settings.max_waiting:
                raise ApiError(429, "busy", f"{waiting['n']} requests are waiting for the drafter", retry_after=1)
            waiting["n"] += 1
            try:
                await turn.acquire()
            finally:
                waiting["n"] -= 1
            try:
                async for token in agent.agenerate(prompt_ids, max_new_tokens=max_tokens, params=params):
                    yield token
            finally:
                turn.release()
        return run

    def decode(ids: list[int]) -> str:
        return agent.detokenize(ids)

    async def served_model():
        try:
            return agent.text_model() if agent.info else await asyncio.to_thread(agent.text_model)
        except VerifierError as exc:
            raise ApiError(503, "verifier_unreachable", str(exc), retry_after=5) from None

    @app.get("/health")
    async def health():
        try:
            info = agent.info or await asyncio.to_thread(agent.connect)
        except Exception as exc:  # unreachable verifier: not ready, with the reason
            return JSONResponse(error_body(503, "verifier_unreachable", str(exc)), 503, headers={"Retry-After": "1"})
        return {"status": "ok", "verifier": agent.settings.server, "model": info["model"],
                "drafter": agent.drafter.name, "policy": agent.settings.policy}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(agent.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return models_reply(await served_model())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        text_model = await served_model()
        prompt_ids = agent.tokenize(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        echo = (body.prompt if isinstance(body.prompt, str) else decode(prompt_ids)) if body.echo else ""
        return as_response(await respond("text", body, prompt_ids, text_model, tokens_for(prompt_ids, body), decode,
                                         echo_text=echo))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        text_model = await served_model()
        prompt_ids = agent.tokenize(text_model.render_chat([m.model_dump() for m in body.messages]))
        return as_response(await respond("chat", body, prompt_ids, text_model, tokens_for(prompt_ids, body), decode))

    return app
