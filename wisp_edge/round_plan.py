"""The edge round as decisions on numbers: how much to draft, whether to draft ahead, what to keep, when to stop.

No drafter, no network, no clock: the engine (wisp_edge/engine.py) executes these decisions with the real
drafter and verifier, and the simulator (tools/sim/edge.py) with simulated ones, so both run one algorithm.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

# A drafter prefill done within this long is waited for: a cloud round (a full round trip for one token) would
# cost more than it saves. Longer ones (long prompts, slow boards) run while the verifier decodes.
SHORT_PREFILL_S = 0.02


@dataclass(frozen=True)
class Round:
    """One round's plan: its number, how many tokens to draft, and how many of the block drafted ahead to send."""

    number: int
    budget: int  # the most drafts this round; 0 in a cloud round
    cloud: bool  # the drafter is still prefilling: an empty draft, the verifier decodes one token alone
    reuse: int = 0  # leading tokens of the block drafted ahead that this round sends (cut to the budget)
    ahead_limit: int = 0  # the most tokens drafted during this round trip: the guess and a full block


@dataclass
class RoundPlan:
    """One generation's rounds, from the committed count and what the last round trip measured."""

    max_new_tokens: int
    eos_ids: Collection[int] = ()
    rounds: int = 0
    net_ms: float | None = None  # the network's share of the last round trip, reported with the next block
    call_ms: float | None = None  # the last verify call's wall time: when the next answer is expected
    token_ms: float | None = None  # the last round's drafting time per token
    server_max_draft: int | None = None  # the longest block the verifier takes (SessionStarted.max_draft)

    def finished(self, new_tokens: int) -> bool:
        return new_tokens >= self.max_new_tokens

    def ends(self, token: int) -> bool:
        """An EOS ends the answer, and it is included."""
        return token in self.eos_ids

    def next_round(self, new_tokens: int, max_draft: int | None, ahead: int = 0) -> Round:
        """`max_draft`: the policy's bound, None while the drafter prefills; `ahead`: tokens kept from the last
        round trip. At most remaining-1 drafts, so the accepted ones + the target's token never overshoot."""
        self.rounds += 1
        if max_draft is None:
            return Round(self.rounds, 0, True)
        if self.server_max_draft:  # a longer block would be refused (422) every round
            max_draft = min(max_draft, self.server_max_draft)
        budget = min(max_draft, self.max_new_tokens - new_tokens - 1)
        return Round(self.rounds, budget, False, min(ahead, max(budget, 0)), max_draft + 1)

    def drafts_ahead(self, new_tokens: int, rnd: Round, drafted: int) -> bool:
        """Draft during the round trip only when the drafter is free and another round follows this one."""
        return not rnd.cloud and new_tokens + drafted + 1 < self.max_new_tokens

    def may_start_ahead(self, rnd: Round, started: int, elapsed_ms: float, last_ms: float | None) -> bool:
        """Whether to start one more token during the round trip (`elapsed_ms` since the block left, the last
        token drafted ahead took `last_ms`). A drafter step cannot be interrupted and the answer would wait for
        it, so once the last round trip and drafting speed are known, none is started that would end after the
        answer is expected."""
        per_token = last_ms if last_ms is not None else self.token_ms
        if started >= rnd.ahead_limit:
            return False
        return self.call_ms is None or per_token is None or elapsed_ms + per_token <= self.call_ms

    @staticmethod
    def keep_ahead(drafted: int, accepted: int, guess_right: bool) -> bool:
        """Keep the block drafted ahead only if every draft was accepted and the guessed token is the verifier's:
        only then does it continue the committed tokens. Either way the choice is made from the guess and the
        verdict, settled before any kept token was drawn, so keeping it does not bend their distribution."""
        return guess_right and accepted == drafted

    def observe(self, rtt_ms: float, verify_ms: float, queue_ms: float, drafting_ms: list[float]) -> None:
        """What a finished round trip measured, for the next round's block and drafting ahead."""
        self.net_ms = max(0.0, rtt_ms - verify_ms - queue_ms)
        self.call_ms = rtt_ms
        if drafting_ms:
            self.token_ms = sum(drafting_ms) / len(drafting_ms)
