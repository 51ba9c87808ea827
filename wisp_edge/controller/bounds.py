"""How long a draft may get, from what the agent measures: the network, its own speed, the server.

A round that drafts k tokens commits E(k) = 1 + a + a^2 + ... + a^k tokens on average (a = the
per-token acceptance, each accepted draft plus the target's own token) and takes
T(k) = k * (t_draft + t_verify) + RTT + queue + verify_0, where t_verify is what one more draft token adds
to the round's verification (the server says, from its estimator: on a CPU verifier about as much as the
drafting itself, on a GPU next to nothing) and verify_0 the rest of it. The bound is the k in [1, cap]
that maximises E(k) / T(k): when the round trip dominates, long drafts pay for themselves and the bound
grows; when drafting dominates or acceptance is poor, it shrinks. The server's suggested bound (its fair
share of the batch token budget) caps it when the server is saturated. The stop rule (predictor or confidence)
still ends a draft early inside the bound, but `min_worthwhile_acceptance` tells it when drafting
on through a doubtful token is cheap next to the round trip it may save.

Every estimate is an exponentially weighted moving average of what the rounds report, so the bound
follows a changing network within a few rounds.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_committed(alpha: float, k: int) -> float:
    """Tokens a round commits on average: accepted drafts (each survives w.p. alpha) + the target's one."""
    alpha = min(max(alpha, 0.0), 1.0)
    return float(k + 1) if alpha >= 1.0 - 1e-9 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class Ewma:
    value: float
    weight: float = 0.3

    def update(self, x: float) -> float:
        self.value += self.weight * (x - self.value)
        return self.value


@dataclass
class DraftBound:
    """The adaptive draft-length bound. `k_max` is the hard ceiling (the server's and the policy's)."""

    k_max: int = 16
    k_min: int = 1
    alpha: Ewma | None = None  # per-token acceptance
    draft_ms: Ewma | None = None  # per drafted token
    network_ms: Ewma | None = None  # round trip minus the server's own time
    server_ms: Ewma | None = None  # queue + verification, less what the drafted tokens added to it
    token_verify_ms: Ewma | None = None  # what one more draft token adds to verification (the server's word)
    suggested: int | None = None  # the server's latest suggested bound

    def __post_init__(self) -> None:
        self.alpha = self.alpha or Ewma(0.6)
        self.draft_ms = self.draft_ms or Ewma(20.0)
        self.network_ms = self.network_ms or Ewma(20.0)
        self.server_ms = self.server_ms or Ewma(50.0)
        self.token_verify_ms = self.token_verify_ms or Ewma(0.0)

    @property
    def cap(self) -> int:
        cap = self.k_max if self.suggested is None else min(self.k_max, max(self.k_min, self.suggested))
        return max(self.k_min, cap)

    def best_k(self) -> int:
        """argmax over k of E(k) / T(k); ties go to the shorter draft (less wasted work)."""
        a, t_d = self.alpha.value, self._token_ms()
        fixed = max(self.network_ms.value, 0.0) + max(self.server_ms.value, 0.0)
        best, best_rate = self.k_min, -1.0
        for k in range(self.k_min, self.cap + 1):
            rate = expected_committed(a, k) / (k * t_d + fixed)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = k, rate
        return best

    def min_worthwhile_acceptance(self) -> float:
        """The least chance of acceptance for which drafting one more token pays for itself.

        One more token costs t_draft + t_verify; it is worth the time a committed token costs at the best k,
        c = T(k) / E(k), when it survives: with chance P(the current token is accepted) * alpha.
        So drafting on pays while P(accepted) > (t_draft + t_verify) / (alpha * c). A long round trip makes c
        large and the answer small: keep drafting through doubt. Fast rounds make it near 1.
        """
        k, a, t_d = self.best_k(), max(self.alpha.value, 1e-3), self._token_ms()
        per_token = (k * t_d + max(self.network_ms.value, 0.0) + max(self.server_ms.value, 0.0)) \
            / expected_committed(a, k)
        return min(1.0, t_d / (a * per_token))

    def _token_ms(self) -> float:
        """The cost of one more draft token: drafting it and verifying it."""
        return max(self.draft_ms.value, 1e-3) + max(self.token_verify_ms.value, 0.0)

    def observe(self, drafted: int, accepted: int, *, drafting_ms: list[float], rtt_ms: float, queue_ms: float,
                verify_ms: float, suggested: int | None, token_verify_ms: float | None = None) -> None:
        """One round's report; `token_verify_ms` None (a server that does not say) leaves verification per
        token where it was (0 until a server says otherwise)."""
        if drafted:
            # A draft cut short by the stop rule says nothing about the tokens after it; acceptance is
            # measured over the tokens actually judged, with the first rejection counted.
            judged = min(drafted, accepted + 1)
            self.alpha.update(accepted / judged)
            self.draft_ms.update(sum(drafting_ms) / len(drafting_ms))
        if token_verify_ms is not None:
            self.token_verify_ms.update(token_verify_ms)
        self.server_ms.update(max(0.0, queue_ms + verify_ms - drafted * max(self.token_verify_ms.value, 0.0)))
        self.network_ms.update(max(0.0, rtt_ms - queue_ms - verify_ms))
        self.suggested = suggested
