"""Sampling-parameter semantics shared by the edge and the server (numpy only).

Both sides must agree exactly on how temperature, top-k and top-p turn logits into the
distribution a token is drawn from: the drafter reports that distribution as q, and the
verifier builds the target's p the same way (``wisp_cloud.sampling`` mirrors this in torch and
is tested against it). Order: temperature -> softmax -> top-k -> top-p -> renormalise.
Ties are broken by token id (lower id first), so the support is deterministic.
`SamplingParams` is also the wire format of a session's sampling settings.
"""

from __future__ import annotations

import numpy as np
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

MIN_TEMPERATURE = 1e-4  # below it logits / T overflows float64 for a subnormal T: 0 means greedy


def check_temperature(temperature: float) -> float:
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature {temperature:g} is below {MIN_TEMPERATURE:g}: use 0 for greedy decoding")
    return temperature


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SamplingParams:
    """How the next token is chosen. temperature == 0 means greedy (argmax, lowest id on ties).

    A pydantic dataclass: the engine builds it positionally, the session API validates it as the
    ``sampling`` object of a request body, and a bad value raises a ValueError either way."""

    temperature: float = Field(0.0, ge=0.0, le=100.0, description=f"0 = greedy, else at least {MIN_TEMPERATURE:g}")
    top_k: int = Field(0, ge=0, description="0 disables")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 disables")
    seed: int | None = Field(None, ge=0, lt=1 << 63)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return check_temperature(value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def probs_from_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The exact distribution a token is sampled from.  logits: [vocab] -> probs: [vocab] (float64)."""
    logits = np.asarray(logits, dtype=np.float64)
    vocab = logits.shape[-1]
    if params.greedy:
        probs = np.zeros(vocab)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    z = logits / params.temperature
    z = z - z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")  # descending, lower id first on ties
    keep = np.ones(vocab, dtype=bool)
    if params.top_k and params.top_k < vocab:
        keep[order[params.top_k:]] = False
    if params.top_p < 1.0:
        sorted_probs = np.where(keep[order], probs[order], 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum()
        exclusive_cumsum = np.cumsum(sorted_probs) - sorted_probs
        keep[order[exclusive_cumsum >= params.top_p]] = False
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from probs ([vocab]) with an explicit generator (seeded runs repeat)."""
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(probs) - 1))


def to_sparse(probs: np.ndarray) -> tuple[list[int], list[float]]:
    """The support of a truncated distribution, for the wire: (token ids, their probabilities)."""
    ids = np.flatnonzero(probs)
    return ids.tolist(), probs[ids].tolist()
