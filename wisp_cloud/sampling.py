"""Torch mirror of `wisp_edge.wire.sampling.probs_from_logits`, for the target's p on the verifier.

The semantics (temperature -> softmax -> top-k -> top-p, ties by lower id) are defined in
`wisp_edge.wire.sampling`; this version works on many rows at once and is tested equal to it.
"""

from __future__ import annotations

import torch

from wisp_edge.wire.sampling import SamplingParams


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [rows, vocab] -> probs: [rows, vocab] float64, each row the exact sampling distribution."""
    logits = logits.double()
    rows, vocab = logits.shape
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs[torch.arange(rows), logits.argmax(-1)] = 1.0
        return probs
    probs = torch.softmax(logits / params.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
    if params.top_k and params.top_k < vocab:
        keep_sorted[:, params.top_k:] = False
    if params.top_p < 1.0:
        kept = torch.where(keep_sorted, sorted_probs, 0.0)
        kept = kept / kept.sum(-1, keepdim=True)
        exclusive_cumsum = kept.cumsum(-1) - kept
        keep_sorted &= exclusive_cumsum < params.top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)
