"""The drafter under the draft policy: one token, a block, a rollback.

Every token is drawn from the drafter's q (argmax under greedy) and sent with that exact q, which is what
keeps sampling lossless. Only the caller's thread touches the drafter, except with `overlap`: then, once a
token is drawn and appended, the drafter starts evaluating it in a worker thread (llama.cpp and
onnxruntime release the GIL) while the stop rule reads that token's logits, so the rule's cost leaves the
drafting critical path. When the rule stops the block, that evaluation is the one the next drafted token
(the guess drafted ahead during the verify call) would start with; when nothing is drafted ahead it is
discarded (`settle`) at the rollback, one token's drafting spent while the device waits for the verifier.
The logits are a function of the tokens alone, so which tokens are drafted, and their q, do not change.
It pays only where a core is idle and a thread wakes fast: on the 2-core test machine under load, the
two wake-ups per token cost more than the rule saves (tools/bench_controller.py), so the engine keeps it off.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor, wait
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
    """One generation's drafting: the drafter, the policy's stop rule, and the sampler's random stream.

    `overlap`: run the stop rule while the drafter evaluates the token just drawn (see the module doc).
    Whoever touches the drafter other than through this class calls `settle` first, and `close` at the end.
    """

    def __init__(self, drafter: Drafter, policy, eos_ids: Collection[int], params: SamplingParams, *,
                 overlap: bool = False) -> None:
        self.drafter, self.policy, self.eos_ids, self.params = drafter, policy, eos_ids, params
        self.rng = np.random.default_rng(params.seed)
        self.overlap = overlap
        self._worker: ThreadPoolExecutor | None = None
        self._next_logits: Future | None = None  # the drafter's evaluation of its last token, under way

    def _logits(self) -> np.ndarray:
        if self._next_logits is None:
            return self.drafter.logits()
        pending, self._next_logits = self._next_logits, None
        return pending.result()

    def _evaluate_ahead(self) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-drafter-eval")
        self._next_logits = self._worker.submit(self.drafter.logits)

    def settle(self) -> None:
        """Wait for (and discard) an evaluation under way: the drafter is then the caller's alone."""
        if self._next_logits is not None:
            wait([self._next_logits])  # its error, if any, would come again from the next logits()
            self._next_logits = None

    def close(self) -> None:
        self.settle()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def next(self, index: int | None) -> tuple[int, object, float, bool]:
        """Draft one token at block index `index` (None: a guess of the verifier's token, which only an EOS
        stops): (token, sparse q or None under greedy, ms with the policy's own time, whether to stop)."""
        t0 = time.perf_counter()
        logits = self._logits()
        if self.params.greedy:  # the argmax: no q travels, and none is built (a float64 one-hot over the vocabulary)
            token, q = int(np.argmax(logits)), None
        else:
            q = probs_from_logits(logits, self.params)
            token = sample(q, self.rng)
        self.drafter.append(token)
        stop = token in self.eos_ids
        if not stop and index is not None:
            if self.overlap:
                self._evaluate_ahead()
            stop = self.policy.stop_after(index, logits, q)
        return token, None if self.params.greedy else to_sparse(q), (time.perf_counter() - t0) * 1000, stop

    def block(self, rnd: Round, committed_len: int, ready: DraftBlock) -> DraftBlock:
        """Up to `rnd.budget` drafts, starting from the `rnd.reuse` tokens of the block drafted ahead."""
        block = ready
        if len(block.tokens) > rnd.reuse:
            self.settle()
            self.drafter.truncate(committed_len + rnd.reuse)
            block = ready.cut(rnd.reuse)
        while not block.stopped and len(block.tokens) < rnd.budget:
            token, q_sparse, ms, block.stopped = self.next(len(block.tokens))
            block.add(token, q_sparse, ms)
        return block

    def rollback(self, kept: int, token: int) -> None:
        """Forget everything drafted past the `kept` committed tokens, then append the verifier's `token`."""
        self.settle()
        self.drafter.truncate(kept)
        self.drafter.append(token)
