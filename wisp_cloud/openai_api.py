"""Centralized mode: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, decoded on the server.

The paper's main baseline and the path for devices without a drafter. Each request is a session
whose decode steps are scheduled like verify blocks, so they share batches with speculative
sessions (continuous batching over one model and one KV pool). Text prompts are tokenized as the
model's own tokenizer does by default (as vLLM does); chat messages go through the model's chat
template. `temperature: 0` is greedy. The request/response format is `wisp_edge/openai_compat.py`,
shared with the edge agent's local API.
"""

from __future__ import annotations

from fastapi import APIRouter

from wisp_cloud.service import VerifierService
from wisp_edge.openai_compat import ChatRequest, CompletionRequest, TextModel, models_reply, respond


def build_router(service: VerifierService, text_model: TextModel, tokenizer) -> APIRouter:
    router = APIRouter(tags=["openai"])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def tokens_for(prompt_ids: list[int], body):
        return lambda max_tokens: service.decode(prompt_ids, body.sampling(), max_tokens=max_tokens,
                                                 slo_rate=body.slo_tokens_per_s)

    @router.post("/v1/completions", summary="Complete a text prompt, decoded on the server")
    async def completions(body: CompletionRequest):
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer.encode(body.prompt).ids  # the tokenizer's own default special tokens
            echo = body.prompt if body.echo else ""
        else:
            prompt_ids = list(body.prompt)
            echo = decode(prompt_ids) if body.echo else ""
        return await respond("text", body, prompt_ids, text_model, tokens_for(prompt_ids, body), decode,
                             echo_text=echo)

    @router.post("/v1/chat/completions", summary="Answer a conversation with the model's chat template")
    async def chat_completions(body: ChatRequest):
        text = text_model.render_chat([m.model_dump() for m in body.messages])
        prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
        return await respond("chat", body, prompt_ids, text_model, tokens_for(prompt_ids, body), decode)

    @router.get("/v1/models", summary="The served model")
    async def models():
        return models_reply(text_model)

    return router
