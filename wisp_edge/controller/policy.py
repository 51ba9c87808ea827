"""The speculation controller: a stop rule inside an adaptive length bound, chosen by name.

- `wisp`: the rejection predictor trained for this drafter (or, with no matching weights, the
  confidence fallback) stops each draft, inside `DraftBound`, the length that maximises committed
  tokens per unit time given the measured RTT, drafting speed, acceptance and server feedback.
- `sled`: the SLED baseline, confidence threshold 0.5 with k_max 8, no feedback.
- `predictor`: this drafter's rejection predictor alone with k_max 8, no bound and no feedback: the stop
  rule on the same footing as `sled`, to compare the two rules and nothing else.
- `fixed`: always `draft_length` tokens (SLED's fixed-length variant).
- `confidence` / `entropy`: the training-free rules alone, inside the adaptive bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wisp_edge.controller.bounds import DraftBound
from wisp_edge.controller.predictor import ConfidencePolicy, EntropyPolicy, policy_for
from wisp_edge.engine import DraftPolicy, FixedLength
from wisp_edge.wire.protocol import VerifyReply

POLICIES = ("wisp", "sled", "predictor", "fixed", "confidence", "entropy")


@dataclass
class Controller:
    """`stop_rule` ends a draft; `bound` (when given) sets the most tokens a round may draft."""

    stop_rule: DraftPolicy
    bound: DraftBound | None = None

    def max_draft(self) -> int:
        """Called once per round, before drafting: also tells the stop rule what a token is worth now."""
        if self.bound is None:
            return self.stop_rule.max_draft()
        if hasattr(self.stop_rule, "min_worthwhile"):
            self.stop_rule.min_worthwhile = self.bound.min_worthwhile_acceptance()
        return self.bound.best_k()

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray) -> bool:
        return self.stop_rule.stop_after(index, logits, q)

    def stop_after_stats(self, index: int, stats: tuple[float, float, float, float, float]) -> bool:
        """`stop_after` from `distribution_stats(logits)` already computed (used by the simulator)."""
        return self.stop_rule.stop_after_stats(index, stats)

    def observe(self, drafted: int, accepted: int, result: VerifyReply, rtt_ms: float,
                drafting_ms: list[float]) -> None:
        self.stop_rule.observe(drafted, accepted, result, rtt_ms, drafting_ms)
        if self.bound is not None:
            self.bound.observe(drafted, accepted, drafting_ms=drafting_ms, rtt_ms=rtt_ms, queue_ms=result.queue_ms,
                               verify_ms=result.verify_ms, suggested=result.suggested_max_draft,
                               token_verify_ms=result.token_ms)


def make_policy(name: str, drafter, *, k_max: int = 16, draft_length: int = 6) -> DraftPolicy:
    if name == "fixed":
        return FixedLength(draft_length)
    if name == "sled":
        return ConfidencePolicy(threshold=0.5, k_max=8)
    if name == "predictor":
        return policy_for(drafter, k_max=8)
    if name == "wisp":
        return Controller(policy_for(drafter, k_max=k_max), DraftBound(k_max=k_max))
    if name == "confidence":
        return Controller(ConfidencePolicy(k_max=k_max), DraftBound(k_max=k_max))
    if name == "entropy":
        return Controller(EntropyPolicy(k_max=k_max), DraftBound(k_max=k_max))
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
