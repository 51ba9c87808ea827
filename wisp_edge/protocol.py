"""The messages of a WISP round, defined once for both sides (no torch, no llama.cpp).

Token ids cross the wire, never text. `position` is the number of tokens the edge has committed
(prompt + generated) when the block was drafted; the server holds the same prefix and refuses a
block drafted from a different one. Under sampling each draft token carries the drafter's exact
q as a sparse (ids, probs) pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wisp_edge.sampling import SamplingParams

SparseDist = tuple[list[int], list[float]]


class VerifierUnavailable(RuntimeError):
    """The verifier cannot be reached or keeps refusing work, after the backend's own retries."""


@dataclass
class SessionStart:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    vocab_fingerprint: str | None = None
    slo_tokens_per_s: float | None = None


@dataclass
class SessionStarted:
    session_id: str
    first_token: int  # the target's token after the prompt
    prefill_ms: float = 0.0


@dataclass
class VerifyRequest:
    session_id: str
    position: int
    draft_ids: list[int]
    q: list[SparseDist] | None = None  # sampling only: one per draft token
    round_id: int = 0
    drafting_ms: float = 0.0
    rtt_ms: float | None = None
    # The edge's committed tokens (prompt + generated), not sent each round: a networked backend resends
    # them only when the server lost the session (eviction, restart), so no token is ever lost.
    committed: list[int] | None = field(default=None, repr=False)


@dataclass
class VerifyResult:
    accepted: int
    token: int
    bonus: bool = False
    verify_ms: float = 0.0
    queue_ms: float = 0.0
    batch_size: int = 1
    suggested_max_draft: int | None = None  # the server's fair share of its batch token budget
