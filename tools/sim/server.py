"""The simulated verifier: wisp_cloud/service.py's sessions, queue, batch loop, KV pool and admission, on SimPy time.

The policies are the production objects (a `VerifyScheduler` and its `TimeEstimator`); this module is the
mechanism around them, mirroring `VerifierService` step by step:
- every piece of target work is a `VerifyJob` (prefill, resume, verify block, centralized decode step),
  built with the same fields (SLO rate, committed tokens, first-token time, acceptance EWMA, downlink);
- whenever the accelerator is free: `form_batch(now, free KV, max_batch_tokens)`; an empty batch with work
  queued and `wait_s == 0` means nothing fits memory, so the newest job's session is preempted (410);
  otherwise wait for a submission or `wait_s`;
- idle sessions are evicted least recently used when a batch needs KV (their edge resumes: 410 -> a
  `resume` session re-prefills the committed tokens and the SLO clock restarts, as in the service);
- the forward takes the profile's time (plus noise); the estimator observes it (online refit);
- after a verify: the session's acceptance EWMA (0.7 / 0.3), committed count, SLO outcome (finished by
  the job's completion deadline), and the reply with queue time, verify time and the suggested draft bound;
- new sessions are refused (429 / 503 with Retry-After) on queue depth, predicted backlog, recent SLO
  attainment < 50% or KV, exactly the service's `_check_capacity` rules.
Which tokens are accepted is decided by the device's acceptance model (an oracle the job carries); the
server only reveals it when the batch finishes.

One deliberate difference: a centralized session's next decode step is queued as soon as its step
finishes, before the next batch is formed (vLLM's continuous batching). The service queues it when the
decode coroutine resumes, after `_batch_loop` has already formed the next batch from whatever else was
queued, so with other work waiting a decoding session can sit out a step there.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from tools.sim.server_profile import ForwardModel, ServerProfile
from wisp_cloud.scheduler import INF, VerifyJob, VerifyScheduler

ATTAINMENT_WINDOW_S = 10.0  # service.ATTAINMENT_WINDOW_S


@dataclass(frozen=True)
class ServerSettings:
    """The ServeSettings fields the batch loop and admission read (their defaults)."""

    max_batch_tokens: int = 2048
    max_draft: int = 32
    max_sessions: int = 4096
    max_queue: int = 1024
    max_backlog_ms: float = 2000.0
    kv_block_tokens: int = 64
    admission: bool = True


@dataclass
class Refused(Exception):
    status: int
    code: str
    retry_after: float = 1.0


@dataclass
class SimSession:
    id: int
    mode: str  # "speculative" | "centralized"
    slo_rate: float | None
    first_token_time: float
    last_used: float
    generated: int = 0
    alpha: float = 0.6
    downlink_s: float = 0.0
    busy: bool = False
    closed: bool = False
    cache_len: int = 0  # tokens whose KV is held
    capacity: int = 0  # KV positions allocated (whole blocks)
    on_token: Callable[[float, int], None] | None = None  # centralized: (time, index) of each decoded token
    max_tokens: int = 0  # centralized: tokens to decode in all
    finished: simpy.Event | None = None  # centralized: the last token


@dataclass
class _Pending:
    job: VerifyJob
    session: SimSession
    kind: str  # "prefill" | "resume" | "verify" | "decode"
    event: simpy.Event
    accepted: int = 0  # the acceptance model's verdict, revealed when the batch finishes


@dataclass
class ServerStats:
    batches: int = 0
    busy_s: float = 0.0
    batch_jobs: int = 0
    batch_tokens: int = 0
    preempted: int = 0
    evicted: int = 0
    refused: dict = field(default_factory=dict)
    predicted_ms: float = 0.0
    measured_ms: float = 0.0


class SimServer:
    def __init__(self, env: simpy.Environment, profile: ServerProfile, scheduler: VerifyScheduler,
                 forward: ForwardModel, rng: np.random.Generator, settings: ServerSettings = ServerSettings()) -> None:
        self.env, self.profile, self.scheduler, self.forward, self.rng = env, profile, scheduler, forward, rng
        self.estimator = profile.estimator
        self.settings = settings
        self.bytes_per_token = profile.kv_bytes_per_token
        self.budget_bytes = profile.kv_budget_bytes
        self.sessions: dict[int, SimSession] = {}
        self._lru: OrderedDict[int, SimSession] = OrderedDict()  # sessions holding KV, least recent first
        self._used_positions = 0
        self._queued: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=1024)
        self._speculative = 0  # open speculative sessions (for the suggested draft bound)
        self._wake: simpy.Event | None = None
        self.stats = ServerStats()
        env.process(self._batch_loop())

    # --- KV pool (kv_pool.KVPool in token units) ------------------------------------------------------

    def _blocks(self, tokens: int) -> int:
        b = self.settings.kv_block_tokens
        return -(-tokens // b) * b

    def _growth_bytes(self, s: SimSession, total: int) -> int:
        return max(0, self._blocks(total) - s.capacity) * self.bytes_per_token

    def free_bytes(self) -> float:
        return self.budget_bytes - self._used_positions * self.bytes_per_token

    def _evictable_bytes(self) -> float:
        return sum(s.capacity for s in self._lru.values() if not s.busy) * self.bytes_per_token

    def _release(self, s: SimSession) -> None:
        if self._lru.pop(s.id, None) is not None:
            self._used_positions -= s.capacity
        s.capacity = 0

    def _touch(self, s: SimSession) -> None:
        if s.id in self._lru:
            self._lru.move_to_end(s.id)

    def _evict_for(self, needed_bytes: float) -> None:
        for s in list(self._lru.values()):
            if self.free_bytes() >= needed_bytes:
                break
            if not s.busy:
                self._forget(s)
                self.stats.evicted += 1

    def _forget(self, s: SimSession) -> None:
        self.close(s)

    # --- sessions and admission ------------------------------------------------------------------------

    def open_session(self, tokens: int, slo_rate: float | None, *, mode: str = "speculative", resume: bool = False,
                     max_tokens: int = 0, on_token=None) -> tuple[SimSession, simpy.Event]:
        """Admit and queue the prefill of `tokens` (prompt, or committed tokens on resume); the event fires when
        it is done. Raises Refused like the service's 429 / 503 / 413."""
        now = self.env.now
        need = self._blocks(tokens + 1) * self.bytes_per_token
        if need > self.budget_bytes:
            raise Refused(413, "context_too_long", 0.0)
        if self.settings.admission:
            self._check_capacity(need)
        s = SimSession(next(self._ids), mode, slo_rate, now, now, on_token=on_token, max_tokens=max_tokens)
        if mode == "centralized":
            s.finished = self.env.event()
        self.sessions[s.id] = s
        self._speculative += mode == "speculative"
        self._lru[s.id] = s
        fed = tokens - (1 if resume else 0)
        event = self._enqueue(s, "resume" if resume else "prefill", new_tokens=max(fed, 1), draft_len=0)
        return s, event

    def _check_capacity(self, kv_bytes: float) -> None:
        depth = len(self._queued)
        backlog_ms = self._backlog_ms()
        retry = min(30.0, max(1.0, math.ceil(backlog_ms / 1000.0)))
        attainment, count = self.slo_attainment()
        refusal = None
        if depth >= self.settings.max_queue:
            refusal = Refused(429, "queue_full", retry)
        elif backlog_ms > self.settings.max_backlog_ms:
            refusal = Refused(429, "backlog", retry)
        elif count >= 20 and attainment < 0.5 and depth > 0:
            refusal = Refused(429, "slo", retry)
        elif len(self.sessions) >= self.settings.max_sessions and not self._drop_idle():
            refusal = Refused(503, "sessions_full", retry)
        elif self.free_bytes() + self._evictable_bytes() < kv_bytes:
            refusal = Refused(503, "kv_full", retry)
        if refusal is not None:
            self.stats.refused[refusal.code] = self.stats.refused.get(refusal.code, 0) + 1
            raise refusal

    def _drop_idle(self) -> bool:
        for s in sorted(self.sessions.values(), key=lambda x: x.last_used):
            if not s.busy:
                self._forget(s)
                self.stats.evicted += 1
                return True
        return False

    def _backlog_ms(self) -> float:
        return self.estimator.backlog_ms((p.job.cost for p in self._queued.values()), self.settings.max_batch_tokens)

    def slo_attainment(self) -> tuple[float, int]:
        horizon = self.env.now - ATTAINMENT_WINDOW_S
        recent = [ok for t, ok in self._outcomes if t >= horizon]
        return (sum(recent) / len(recent) if recent else 1.0), len(recent)

    def close(self, s: SimSession) -> None:
        if self.sessions.pop(s.id, None) is None:
            return
        self._speculative -= s.mode == "speculative"
        s.closed = True
        for job_id, p in list(self._queued.items()):
            if p.session is s:
                self.scheduler.remove(job_id)
                self._fail(p, 410)
        if not s.busy:
            self._release(s)

    def alive(self, s: SimSession) -> bool:
        return s.id in self.sessions

    # --- rounds -------------------------------------------------------------------------------------

    def verify(self, s: SimSession, drafted: int, accepted: int, rtt_ms: float | None) -> simpy.Event:
        """Queue a draft block; raises Refused(410) if the session was evicted. The event's value is the reply."""
        if not self.alive(s):
            raise Refused(410, "session_evicted", 0.0)
        if rtt_ms is not None:
            s.downlink_s = max(0.0, rtt_ms) / 2000.0
        return self._enqueue(s, "verify", new_tokens=drafted + 1, draft_len=drafted, accepted=accepted)

    def _suggested_max_draft(self) -> int:
        active = max(1, self._speculative)
        return int(max(1, min(self.settings.max_draft, self.settings.max_batch_tokens // active - 1)))

    def _enqueue(self, s: SimSession, kind: str, *, new_tokens: int, draft_len: int, accepted: int = 0) -> simpy.Event:
        now = self.env.now
        job = VerifyJob(next(self._job_ids), s.id, new_tokens, s.cache_len, draft_len, now, slo_rate=s.slo_rate,
                        committed=s.generated, first_token_time=s.first_token_time, alpha=s.alpha,
                        downlink_s=s.downlink_s, kv_bytes=self._growth_bytes(s, s.cache_len + new_tokens))
        pending = _Pending(job, s, kind, self.env.event(), accepted)
        job.payload = pending
        self.scheduler.submit(job)
        self._queued[job.job_id] = pending
        s.busy = True
        s.last_used = now
        self._touch(s)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        return pending.event

    def _fail(self, p: _Pending, status: int) -> None:
        self._queued.pop(p.job.job_id, None)
        p.session.busy = False
        if not p.event.triggered:
            p.event.succeed({"error": status})
        if p.session.finished is not None and not p.session.finished.triggered:
            p.session.finished.succeed({"error": status})

    def _preempt_newest(self) -> None:
        p = max(self._queued.values(), key=lambda x: x.job.arrival)
        self.scheduler.remove(p.job.job_id)
        self._fail(p, 410)
        self._forget(p.session)
        self.stats.preempted += 1

    # --- the batch loop -----------------------------------------------------------------------------

    def _batch_loop(self):
        env = self.env
        while True:
            now = env.now
            free = INF if self.budget_bytes == INF else self.free_bytes() + self._evictable_bytes()
            batch = self.scheduler.form_batch(now, free, self.settings.max_batch_tokens)
            if not batch.jobs:
                if self._queued and batch.wait_s == 0.0:
                    self._preempt_newest()
                    continue
                self._wake = env.event()
                if batch.wait_s == INF:
                    yield self._wake
                else:
                    yield self._wake | env.timeout(max(batch.wait_s, 0.0002))
                continue
            pendings = [job.payload for job in batch.jobs]
            for p in pendings:
                self._queued.pop(p.job.job_id, None)
            if batch.kv_bytes and self.free_bytes() < batch.kv_bytes:
                self._evict_for(batch.kv_bytes)
            for p in pendings:  # allocate the blocks the round needs
                s = p.session
                grown = self._blocks(s.cache_len + p.job.new_tokens)
                if grown > s.capacity and s.id in self._lru:
                    self._used_positions += grown - s.capacity
                    s.capacity = grown
            started = env.now
            costs = [p.job.cost for p in pendings]
            measured_ms = self.forward.sample_ms(costs, self.rng)
            yield env.timeout(measured_ms / 1000.0)
            self._record(batch, costs, measured_ms)
            for p in pendings:
                self._finish(p, started, measured_ms, len(pendings))

    def _record(self, batch, costs, measured_ms: float) -> None:
        st = self.stats
        st.batches += 1
        st.busy_s += measured_ms / 1000.0
        st.batch_jobs += len(costs)
        st.batch_tokens += sum(c.new_tokens for c in costs)
        st.predicted_ms += self.estimator.predict(costs)
        st.measured_ms += measured_ms
        self.estimator.observe(costs, measured_ms)  # the service's online refit

    def _finish(self, p: _Pending, started: float, measured_ms: float, batch_size: int) -> None:
        done = self.env.now
        s, job = p.session, p.job
        s.busy = False
        s.last_used = done
        if s.closed:
            self._release(s)
        if p.kind in ("prefill", "resume"):
            s.cache_len = job.new_tokens
        else:
            s.cache_len += p.accepted + 1
        if p.kind == "verify" and job.draft_len:
            s.alpha = 0.7 * s.alpha + 0.3 * p.accepted / job.draft_len
        if p.kind == "prefill":
            s.first_token_time = done
        elif p.kind == "resume":
            s.first_token_time, s.generated = done, 0
        else:
            s.generated += 1 + p.accepted
        if job.slo_rate is not None:
            self._outcomes.append((done, done <= job.completion_deadline))
        reply = {"accepted": p.accepted, "queue_ms": max(0.0, (started - job.arrival) * 1000.0),
                 "verify_ms": measured_ms, "batch_size": batch_size,
                 "suggested_max_draft": self._suggested_max_draft()}
        p.event.succeed(reply)
        if s.mode == "centralized" and not s.closed:
            self._continue_decoding(s, done)

    def _continue_decoding(self, s: SimSession, done: float) -> None:
        """service.decode's loop: each decoded token streams out; the next step is queued at once."""
        produced = s.generated + 1  # the prefill's token plus one per decode step
        s.on_token(done, produced - 1)
        if produced < s.max_tokens:
            self._enqueue(s, "decode", new_tokens=1, draft_len=0)
        elif not s.finished.triggered:
            s.finished.succeed({"tokens": produced})
