"""Sampling-parameter semantics shared by the edge and the server (numpy only).

Both sides must agree exactly on how temperature, top-k and top-p turn logits into the
distribution a token is drawn from: the drafter reports that distribution as q, and the
verifier builds the target's p the same way (``wisp_cloud.sampling`` mirrors this in torch and
is tested against it). Order: temperature -> softmax -> top-k -> top-p -> renormalise.
Ties are broken by token id (lower id first), so the support is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature == 0 means greedy (argmax, lowest id on ties)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

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
