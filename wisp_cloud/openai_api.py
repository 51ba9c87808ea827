"""Centralized mode: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, decoded on the server.

The paper's main baseline and the path for devices without a drafter. Each request is a session
whose decode steps are scheduled like verify blocks, so they share batches with speculative
sessions (continuous batching over one model and one KV pool). Text prompts are tokenized as the
model's own tokenizer does by default (as vLLM does); chat messages go through the model's chat
template. `temperature: 0` is greedy. The request/response format is `wisp_edge/wire/openai.py`,
shared with the edge agent's local API. A client that hangs up stops its decoding within a few tokens,
so an abandoned request does not keep the accelerator busy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from wisp_cloud.service import VerifierService
from wisp_edge.wire.errors import ApiError
from wisp_edge.wire.openai import ChatRequest, CompletionRequest, TextModel, as_response, models_reply, respond
from wisp_edge.wire.protocol import MAX_SLO

DISCONNECT_CHECK_EVERY = 4  # tokens between looks at whether the client is still there


def build_router(service: VerifierService, text_model: TextModel, tokenizer) -> APIRouter:
    router = APIRouter(tags=["openai"])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def encode(text: str, **kwargs) -> list[int]:
        try:
            return tokenizer.encode(text, **kwargs).ids
        except (TypeError, ValueError) as exc:  # e.g. a lone UTF-16 surrogate, which JSON can carry
            raise ApiError(400, "invalid_request", f"the prompt is not valid Unicode text ({exc})") from None

    def tokens_for(prompt_ids: list[int], body, request: Request):
        # The shared request model (wisp_edge.wire.openai) admits what the edge can sample; the
        # server also refuses what would overflow its scheduler's arithmetic.
        sampling = body.sampling()  # before anything else: a too small temperature is a 400
        if body.slo_tokens_per_s is not None and body.slo_tokens_per_s > MAX_SLO:
            raise ApiError(400, "invalid_request", f"slo_tokens_per_s {body.slo_tokens_per_s:g} is above {MAX_SLO:g}")

        async def watched(max_tokens: int) -> AsyncIterator[int]:
            tokens = service.decode(prompt_ids, sampling, max_tokens=max_tokens,
                                    slo_rate=body.slo_tokens_per_s)
            try:
                produced = 0
                async for token in tokens:
                    yield token
                    produced += 1
                    if produced % DISCONNECT_CHECK_EVERY == 0 and await request.is_disconnected():
                        return
            finally:
                await tokens.aclose()

        return watched

    @router.post("/v1/completions", summary="Complete a text prompt, decoded on the server")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            prompt_ids = encode(body.prompt)  # the tokenizer's own default special tokens
            echo = body.prompt if body.echo else ""
        else:
            prompt_ids = list(body.prompt)
            text_model.check(body, prompt_ids)  # ids in the vocabulary before they are decoded
            echo = decode(prompt_ids) if body.echo else ""
        return as_response(await respond("text", body, prompt_ids, text_model, tokens_for(prompt_ids, body, request),
                                         decode, echo_text=echo))

    @router.post("/v1/chat/completions", summary="Answer a conversation with the model's chat template")
    async def chat_completions(body: ChatRequest, request: Request):
        text = text_model.render_chat([m.model_dump() for m in body.messages])
        prompt_ids = encode(text, add_special_tokens=False)
        return as_response(await respond("chat", body, prompt_ids, text_model, tokens_for(prompt_ids, body, request),
                                         decode))

    @router.get("/v1/models", summary="The served model")
    async def models():
        return models_reply(text_model)

    return router
