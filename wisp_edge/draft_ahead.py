"""Drafting the next block while the verifier checks this one (proactive drafting, as in SpecEdge).

Between sending a block and hearing back, the device would sit idle for a whole round trip. Instead it
keeps drafting as if every token in flight will be accepted: first a guess at the verifier's own token,
then the next block. If the verifier accepts the whole block and its token equals the guess, the next
block is already drafted and goes out at once; otherwise it is rolled back with the rest of the rejected
tokens and counted as wasted drafting. Which tokens may start, and what is kept, the round plan decides
(wisp_edge/round_plan.py); this module only overlaps the drafting with the call.

Lossless: the kept tokens are ordinary drafts, each sent with the exact distribution q it was drawn from,
and checked by the verifier like any other. Whether they are kept depends only on the guess and the
verifier's answer, both settled before any of them is drawn, so it does not bend their distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from wisp_edge.drafting import DraftBlock, Drafting
from wisp_edge.round_plan import Round, RoundPlan
from wisp_edge.wire.protocol import VerifyReply, VerifyRequest


class AheadDrafter:
    """Runs the verify call in a worker thread and drafts ahead in the caller's thread until it returns.

    llama.cpp, onnxruntime, torch and the socket calls all release the GIL, so the two really overlap.
    The drafter is only touched from the caller's thread.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-verify")

    def verify(self, verify: Callable[[VerifyRequest], VerifyReply], request: VerifyRequest, drafting: Drafting,
               plan: RoundPlan, rnd: Round) -> tuple[VerifyReply, float, DraftBlock]:
        """(the verifier's answer, the call's own wall time in ms, the tokens drafted meanwhile).

        The first token drafted is the guess; the stop rule sees the block after it from index 0, as a
        normal round would.
        """
        finished_at: list[float] = []

        def call() -> VerifyReply:
            try:
                return verify(request)
            finally:
                finished_at.append(time.perf_counter())

        started = time.perf_counter()
        future: Future = self._pool.submit(call)
        block = DraftBlock()
        try:
            while not future.done() and plan.may_start_ahead(rnd, len(block.tokens),
                                                             (time.perf_counter() - started) * 1000,
                                                             block.times[-1] if block.times else None):
                token, q_sparse, ms, block.stopped = drafting.next(len(block.tokens) - 1 if block.tokens else None)
                block.add(token, q_sparse, ms)
                if block.stopped:
                    break
        finally:
            wait([future])  # never leave a verify call running behind the caller's back
        result = future.result()  # raises what the backend raised
        return result, (finished_at[0] - started) * 1000, block

    def close(self) -> None:
        self._pool.shutdown(wait=True)
