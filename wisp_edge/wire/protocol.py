"""The messages of a WISP round, defined once: the edge client serializes them, the verifier's HTTP API
validates them (and publishes them in its OpenAPI schema), the in-process backend passes them as they are.

Token ids cross the wire, never text. `position` is the number of tokens the edge has committed
(prompt + generated) when the block was drafted; the server holds the same prefix and refuses a
block drafted from a different one. Under sampling each draft token carries the drafter's exact
q as a sparse (ids, probs) pair. Request bodies refuse unknown fields; replies ignore them, so an
older edge can talk to a newer server.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

from pydantic import ConfigDict, Field, TypeAdapter, model_validator
from pydantic.dataclasses import dataclass

from wisp_edge.wire.sampling import GREEDY, SamplingParams

MAX_IDS = 1 << 20  # a hard ceiling on any id list before the model's own limits apply
MAX_SLO = 10_000.0  # tokens/s
MAX_DRAFT_IDS = 1024
REQUEST = ConfigDict(extra="forbid")


class VerifierUnavailable(RuntimeError):
    """The verifier cannot be reached or keeps refusing work, after the backend's own retries."""


@dataclass(config=REQUEST)
class SparseQ:
    """The drafter's distribution for one draft token: the ids of its support and their probabilities."""

    ids: list[int] = Field(..., min_length=1, max_length=1 << 17)
    probs: list[float] = Field(..., min_length=1, max_length=1 << 17)

    @model_validator(mode="after")
    def _same_length(self) -> "SparseQ":
        if len(self.ids) != len(self.probs):
            raise ValueError(f"q lists {len(self.ids)} ids but {len(self.probs)} probabilities")
        return self

    def __iter__(self):
        """Unpacks as ``ids, probs``, the sparse pair the verifier reads."""
        return iter((self.ids, self.probs))


@dataclass(config=REQUEST)
class SessionStart:
    """`POST /v1/sessions`: open a session (prefill the prompt), or resume one from committed tokens."""

    prompt_ids: list[int] = Field(..., min_length=1, max_length=MAX_IDS, description="prompt token ids")
    sampling: SamplingParams = GREEDY
    vocab_fingerprint: str | None = Field(None, max_length=128, description="the drafter's vocabulary fingerprint")
    slo_tokens_per_s: float | None = Field(None, gt=0, le=MAX_SLO, description="target decoding rate")
    resume: bool = Field(False, description="prompt_ids are an earlier session's committed tokens: cache them and "
                                            "sample nothing (after an eviction or a server restart)")


@dataclass
class SessionStarted:
    """The reply to `SessionStart`."""

    session_id: str
    first_token: int | None = Field(None, description="the target's token after the prompt; null on resume")
    prefill_ms: float = 0.0
    position: int = Field(0, description="tokens committed on the server")
    queue_ms: float = 0.0
    vocab_fingerprint: str | None = None
    max_draft: int = 0


@dataclass(config=REQUEST)
class VerifyBlock:
    """`POST /v1/sessions/{id}/verify`: a draft block to verify."""

    position: int = Field(..., ge=1, description="committed tokens the block was drafted from")
    draft_ids: list[int] = Field(..., max_length=MAX_DRAFT_IDS)
    q: list[SparseQ] | None = Field(None, description="sampling only: the drafter's distribution per draft token")
    round_id: int = Field(..., ge=0, description="retrying a round id returns the same answer")
    drafting_ms: float = Field(0.0, ge=0)
    rtt_ms: float | None = Field(None, ge=0, description="the edge's round-trip estimate")


@dataclass
class VerifyReply:
    """The verdict on a block: how many draft tokens were accepted, the target's own token, and timing."""

    accepted: int
    token: int = Field(description="the correction (or, all accepted, the bonus) token")
    bonus: bool = False
    verify_ms: float = 0.0
    queue_ms: float = 0.0
    batch_size: int = 1
    suggested_max_draft: int | None = Field(None, description="the server's fair share of its batch token budget")
    position: int | None = Field(None, description="tokens committed after this round")
    round_id: int | None = None
    predicted_ms: float | None = None
    batch_tokens: int = 0
    queue_depth: int = 0
    replayed: bool = False
    token_ms: float | None = Field(None, description="what one more draft token would have added to this round's "
                                   "verification (the server's estimate): the edge prices drafting on with it")


@dataclasses.dataclass
class VerifyRequest:
    """A round as the engine hands it to a backend (not itself on the wire): the block, the session it
    belongs to, and (not sent each round) the edge's committed tokens, which a networked backend resends
    only when the server lost the session (eviction, restart), so no token is ever lost."""

    session_id: str
    block: VerifyBlock
    committed: list[int] | None = dataclasses.field(default=None, repr=False)


@lru_cache(maxsize=None)
def _adapter(kind: type) -> TypeAdapter:
    return TypeAdapter(kind)


def dump(message: Any) -> dict:
    """A message as the JSON body it travels as."""
    return _adapter(type(message)).dump_python(message, mode="json")


def load(kind: type, body: Any) -> Any:
    """A message of `kind` from a decoded JSON body (a reply: unknown fields are ignored)."""
    return _adapter(kind).validate_python(body)
