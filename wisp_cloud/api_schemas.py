"""Request and reply bodies of the HTTP API, validated by pydantic and published in the OpenAPI schema.

The session API speaks token ids, never text. Limits that depend on the served model (vocabulary
size, context length, the longest draft) are checked by the service, which knows them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_IDS = 1 << 20  # a hard ceiling on any id list before the model's own limits apply
MIN_TEMPERATURE = 1e-4  # below it logits / T overflows float64 for a subnormal T: 0 means greedy
MAX_SLO = 10_000.0  # tokens/s


def check_temperature(temperature: float) -> float:
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature {temperature:g} is below {MIN_TEMPERATURE:g}: use 0 for greedy decoding")
    return temperature


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=100.0, description=f"0 = greedy, else at least {MIN_TEMPERATURE:g}")
    top_k: int = Field(0, ge=0, description="0 disables")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=1 << 63)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return check_temperature(value)


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_ids: list[int] = Field(..., min_length=1, max_length=MAX_IDS, description="prompt token ids")
    sampling: Sampling = Field(default_factory=Sampling)
    slo_tokens_per_s: float | None = Field(None, gt=0, le=MAX_SLO, description="target decoding rate")
    vocab_fingerprint: str | None = Field(None, max_length=128, description="the drafter's vocabulary fingerprint")
    resume: bool = Field(False, description="prompt_ids are an earlier session's committed tokens: cache them and "
                                            "sample nothing (after an eviction or a server restart)")


class SessionCreated(BaseModel):
    session_id: str
    first_token: int | None = Field(description="the target's token after the prompt; null on resume")
    position: int = Field(description="tokens committed on the server")
    queue_ms: float
    prefill_ms: float
    vocab_fingerprint: str | None
    max_draft: int


class SparseQ(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] = Field(..., min_length=1, max_length=1 << 17)
    probs: list[float] = Field(..., min_length=1, max_length=1 << 17)

    @model_validator(mode="after")
    def _same_length(self) -> "SparseQ":
        if len(self.ids) != len(self.probs):
            raise ValueError(f"q lists {len(self.ids)} ids but {len(self.probs)} probabilities")
        return self


class VerifyBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    position: int = Field(..., ge=1, description="committed tokens the block was drafted from")
    round_id: int = Field(..., ge=0, description="retrying a round id returns the same answer")
    draft_ids: list[int] = Field(..., max_length=1024)
    q: list[SparseQ] | None = Field(None, description="sampling only: the drafter's distribution per draft token")
    drafting_ms: float = Field(0.0, ge=0)
    rtt_ms: float | None = Field(None, ge=0, description="the edge's round-trip estimate")


class VerifyReply(BaseModel):
    accepted: int
    token: int = Field(description="the correction (or, all accepted, the bonus) token")
    bonus: bool
    position: int = Field(description="tokens committed after this round")
    round_id: int
    queue_ms: float
    verify_ms: float
    predicted_ms: float | None
    batch_size: int
    batch_tokens: int
    queue_depth: int
    suggested_max_draft: int
    replayed: bool = False


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    committed: int | None = None


class ErrorReply(BaseModel):
    error: ErrorBody
