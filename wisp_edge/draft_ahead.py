"""Drafting the next block while the verifier checks this one (proactive drafting, as in SpecEdge).

Between sending a block and hearing back, the device would sit idle for a whole round trip. Instead it
keeps drafting as if every token in flight will be accepted: first a guess at the verifier's own token,
then the next block. If the verifier accepts the whole block and its token equals the guess, the next
block is already drafted and goes out at once; otherwise it is rolled back with the rest of the rejected
tokens and counted as wasted drafting.

Lossless: the kept tokens are ordinary drafts, each sent with the exact distribution q it was drawn from,
and checked by the verifier like any other. Whether they are kept depends only on the guess and the
verifier's answer, both settled before any of them is drawn, so it does not bend their distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from wisp_edge.protocol import VerifyRequest, VerifyResult


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

    def after_guess(self) -> DraftBlock:
        """The block that follows the guessed verifier token (the first one drafted ahead)."""
        return DraftBlock(self.tokens[1:], self.qs[1:], self.times[1:], self.stopped)


# Draft one token at block index `index` (None: the guess of the verifier's token, which only an EOS stops):
# (token, sparse q or None under greedy, ms it took, whether the block stops after it).
DraftNext = Callable[[int | None], tuple[int, object, float, bool]]


class AheadDrafter:
    """Runs the verify call in a worker thread and drafts ahead in the caller's thread until it returns.

    llama.cpp, onnxruntime, torch and the socket calls all release the GIL, so the two really overlap.
    The drafter is only touched from the caller's thread.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-verify")

    def verify(self, verify: Callable[[VerifyRequest], VerifyResult], request: VerifyRequest, draft_next: DraftNext,
               *, max_ahead: int, expected_ms: float | None = None,
               token_ms: float | None = None) -> tuple[VerifyResult, float, DraftBlock]:
        """(the verifier's answer, the call's own wall time in ms, the tokens drafted meanwhile).

        `max_ahead` counts the guess too. The stop rule sees the block after the guess from index 0, as a
        normal round would. A token being drafted when the answer comes must be finished first (a drafter
        step cannot be interrupted), so with `expected_ms` (the last round trip) and `token_ms` (the last
        drafting speed) no token is started that would not end before the answer is expected.
        """
        finished_at: list[float] = []

        def call() -> VerifyResult:
            try:
                return verify(request)
            finally:
                finished_at.append(time.perf_counter())

        started = time.perf_counter()
        future: Future = self._pool.submit(call)
        block = DraftBlock()
        try:
            while not future.done() and len(block.tokens) < max_ahead:
                per_token = block.times[-1] if block.times else token_ms
                if expected_ms is not None and per_token is not None and \
                        (time.perf_counter() - started) * 1000 + per_token > expected_ms:
                    break
                token, q_sparse, ms, stop = draft_next(len(block.tokens) - 1 if block.tokens else None)
                block.add(token, q_sparse, ms)
                if stop:
                    block.stopped = True
                    break
        finally:
            wait([future])  # never leave a verify call running behind the caller's back
        result = future.result()  # raises what the backend raised
        return result, (finished_at[0] - started) * 1000, block

    def close(self) -> None:
        self._pool.shutdown(wait=True)
