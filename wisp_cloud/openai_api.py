"""Centralized mode: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, decoded on the server.

The paper's main baseline and the path for devices without a drafter. Each request is a session
whose decode steps are scheduled like verify blocks, so they share batches with speculative
sessions (continuous batching over one model and one KV pool). Text prompts are tokenized as the
model's own tokenizer does by default (as vLLM does); chat messages go through the model's chat
template. `temperature: 0` is greedy.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from wisp_cloud.api_schemas import ChatRequest, CompletionRequest
from wisp_cloud.service import ServiceError, VerifierService
from wisp_cloud.text import IncrementalDecoder, StopMatcher
from wisp_edge.chat import render_chat
from wisp_edge.sampling import SamplingParams


class TextModel:
    """What the endpoints need to know about the served model besides the service."""

    def __init__(self, model_id: str, tokenizer, chat_template: tuple[str, str, str] | None, max_seq_len: int,
                 vocab_size: int) -> None:
        self.model_id, self.tokenizer, self.chat_template = model_id, tokenizer, chat_template
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size

    def render_chat(self, messages: list[dict]) -> str:
        if self.chat_template is None:
            raise ServiceError(400, "no_chat_template", f"model {self.model_id} has no chat template; "
                                                        "use /v1/completions")
        template, bos, eos = self.chat_template
        return render_chat(template, messages, bos_token=bos, eos_token=eos)


def _params(body) -> SamplingParams:
    return SamplingParams(body.temperature, body.top_k, body.top_p, body.seed)


def _check_model(text_model: TextModel, name: str) -> None:
    if name not in (text_model.model_id, "default"):
        raise ServiceError(404, "model_not_found", f"model {name!r} is not served here; "
                                                   f"use {text_model.model_id!r} or 'default'")


def _budget(text_model: TextModel, prompt_ids: list[int], max_tokens: int | None) -> int:
    room = text_model.max_seq_len - len(prompt_ids)
    if room < 1:
        raise ServiceError(400, "context_length_exceeded", f"the prompt has {len(prompt_ids)} tokens; this model's "
                                                           f"context is {text_model.max_seq_len}")
    if max_tokens is not None and max_tokens > room:
        raise ServiceError(400, "context_length_exceeded", f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} "
                                                           f"exceed the context of {text_model.max_seq_len}")
    return max_tokens if max_tokens is not None else room


async def _generate_text(service: VerifierService, text_model: TextModel, prompt_ids: list[int], body,
                         max_tokens: int) -> AsyncIterator[tuple[str, str | None, int]]:
    """Yields (text delta, finish reason or None, tokens so far); the last item carries the reason."""
    try:
        stops = body.stops()
    except ValueError as exc:
        raise ServiceError(400, "invalid_request", str(exc)) from None
    decoder, matcher = IncrementalDecoder(text_model.tokenizer), StopMatcher(stops)
    produced, reason, hit = 0, "length", False
    tokens = service.decode(prompt_ids, _params(body), max_tokens=max_tokens, slo_rate=body.slo_tokens_per_s)
    try:
        async for token in tokens:
            produced += 1
            if token in service.eos_ids:
                reason = "stop"
                break
            out, hit = matcher.feed(decoder.push(token))
            if out:
                yield out, None, produced
            if hit:
                reason = "stop"
                break
    finally:
        await tokens.aclose()
    if not hit:
        out, hit = matcher.feed(decoder.flush())
        if out:
            yield out, None, produced
        reason = "stop" if hit else reason
    yield ("" if hit else matcher.finish()), reason, produced


def _sse(payload: dict) -> str:
    """One server-sent event as OpenAI streams them: a `data:` line of JSON and a blank line."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def build_router(service: VerifierService, text_model: TextModel) -> APIRouter:
    router = APIRouter(tags=["openai"])

    def completion_chunk(kind: str, rid: str, created: int, delta: str, reason, *, role: bool = False) -> dict:
        if kind == "chat":
            d = {"role": "assistant", "content": delta} if role else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": text_model.model_id,
                    "choices": [choice]}
        return {"id": rid, "object": "text_completion", "created": created, "model": text_model.model_id,
                "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]}

    async def respond(kind: str, prompt_ids: list[int], body, echo_text: str = ""):
        _check_model(text_model, body.model)
        bad = [t for t in prompt_ids if not 0 <= t < text_model.vocab_size]
        if bad:
            raise ServiceError(400, "invalid_request", f"prompt token id {bad[0]} is outside the vocabulary")
        if not prompt_ids:
            raise ServiceError(400, "invalid_request", "the prompt is empty")
        max_tokens = _budget(text_model, prompt_ids, body.max_tokens)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        parts = _generate_text(service, text_model, prompt_ids, body, max_tokens)
        if body.stream:
            first_delta, first_reason, _ = await anext(parts)  # admission errors surface as HTTP errors, not SSE

            async def events() -> AsyncIterator[str]:
                try:
                    yield _sse(completion_chunk(kind, rid, created, echo_text + first_delta, first_reason, role=True))
                    if first_reason is None:
                        async for delta, reason, _ in parts:
                            yield _sse(completion_chunk(kind, rid, created, delta, reason))
                except ServiceError as exc:
                    yield _sse({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
                finally:
                    await parts.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, reason, produced = echo_text, None, 0
        async for delta, reason, produced in parts:
            text += delta
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": produced,
                 "total_tokens": len(prompt_ids) + produced}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
            return {"id": rid, "object": "chat.completion", "created": created, "model": text_model.model_id,
                    "choices": [choice], "usage": usage}
        return {"id": rid, "object": "text_completion", "created": created, "model": text_model.model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}], "usage": usage}

    @router.post("/v1/completions", summary="Complete a text prompt, decoded on the server")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            prompt_ids = text_model.tokenizer.encode(body.prompt).ids  # the tokenizer's own default specials
            echo = body.prompt if body.echo else ""
        else:
            prompt_ids = list(body.prompt)
            echo = text_model.tokenizer.decode(prompt_ids) if body.echo else ""
        return await respond("text", prompt_ids, body, echo)

    @router.post("/v1/chat/completions", summary="Answer a conversation with the model's chat template")
    async def chat_completions(body: ChatRequest, request: Request):
        text = text_model.render_chat([m.model_dump() for m in body.messages])
        prompt_ids = text_model.tokenizer.encode(text, add_special_tokens=False).ids
        return await respond("chat", prompt_ids, body)

    @router.get("/v1/models", summary="The served model")
    async def models():
        return {"object": "list", "data": [{"id": text_model.model_id, "object": "model", "created": 0,
                                            "owned_by": "wisp", "max_model_len": text_model.max_seq_len}]}

    return router
