"""The edge round loop: draft -> verify -> commit -> roll back, yielding tokens as they are committed.

The engine is the source of truth for committed tokens. It executes the round plan (wisp_edge/round_plan.py,
shared with the simulator) with the real drafter and any `VerifierBackend` (the in-process verifier here; the
HTTP client for a remote one), and asks a draft-length policy when to stop drafting. Each yielded token says
whether the drafter proposed it, so a UI can colour what the device got right.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from wisp_edge.draft_ahead import AheadDrafter
from wisp_edge.drafters.base import Drafter
from wisp_edge.drafting import DraftBlock, Drafting
from wisp_edge.prefill import BackgroundPrefill
from wisp_edge.round_plan import SHORT_PREFILL_S, Round, RoundPlan
from wisp_edge.stats import FaultCounter, GenerationStats, RoundStats  # noqa: F401  (RoundStats: re-exported)
from wisp_edge.wire.protocol import SessionStart, SessionStarted, VerifierUnavailable, VerifyReply, VerifyRequest
from wisp_edge.wire.sampling import SamplingParams


class VerifierBackend(Protocol):
    def start_session(self, request: SessionStart) -> SessionStarted: ...

    def verify(self, request: VerifyRequest) -> VerifyReply: ...

    def close_session(self, session_id: str) -> None: ...


class DraftPolicy(Protocol):
    """Decides the draft length: an upper bound per round, and after each drafted token whether to stop.

    `stop_after` sees the drafter's raw logits for the token just drafted (its position `index` in
    the block, from 0) and `q`, the distribution it was drawn from (None under greedy: the token is the
    argmax). After the verifier answers, `observe` gets the round's outcome and the server's timing feedback.
    """

    def max_draft(self) -> int: ...

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray | None) -> bool: ...

    def observe(self, drafted: int, accepted: int, result: VerifyReply, rtt_ms: float,
                drafting_ms: list[float]) -> None: ...


@dataclass
class FixedLength:
    """Draft exactly k tokens a round (the SLED baseline's fixed-length variant)."""

    k: int = 4

    def max_draft(self) -> int:
        return self.k

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray) -> bool:
        return False

    def stop_after_stats(self, index: int, stats: tuple[float, ...]) -> bool:
        return False

    def observe(self, drafted: int, accepted: int, result: VerifyReply, rtt_ms: float,
                drafting_ms: list[float]) -> None:
        pass


@dataclass(frozen=True)
class CommittedToken:
    id: int
    from_draft: bool  # proposed by the drafter and accepted by the target
    round: int  # -1: produced by the drafter alone while the verifier was unreachable
    verified: bool = True  # False only under allow_local, when the verifier could not be reached


class SpeculativeEngine:
    def __init__(self, drafter: Drafter, backend: VerifierBackend, policy: DraftPolicy | None = None, *,
                 eos_ids: tuple[int, ...] = (), vocab_fingerprint: str | None = None, allow_local: bool = False,
                 slo_tokens_per_s: float | None = None, decode_while_prefilling: bool = True,
                 draft_ahead: bool = True, overlap_stop_rule: bool = False) -> None:
        self.drafter, self.backend = drafter, backend
        # Run the stop rule while the drafter evaluates the token just drawn (drafting.py). Off: on a loaded
        # 2-core machine the two thread wake-ups cost about what the rule does (docs/results/controller/).
        self.overlap_stop_rule = overlap_stop_rule
        self.decode_while_prefilling = decode_while_prefilling
        self.draft_ahead = draft_ahead
        self.allow_local = allow_local
        self.slo_tokens_per_s = slo_tokens_per_s
        self.policy = policy or FixedLength(4)
        self.eos_ids = set(eos_ids)
        self.vocab_fingerprint = vocab_fingerprint
        self.stats = GenerationStats()

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int,
                 params: SamplingParams = SamplingParams()) -> Iterator[CommittedToken]:
        """Yield committed tokens until EOS (included) or max_new_tokens; `self.stats` fills as it goes.

        With `allow_local`, a verifier that stays unreachable (the backend raises VerifierUnavailable
        after its own retries) does not end the answer: the rest is drafted by the device alone and
        every such token is yielded with ``verified=False``.
        """
        if max_new_tokens <= 0:
            return
        self.stats = stats = GenerationStats()
        start, faults = time.perf_counter(), FaultCounter(self.backend)
        plan = RoundPlan(max_new_tokens, self.eos_ids)
        drafting = Drafting(self.drafter, self.policy, self.eos_ids, params,
                            overlap=self.overlap_stop_rule and not isinstance(self.policy, FixedLength))
        try:
            started = self.backend.start_session(SessionStart(list(prompt_ids), params, self.vocab_fingerprint,
                                                              self.slo_tokens_per_s))
        except VerifierUnavailable:
            if not self.allow_local:
                raise
            self.drafter.reset(list(prompt_ids))
            yield from self._local_only(drafting, plan, start)
            return
        stats.prefill_ms = started.prefill_ms
        plan.server_max_draft = started.max_draft or None
        committed = [*prompt_ids, started.first_token]
        prefill = ahead = None
        try:
            if (yield from self._emit(plan, [started.first_token], 0, 0)):
                return
            prefill = BackgroundPrefill(self.drafter, committed,
                                        SHORT_PREFILL_S if self.decode_while_prefilling else None)
            ahead = AheadDrafter() if self.draft_ahead else None
            ready = DraftBlock()  # drafted during the last round trip, after its guessed token
            while not plan.finished(stats.new_tokens):
                max_draft = self.policy.max_draft() if prefill.ready(committed) else None  # None: a cloud round
                rnd = plan.next_round(stats.new_tokens, max_draft, len(ready.tokens))
                stats.start_round(rnd)
                block = drafting.block(rnd, len(committed), ready)
                request = VerifyRequest(started.session_id, block.wire(len(committed), rnd.number, plan.net_ms,
                                                                      params.greedy), committed)
                try:
                    reply, rtt_ms, guess = self._verify(request, ahead, drafting, plan, rnd)
                except VerifierUnavailable:
                    if not self.allow_local:
                        raise
                    drafting.settle()
                    prefill.catch_up(committed)
                    self.drafter.truncate(len(committed))
                    yield from self._local_only(drafting, plan, start)
                    return
                plan.observe(rtt_ms, reply.verify_ms, reply.queue_ms, block.times)
                self.policy.observe(len(block.tokens), reply.accepted, reply, rtt_ms, block.times)
                stats.end_round(block.times, reply.accepted, rtt_ms, reply.verify_ms, reply.queue_ms)
                ready = self._settle(plan, rnd, drafting, block, guess, reply, len(committed))
                new = [*block.tokens[:reply.accepted], reply.token]
                committed.extend(new)
                if (yield from self._emit(plan, new, reply.accepted, rnd.number)):
                    return
        finally:
            drafting.close()
            self._end(started.session_id, prefill, ahead, start, faults)

    def _verify(self, request: VerifyRequest, ahead: AheadDrafter | None, drafting: Drafting, plan: RoundPlan,
                rnd: Round) -> tuple[VerifyReply, float, DraftBlock]:
        """The verify call and its wall time in ms; meanwhile the next block is drafted ahead if the plan says so."""
        if ahead is not None and plan.drafts_ahead(self.stats.new_tokens, rnd, len(request.block.draft_ids)):
            return ahead.verify(self.backend.verify, request, drafting, plan, rnd)
        t0 = time.perf_counter()
        reply = self.backend.verify(request)
        return reply, (time.perf_counter() - t0) * 1000, DraftBlock()

    def _settle(self, plan: RoundPlan, rnd: Round, drafting: Drafting, block: DraftBlock, guess: DraftBlock,
                reply: VerifyReply, committed_len: int) -> DraftBlock:
        """After the verdict: the block drafted ahead that the next round sends, or (rolled back) none."""
        if plan.keep_ahead(len(block.tokens), reply.accepted, guess.guessed(reply.token)):
            return guess.after_guess()  # the drafter already holds the guess and the block after it
        if not rnd.cloud:  # in a cloud round the drafter is still prefilling: it catches up later
            self.stats.ahead_wasted_ms += sum(guess.times)
            drafting.rollback(committed_len + reply.accepted, reply.token)
        return DraftBlock()

    def _emit(self, plan: RoundPlan, tokens: list[int], accepted: int, round_no: int):
        """Yield committed tokens (the first `accepted` were drafts); returns True once an EOS ended the answer."""
        for i, token in enumerate(tokens):
            self.stats.new_tokens += 1
            yield CommittedToken(token, i < accepted, round_no)
            if plan.ends(token):
                return True
        return False

    def _end(self, session_id: str, prefill: BackgroundPrefill | None, ahead: AheadDrafter | None, start: float,
             faults: FaultCounter) -> None:
        """Free the drafter and the worker thread, close the session, and record the time and faults."""
        if ahead is not None:
            ahead.close()
        if prefill is not None:  # the answer may end first: the drafter is free only once its thread is done
            self.stats.drafter_prefill_ms = prefill.close()
        self.stats.wall_s = time.perf_counter() - start
        try:
            self.backend.close_session(session_id)
        except VerifierUnavailable:
            pass
        self.stats.faults = faults.since()

    def _local_only(self, drafting: Drafting, plan: RoundPlan, start: float) -> Iterator[CommittedToken]:
        """The drafter alone from its current tokens, every token marked unverified (only with allow_local)."""
        stats = self.stats
        while not plan.finished(stats.new_tokens):
            token = drafting.next(None)[0]
            stats.new_tokens += 1
            stats.unverified += 1
            yield CommittedToken(token, True, -1, verified=False)
            if plan.ends(token):
                break
        stats.wall_s = time.perf_counter() - start
