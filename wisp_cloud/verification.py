"""Acceptance of a draft block against the target: the lossless core of speculative decoding.

Vocabulary (after vLLM): of k draft tokens the first `accepted` are kept; then one target token
follows, either **recovered** (resampled at the first rejection) or **bonus** (drawn from the
target's next distribution when every draft was accepted).

Greedy: a draft token is accepted iff it is the target's argmax; the recovered/bonus token is
the argmax. Sampling: token d drawn from q is accepted with probability min(1, p(d)/q(d)); on
rejection the recovered token is drawn from norm(max(0, p - q)). With q exactly the distribution
the drafter sampled from, the emitted tokens are distributed exactly as the target's own samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wisp_cloud.sampling import probs_from_logits
from wisp_edge.wire.sampling import SamplingParams


class InvalidDraftError(ValueError):
    """The draft block is inconsistent (q missing, wrong length, or a draft outside its own q)."""


@dataclass(frozen=True)
class Verdict:
    accepted: int  # draft tokens kept
    token: int  # the recovered or bonus target token that follows them
    bonus: bool  # True when every draft was accepted


def dense_q(sparse: tuple[list[int], list[float]], vocab: int) -> torch.Tensor:
    """The drafter's distribution from its sparse wire form (ids, probs) -> [vocab] float64."""
    ids, probs = sparse
    q = torch.zeros(vocab, dtype=torch.float64)
    q[torch.as_tensor(ids, dtype=torch.long)] = torch.as_tensor(probs, dtype=torch.float64)
    return q


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): what the target still owes after the drafter's share.  p, q: [vocab]"""
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return p if total <= 0 else residual / total


def verify_greedy(logits: torch.Tensor, draft: list[int]) -> Verdict:
    """logits: [k+1, vocab], row i is the target's next-token logits after draft[:i]."""
    assert logits.shape[0] == len(draft) + 1, f"need {len(draft) + 1} logit rows, got {logits.shape[0]}"
    targets = logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == targets[accepted]:
        accepted += 1
    return Verdict(accepted, targets[accepted], accepted == len(draft))


def verify_sampled(logits: torch.Tensor, draft: list[int], q_rows: list[torch.Tensor], params: SamplingParams,
                   generator: torch.Generator) -> Verdict:
    """Rejection sampling.  logits: [k+1, vocab]; q_rows: k tensors [vocab], the drafter's exact q."""
    assert logits.shape[0] == len(draft) + 1, f"need {len(draft) + 1} logit rows, got {logits.shape[0]}"
    if len(q_rows) != len(draft):
        raise InvalidDraftError(f"sampling needs one q per draft token: {len(draft)} drafts, {len(q_rows)} q rows")
    p_rows = probs_from_logits(logits, params)  # [k+1, vocab]
    for i, token in enumerate(draft):
        p, q = p_rows[i], q_rows[i]
        if q[token] <= 0:
            raise InvalidDraftError(f"draft token {token} at offset {i} has q = 0: it cannot have been sampled from q")
        u = torch.rand((), dtype=torch.float64, generator=generator)
        if u * q[token] < p[token]:  # accept with probability min(1, p/q)
            continue
        recovered = torch.multinomial(residual_distribution(p, q).float(), 1, generator=generator)
        return Verdict(i, int(recovered), False)
    bonus = torch.multinomial(p_rows[-1].float(), 1, generator=generator)
    return Verdict(len(draft), int(bonus), True)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from the target's own distribution (prefill's first token, autoregressive decoding).  logits: [vocab]"""
    if params.greedy:
        return int(logits.argmax())
    probs = probs_from_logits(logits[None], params)[0]
    return int(torch.multinomial(probs.float(), 1, generator=generator))
