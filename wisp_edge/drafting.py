"""The drafter under the draft policy: one token, a block, a rollback.

Every token is drawn from the drafter's q (argmax under greedy) and sent with that exact q, which is what
keeps sampling lossless. Only the caller's thread touches the drafter.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from wisp_edge.drafters.base import Drafter
from wisp_edge.round_plan import Round
from wisp_edge.wire.protocol import SparseQ, VerifyBlock
from wisp_edge.wire.sampling import SamplingParams, probs_from_logits, sample, to_sparse


@dataclass
class DraftBlock:
    """Drafted tokens with the sparse q each was drawn from (greedy: none) and the ms each took."""

    tokens: list[int] = field(default_factory=list)
    qs: list = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    stopped: bool = False  # the stop rule (or an EOS) ended it: do not draft past it

    def add(self, token: int, q_sparse, ms: float) -> None:
        self.tokens.append(token)
        if q_sparse is not None:
            self.qs.append(q_sparse)
        self.times.append(ms)

    def cut(self, n: int) -> DraftBlock:
        """The first `n` tokens, ended there."""
        return DraftBlock(self.tokens[:n], self.qs[:n], self.times[:n], True)

    def guessed(self, token: int) -> bool:
        """Whether this block, drafted ahead, starts with the verifier's `token`."""
        return bool(self.tokens) and self.tokens[0] == token

    def after_guess(self) -> DraftBlock:
        """The block that follows the guessed verifier token (the first one drafted ahead)."""
        return DraftBlock(self.tokens[1:], self.qs[1:], self.times[1:], self.stopped)

    def wire(self, position: int, round_id: int, rtt_ms: float | None, greedy: bool) -> VerifyBlock:
        """The block as the verifier reads it; under greedy no q travels."""
        return VerifyBlock(position, self.tokens, None if greedy else [SparseQ(*q) for q in self.qs], round_id,
                           drafting_ms=sum(self.times), rtt_ms=rtt_ms)


class Drafting:
    """One generation's drafting: the drafter, the policy's stop rule, and the sampler's random stream."""

    def __init__(self, drafter: Drafter, policy, eos_ids: Collection[int], params: SamplingParams) -> None:
        self.drafter, self.policy, self.eos_ids, self.params = drafter, policy, eos_ids, params
        self.rng = np.random.default_rng(params.seed)

    def next(self, index: int | None) -> tuple[int, object, float, bool]:
        """Draft one token at block index `index` (None: a guess of the verifier's token, which only an EOS
        stops): (token, sparse q or None under greedy, ms with the policy's own time, whether to stop)."""
        t0 = time.perf_counter()
        logits = self.drafter.logits()
        q = probs_from_logits(logits, self.params)
        token = int(np.argmax(q)) if self.params.greedy else sample(q, self.rng)
        self.drafter.append(token)
        stop = token in self.eos_ids or (index is not None and self.policy.stop_after(index, logits, q))
        return token, None if self.params.greedy else to_sparse(q), (time.perf_counter() - t0) * 1000, stop

    def block(self, rnd: Round, committed_len: int, ready: DraftBlock) -> DraftBlock:
        """Up to `rnd.budget` drafts, starting from the `rnd.reuse` tokens of the block drafted ahead."""
        block = ready
        if len(block.tokens) > rnd.reuse:
            self.drafter.truncate(committed_len + rnd.reuse)
            block = ready.cut(rnd.reuse)
        while not block.stopped and len(block.tokens) < rnd.budget:
            token, q_sparse, ms, block.stopped = self.next(len(block.tokens))
            block.add(token, q_sparse, ms)
        return block

    def rollback(self, kept: int, token: int) -> None:
        """Forget everything drafted past the `kept` committed tokens, then append the verifier's `token`."""
        self.drafter.truncate(kept)
        self.drafter.append(token)
