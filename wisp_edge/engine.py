"""The edge round loop: draft -> verify -> commit -> roll back, yielding tokens as they are committed.

The engine is the source of truth for committed tokens. It talks to any `VerifierBackend`
(the in-process verifier here; the HTTP client for a remote one), and asks a draft-length
policy when to stop drafting. Each yielded token says whether the drafter proposed it, so a
UI can colour what the device got right.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from wisp_edge.draft_ahead import AheadDrafter, DraftBlock
from wisp_edge.drafters.base import Drafter
from wisp_edge.prefill import BackgroundPrefill
from wisp_edge.protocol import SessionStart, SessionStarted, VerifierUnavailable, VerifyRequest, VerifyResult
from wisp_edge.sampling import SamplingParams, probs_from_logits, sample, to_sparse


class VerifierBackend(Protocol):
    def start_session(self, request: SessionStart) -> SessionStarted: ...

    def verify(self, request: VerifyRequest) -> VerifyResult: ...

    def close_session(self, session_id: str) -> None: ...


class DraftPolicy(Protocol):
    """Decides the draft length: an upper bound per round, and after each drafted token whether to stop.

    `stop_after` sees the drafter's raw logits for the token just drafted (its position `index` in
    the block, from 0) and `q`, the distribution it was drawn from (one-hot under greedy). After the
    verifier answers, `observe` gets the round's outcome and the server's timing feedback.
    """

    def max_draft(self) -> int: ...

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray) -> bool: ...

    def observe(self, drafted: int, accepted: int, result: VerifyResult, rtt_ms: float,
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

    def observe(self, drafted: int, accepted: int, result: VerifyResult, rtt_ms: float,
                drafting_ms: list[float]) -> None:
        pass


@dataclass(frozen=True)
class CommittedToken:
    id: int
    from_draft: bool  # proposed by the drafter and accepted by the target
    round: int  # -1: produced by the drafter alone while the verifier was unreachable
    verified: bool = True  # False only under allow_local, when the verifier could not be reached


@dataclass
class RoundStats:
    drafted: int
    accepted: int
    drafting_ms: float
    wasted_drafting_ms: float  # time spent drafting tokens after the first rejected one
    rtt_ms: float  # wall time of the verify call
    verify_ms: float
    queue_ms: float


@dataclass
class GenerationStats:
    rounds: list[RoundStats] = field(default_factory=list)
    prefill_ms: float = 0.0
    wall_s: float = 0.0
    new_tokens: int = 0
    unverified: int = 0  # drafter-only tokens (allow_local, verifier unreachable)
    drafter_prefill_ms: float = 0.0  # the drafter's prompt prefill (in the background while cloud_rounds ran)
    cloud_rounds: int = 0  # rounds with no draft: the verifier decoded while the drafter prefilled
    ahead_ready: int = 0  # rounds whose block was drafted while the previous one was being verified
    ahead_wasted_ms: float = 0.0  # drafting ahead that was rolled back (it overlapped a round trip)
    faults: dict[str, int] = field(default_factory=dict)  # what the backend survived (retries, resumes, ...)

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per speculative round (accepted drafts + the target's own token); rounds that
        drafted nothing (cloud rounds during the drafter's prefill, a last single token) are left out."""
        spec = [r for r in self.rounds if r.drafted]
        return (sum(r.accepted for r in spec) / len(spec) + 1.0) if spec else 0.0

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(r.drafted for r in self.rounds)
        return sum(r.accepted for r in self.rounds) / drafted if drafted else 0.0

    def summary(self) -> dict:
        return {
            "new_tokens": self.new_tokens, "rounds": len(self.rounds), "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.new_tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "acceptance_rate": round(self.acceptance_rate, 4), "mean_accepted_per_round": round(self.mean_accepted, 3),
            "drafted": sum(r.drafted for r in self.rounds), "accepted": sum(r.accepted for r in self.rounds),
            "drafting_ms": round(sum(r.drafting_ms for r in self.rounds), 1),
            "wasted_drafting_ms": round(sum(r.wasted_drafting_ms for r in self.rounds), 1),
            "verify_ms": round(sum(r.verify_ms for r in self.rounds), 1), "prefill_ms": round(self.prefill_ms, 1),
            "rtt_ms": round(sum(r.rtt_ms for r in self.rounds), 1), "queue_ms": round(sum(r.queue_ms for r in self.rounds), 1),
            "unverified_tokens": self.unverified, "faults": dict(self.faults),
            "drafter_prefill_ms": round(self.drafter_prefill_ms, 1), "cloud_rounds": self.cloud_rounds,
            "ahead_ready_rounds": self.ahead_ready, "ahead_wasted_ms": round(self.ahead_wasted_ms, 1),
        }


# A prefill done within this long is waited for: a cloud round (a full round trip for one token) would cost
# more than it saves. Longer ones (long prompts, slow boards) run while the verifier decodes.
SHORT_PREFILL_S = 0.02


class SpeculativeEngine:
    def __init__(self, drafter: Drafter, backend: VerifierBackend, policy: DraftPolicy | None = None, *,
                 eos_ids: tuple[int, ...] = (), vocab_fingerprint: str | None = None, allow_local: bool = False,
                 slo_tokens_per_s: float | None = None, decode_while_prefilling: bool = True,
                 draft_ahead: bool = True) -> None:
        self.drafter, self.backend = drafter, backend
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
        start = time.perf_counter()
        faults_before = _faults_of(self.backend)
        rng = np.random.default_rng(params.seed)
        session_id = None
        try:
            started = self.backend.start_session(SessionStart(list(prompt_ids), params, self.vocab_fingerprint,
                                                              self.slo_tokens_per_s))
        except VerifierUnavailable:
            if not self.allow_local:
                raise
            yield from self._local_only(list(prompt_ids), max_new_tokens, params, rng, start)
            return
        session_id = started.session_id
        stats.prefill_ms = started.prefill_ms
        committed = [*prompt_ids, started.first_token]
        stats.new_tokens = 1
        yield CommittedToken(started.first_token, False, 0)
        prefill: BackgroundPrefill | None = None
        try:
            if started.first_token in self.eos_ids:
                return
            self.drafter.reset(committed)
            prefill = BackgroundPrefill(self.drafter)
            if not self.decode_while_prefilling or prefill.wait(SHORT_PREFILL_S):
                self._catch_up(prefill, committed)
                prefill = None
            round_no = 0
            last_rtt_ms: float | None = None
            ready: DraftBlock | None = None  # drafted ahead during the last round, after its guessed token
            ahead = AheadDrafter() if self.draft_ahead else None
            last_call_ms = last_token_ms = None  # the last round trip and drafting speed: how much fits ahead
            while stats.new_tokens < max_new_tokens:
                round_no += 1
                if prefill is not None and not prefill.running():
                    self._catch_up(prefill, committed)
                    prefill = None
                if prefill is None:
                    # At most remaining-1 drafts, so accepted + the target's token never overshoot the budget.
                    budget = min(self.policy.max_draft(), max_new_tokens - stats.new_tokens - 1)
                    if ready is not None and ready.tokens and budget > 0:
                        stats.ahead_ready += 1
                    drafts, qs, draft_times = self._draft(budget, params, rng, len(committed), ready)
                    ready = None
                else:  # the drafter is still prefilling: the verifier decodes this token alone
                    drafts, qs, draft_times = [], [], []
                    stats.cloud_rounds += 1
                request = VerifyRequest(session_id, len(committed), drafts, None if params.greedy else qs, round_no,
                                        drafting_ms=sum(draft_times), rtt_ms=last_rtt_ms, committed=committed)
                guess = DraftBlock()
                t0 = time.perf_counter()
                try:
                    if ahead is not None and prefill is None and stats.new_tokens + len(drafts) + 1 < max_new_tokens:
                        result, rtt_ms, guess = ahead.verify(
                            self.backend.verify, request, lambda index: self._draft_next(index, params, rng),
                            max_ahead=self.policy.max_draft() + 1, expected_ms=last_call_ms, token_ms=last_token_ms)
                    else:
                        result = self.backend.verify(request)
                        rtt_ms = (time.perf_counter() - t0) * 1000
                except VerifierUnavailable:
                    if not self.allow_local:
                        raise
                    if prefill is not None:
                        self._catch_up(prefill, committed)
                        prefill = None
                    self.drafter.truncate(len(committed))
                    yield from self._local_only(committed, max_new_tokens, params, rng, start, resumed=True)
                    return
                last_rtt_ms = max(0.0, rtt_ms - result.verify_ms - result.queue_ms)  # the network's share
                last_call_ms = rtt_ms
                if draft_times:
                    last_token_ms = sum(draft_times) / len(draft_times)
                accepted = result.accepted
                self.policy.observe(len(drafts), accepted, result, rtt_ms, draft_times)
                wasted = sum(draft_times[accepted + 1:])
                stats.rounds.append(RoundStats(len(drafts), accepted, sum(draft_times), wasted, rtt_ms,
                                               result.verify_ms, result.queue_ms))
                new = [*drafts[:accepted], result.token]
                if guess.tokens and accepted == len(drafts) and guess.tokens[0] == result.token:
                    ready = guess.after_guess()  # the drafter already holds the guess and the block after it
                elif prefill is None:
                    stats.ahead_wasted_ms += sum(guess.times)
                    self.drafter.truncate(len(committed) + accepted)
                    self.drafter.append(result.token)
                committed.extend(new)
                for i, token in enumerate(new):
                    stats.new_tokens += 1
                    yield CommittedToken(token, i < accepted, round_no)
                    if token in self.eos_ids:
                        return
        finally:
            if ahead is not None:
                ahead.close()
            if prefill is not None:  # the answer ended first: the drafter is free only once its thread is done
                prefill.wait()
                stats.drafter_prefill_ms = prefill.elapsed_ms
            stats.wall_s = time.perf_counter() - start
            if session_id is not None:
                try:
                    self.backend.close_session(session_id)
                except VerifierUnavailable:
                    pass
            stats.faults = {k: v - faults_before.get(k, 0) for k, v in _faults_of(self.backend).items()}

    def _catch_up(self, prefill: BackgroundPrefill, committed: list[int]) -> None:
        """Finish the prefill, then hand the drafter the tokens the verifier decoded meanwhile."""
        self.stats.drafter_prefill_ms = prefill.join()
        for token in committed[len(self.drafter.tokens):]:
            self.drafter.append(token)

    def _local_only(self, committed: list[int], max_new_tokens: int, params: SamplingParams,
                    rng: np.random.Generator, start: float, resumed: bool = False) -> Iterator[CommittedToken]:
        """The drafter alone, every token marked unverified (only with allow_local)."""
        stats = self.stats
        if not resumed:
            self.drafter.reset(committed)
        while stats.new_tokens < max_new_tokens:
            q = probs_from_logits(self.drafter.logits(), params)
            token = int(np.argmax(q)) if params.greedy else sample(q, rng)
            self.drafter.append(token)
            stats.new_tokens += 1
            stats.unverified += 1
            yield CommittedToken(token, True, -1, verified=False)
            if token in self.eos_ids:
                break
        stats.wall_s = time.perf_counter() - start

    def _draft_next(self, index: int | None, params: SamplingParams, rng: np.random.Generator):
        """Draft one token at block index `index` (None: a guess of the verifier's token, which only an EOS
        stops): (token, sparse q or None under greedy, ms with the policy's own time, whether to stop)."""
        t0 = time.perf_counter()
        logits = self.drafter.logits()
        q = probs_from_logits(logits, params)
        token = int(np.argmax(q)) if params.greedy else sample(q, rng)
        self.drafter.append(token)
        stop = token in self.eos_ids or (index is not None and self.policy.stop_after(index, logits, q))
        return token, None if params.greedy else to_sparse(q), (time.perf_counter() - t0) * 1000, stop

    def _draft(self, budget: int, params: SamplingParams, rng: np.random.Generator, committed_len: int,
               ready: DraftBlock | None = None):
        """Up to `budget` drafts, starting from a block drafted ahead (cut to the budget) when there is one."""
        block = ready or DraftBlock()
        if len(block.tokens) > budget:
            self.drafter.truncate(committed_len + budget)
            block = DraftBlock(block.tokens[:budget], block.qs[:budget], block.times[:budget], True)
        while not block.stopped and len(block.tokens) < budget:
            token, q_sparse, ms, block.stopped = self._draft_next(len(block.tokens), params, rng)
            block.add(token, q_sparse, ms)
        return block.tokens, block.qs, block.times


def _faults_of(backend) -> dict[str, int]:
    """A networked backend's fault counters (`HttpVerifier.faults()`); none for an in-process one."""
    faults = getattr(backend, "faults", None)
    return faults() if callable(faults) else {}
