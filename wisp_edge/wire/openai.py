"""The OpenAI-compatible text API, shared by the verifier's centralized mode and the edge agent's local API.

Both servers differ only in where tokens come from (the server decoding alone, or the edge's
speculative engine) and how ids become text; everything else lives here once: request bodies,
validation of the model id and the token budget, incremental detokenization with stop strings,
the JSON replies and the server-sent events of a stream. No torch, and FastAPI only inside
`as_response`, which the servers call: importing this module keeps an edge install light.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from wisp_edge.wire.chat import render_chat
from wisp_edge.wire.errors import ApiError, error_body
from wisp_edge.wire.sampling import SamplingParams, check_temperature
from wisp_edge.wire.text import IncrementalDecoder, StopMatcher


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not act on (user, ...)

    model: str = "default"
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension (vLLM): 0 disables")
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    slo_tokens_per_s: float | None = Field(None, gt=0, description="extension: target decoding rate")

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "invalid_request", "stop takes up to 4 non-empty strings")
        return stops

    def sampling(self) -> SamplingParams:
        """The generation's sampling settings; a temperature too small to sample at is a 400 (0 is greedy)."""
        try:
            return SamplingParams(check_temperature(self.temperature), self.top_k, self.top_p, self.seed)
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None


class CompletionRequest(_Generation):
    prompt: str | list[int] = Field(..., description="text, or token ids")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1)


@dataclass
class TextModel:
    """What the endpoints need to know about the model: its id, limits, chat template and eos ids."""

    model_id: str
    max_seq_len: int
    vocab_size: int
    eos_ids: frozenset[int]
    chat_template: tuple[str, str, str] | None  # (jinja, bos token, eos token)

    def render_chat(self, messages: list[dict]) -> str:
        if self.chat_template is None:
            raise ApiError(400, "no_chat_template", f"model {self.model_id} has no chat template; use /v1/completions")
        template, bos, eos = self.chat_template
        return render_chat(template, messages, bos_token=bos, eos_token=eos)

    def check(self, body: _Generation, prompt_ids: list[int]) -> int:
        """Validate the model id and the prompt; return the token budget (max_tokens or what fits)."""
        if body.model not in (self.model_id, "default"):
            raise ApiError(404, "model_not_found", f"model {body.model!r} is not served here; "
                                                   f"use {self.model_id!r} or 'default'")
        if not prompt_ids:
            raise ApiError(400, "invalid_request", "the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, "invalid_request", f"prompt token id {bad[0]} is outside the vocabulary")
        room = self.max_seq_len - len(prompt_ids)
        if room < 1:
            raise ApiError(400, "context_length_exceeded", f"the prompt has {len(prompt_ids)} tokens; the context "
                                                           f"is {self.max_seq_len}")
        if body.max_tokens is not None and body.max_tokens > room:
            raise ApiError(400, "context_length_exceeded", f"{len(prompt_ids)} prompt tokens + max_tokens "
                                                           f"{body.max_tokens} exceed the context of {self.max_seq_len}")
        return body.max_tokens if body.max_tokens is not None else room


async def text_parts(tokens: AsyncIterator[int], decode: Callable[[list[int]], str], eos_ids: frozenset[int],
                     stops: list[str]) -> AsyncIterator[tuple[str, str | None, int]]:
    """Yields (text delta, finish reason or None, tokens so far); the last item carries the reason.
    EOS ends with "stop" and is not shown; a stop string ends with "stop" and is cut with what follows."""
    decoder, matcher = IncrementalDecoder(decode), StopMatcher(stops)
    produced, reason, hit = 0, "length", False
    try:
        async for token in tokens:
            produced += 1
            if token in eos_ids:
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


def sse(payload: dict) -> str:
    """One server-sent event as OpenAI streams them: a `data:` line of JSON and a blank line."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def respond(kind: str, body: _Generation, prompt_ids: list[int], text_model: TextModel,
                  tokens: Callable[[int], AsyncIterator[int]], decode: Callable[[list[int]], str], *,
                  echo_text: str = "") -> dict | AsyncIterator[str]:
    """The whole reply to a completion (`kind` "text") or chat ("chat") request: a JSON body, or
    the server-sent events of a stream (see `as_response`).

    `tokens(max_tokens)` starts the generation; refusals it raises before the first token (admission,
    overload) surface as HTTP errors even when streaming, because the stream opens only after it.
    """
    max_tokens = text_model.check(body, prompt_ids)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    model_id = text_model.model_id
    parts = text_parts(tokens(max_tokens), decode, text_model.eos_ids, body.stops())

    def chunk(delta: str, reason: str | None, *, first: bool = False) -> dict:
        if kind == "chat":
            d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}]}
        return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]}

    if body.stream:
        first_delta, first_reason, _ = await anext(parts)

        async def events() -> AsyncIterator[str]:
            try:
                yield sse(chunk(echo_text + first_delta, first_reason, first=True))
                if first_reason is None:
                    async for delta, reason, _ in parts:
                        yield sse(chunk(delta, reason))
            except ApiError as exc:
                yield sse(error_body(exc.status, exc.code, exc.message))
            finally:
                await parts.aclose()
            yield "data: [DONE]\n\n"

        return events()
    text, reason, produced = echo_text, None, 0
    async for delta, reason, produced in parts:
        text += delta
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": produced, "total_tokens": len(prompt_ids) + produced}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_id, "choices": [choice],
                "usage": usage}
    return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}], "usage": usage}


def as_response(reply: dict | AsyncIterator[str]):
    """What a route returns for `respond`'s reply: the JSON body as is, or the events as an SSE stream.
    Starlette is imported here, not at module import, so the edge's engine never loads it."""
    if isinstance(reply, dict):
        return reply
    from starlette.responses import StreamingResponse

    return StreamingResponse(reply, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def models_reply(text_model: TextModel) -> dict:
    return {"object": "list", "data": [{"id": text_model.model_id, "object": "model", "created": 0,
                                        "owned_by": "wisp", "max_model_len": text_model.max_seq_len}]}
