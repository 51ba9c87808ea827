"""The simulated verifier: the service's own `Dispatcher` (session table, admission, KV accounting, SLO window,
scheduler, estimator) on SimPy time.

Everything the service decides comes from the classes it drives (wisp_cloud/dispatch.py): who is admitted
or refused with which code, which jobs form each batch, whose KV is reclaimed for it, whose session is
preempted when nothing fits, deadlines, SLO outcomes, the suggested draft bound (tests/test_sim_equivalence.py
checks that both decide alike). Only what a simulation must stand in for is here:
- the accelerator: a batch takes the profile's `ForwardModel` time (plus noise); the estimator observes it
  (the service's online refit);
- the KV tensors: a `SimCache` per session holds its length and its capacity, which grows in the ledger's
  blocks when its batch runs;
- the verdicts: the device's acceptance model (an oracle the edge passes with the block) decided how many
  drafts are accepted; the server reveals it when the batch finishes;
- the clock: SimPy's.

A centralized session's next decode step is queued as soon as its step finishes, before the next batch is
formed (continuous batching), as the service's batch loop queues it (`VerifierService.decode`); the first
step, as there, once the prefill's reply has reached the session, after the next batch was planned.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from tools.sim.server_profile import ForwardModel, ServerProfile
from wisp_cloud.admission import ACTIVE_WINDOW_S, Limits
from wisp_cloud.dispatch import Dispatcher
from wisp_cloud.kv_ledger import KVLedger
from wisp_cloud.scheduler import INF, VerifyJob, VerifyScheduler
from wisp_cloud.session_table import SessionRecord, SessionTable
from wisp_edge.wire.errors import ApiError

Refused = ApiError  # what the simulated server raises: the service's own refusals (status, code, retry_after)


@dataclass(frozen=True)
class ServerSettings:
    """The ServeSettings fields the batch loop and admission read (their defaults)."""

    max_batch_tokens: int = 2048
    max_draft: int = 32
    max_sessions: int = 4096
    max_queue: int = 1024
    max_backlog_ms: float = 2000.0
    kv_block_tokens: int = 64
    kv_keep_active_s: float = ACTIVE_WINDOW_S
    admission: bool = True


@dataclass
class SimCache:
    """A session's KV as the ledger sees a KVCache: positions held and positions allocated."""

    length: int = 0
    capacity: int = 0


@dataclass(eq=False, kw_only=True)
class SimSession(SessionRecord):
    cache: SimCache = field(default_factory=SimCache)
    on_token: Callable[[float, int], None] | None = None  # centralized: (time, index) of each decoded token
    max_tokens: int = 0  # centralized: tokens to decode in all
    finished: simpy.Event | None = None  # centralized: the last token


@dataclass
class _Pending:
    """What a queued job carries here: its session, the event its caller waits on, the oracle's verdict."""

    session: SimSession
    event: simpy.Event
    accepted: int = 0


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
        self.env, self.profile, self.forward, self.rng = env, profile, forward, rng
        self.estimator = profile.estimator
        self.settings = settings
        self.ledger = KVLedger(profile.kv_budget_bytes, profile.kv_bytes_per_token, settings.kv_block_tokens)
        self.sessions = SessionTable()
        self.dispatch = Dispatcher(scheduler, self.estimator, self.ledger, self.sessions, Limits.of(settings),
                                   max_batch_tokens=settings.max_batch_tokens, max_draft=settings.max_draft)
        self._ids = itertools.count(1)
        self._wake: simpy.Event | None = None
        self.stats = ServerStats()
        env.process(self._batch_loop())

    @property
    def scheduler(self) -> VerifyScheduler:
        return self.dispatch.scheduler

    # --- sessions -------------------------------------------------------------------------------------

    def open_session(self, tokens: int, slo_rate: float | None, *, mode: str = "speculative", resume: bool = False,
                     max_tokens: int = 0, on_token=None) -> tuple[SimSession, simpy.Event]:
        """Admit and queue the prefill of `tokens` (prompt, or committed tokens on resume); the event fires when
        it is done. Raises Refused like the service's 429 / 503 / 413."""
        now = self.env.now
        refused, drop = self.dispatch.admission(now, tokens, check_load=self.settings.admission)
        if refused is not None:
            self.stats.refused[refused.reason] = self.stats.refused.get(refused.reason, 0) + 1
            raise refused.error()
        if drop is not None:
            self.close(drop)
            self.stats.evicted += 1
        s = SimSession(next(self._ids), mode, slo_rate, now, now, on_token=on_token, max_tokens=max_tokens)
        if mode == "centralized":
            s.finished = self.env.event()
        self.ledger.add(s.id, s.cache)
        self.sessions.add(s)
        fed = tokens - (1 if resume else 0)
        return s, self._submit(s, "resume" if resume else "prefill", new_tokens=fed, draft_len=0)

    def close(self, s: SimSession) -> None:
        for job in self.dispatch.close(s):
            self._fail(job)

    def verify(self, s: SimSession, drafted: int, accepted: int, rtt_ms: float | None) -> simpy.Event:
        """Queue a draft block; raises Refused(410) if the session was evicted. The event's value is the reply."""
        if s.closed:
            raise Refused(410, "session_evicted", f"session {s.id} was evicted", retry_after=0.0)
        if rtt_ms is not None:
            s.downlink_s = max(0.0, rtt_ms) / 2000.0
        return self._submit(s, "verify", new_tokens=drafted + 1, draft_len=drafted, accepted=accepted)

    def _submit(self, s: SimSession, kind: str, *, new_tokens: int, draft_len: int, accepted: int = 0) -> simpy.Event:
        job = self.dispatch.submit(s, kind, new_tokens=new_tokens, draft_len=draft_len, now=self.env.now)
        job.payload = _Pending(s, self.env.event(), accepted)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        return job.payload.event

    def _fail(self, job: VerifyJob) -> None:
        """The job will not run: its caller hears 410 (evicted: resume with the committed tokens)."""
        p: _Pending = job.payload
        self.dispatch.withdraw(job, p.session)
        for event in (p.event, p.session.finished):
            if event is not None and not event.triggered:
                event.succeed({"error": 410})

    # --- the batch loop -----------------------------------------------------------------------------

    def _batch_loop(self):
        env = self.env
        while True:
            plan = self.dispatch.plan(env.now)
            if plan.preempted is not None:
                self._fail(plan.preempted)
                self.close(plan.preempted.payload.session)
                self.stats.preempted += 1
                continue
            if plan.batch is None:
                self._wake = env.event()
                yield self._wake if plan.wait_s == INF else self._wake | env.timeout(plan.wait_s)
                continue
            for session_id in plan.evicted:
                self.stats.evicted += 1
                evicted = self.sessions.lookup(session_id)
                if evicted is not None:
                    self.close(evicted)
            jobs = plan.batch.jobs
            for job in jobs:  # the blocks the round allocates
                cache = job.payload.session.cache
                cache.capacity = self.ledger.planned_capacity(cache.capacity, cache.length + job.new_tokens)
            started = env.now
            costs = [job.cost for job in jobs]
            measured_ms = self.forward.sample_ms(costs, self.rng)
            yield env.timeout(measured_ms / 1000.0)
            self._record(costs, measured_ms)
            for job in jobs:
                self._finish(job, started, measured_ms, len(jobs))

    def _record(self, costs, measured_ms: float) -> None:
        st = self.stats
        st.batches += 1
        st.busy_s += measured_ms / 1000.0
        st.batch_jobs += len(costs)
        st.batch_tokens += sum(c.new_tokens for c in costs)
        st.predicted_ms += self.estimator.predict(costs)
        st.measured_ms += measured_ms
        self.estimator.observe(costs, measured_ms)  # the service's online refit

    def _finish(self, job: VerifyJob, started: float, measured_ms: float, batch_size: int) -> None:
        done = self.env.now
        p: _Pending = job.payload
        s = p.session
        s.cache.length = job.new_tokens if job.kind in ("prefill", "resume") else s.cache.length + p.accepted + 1
        self.dispatch.finish(job, s, p.accepted, done)
        reply = {"accepted": p.accepted, "queue_ms": max(0.0, (started - job.arrival) * 1000.0),
                 "verify_ms": measured_ms, "batch_size": batch_size,
                 "suggested_max_draft": self.dispatch.suggested_max_draft(),
                 "token_ms": self.estimator.marginal_token_ms(job.cost)}
        p.event.succeed(reply)
        if s.mode == "centralized" and not s.closed:
            if job.kind in ("prefill", "resume"):  # the service's decode() queues the first step itself, once the
                self.env.process(self._first_step(s, done))  # prefill's reply reaches it: after the next plan
            else:
                self._continue_decoding(s, done)

    def _first_step(self, s: SimSession, done: float):
        yield self.env.timeout(0)
        if not s.closed:
            self._continue_decoding(s, done)

    def _continue_decoding(self, s: SimSession, done: float) -> None:
        """service.decode's loop: each decoded token streams out; the next step is queued at once."""
        produced = s.generated + 1  # the prefill's token plus one per decode step
        s.on_token(done, produced - 1)
        if produced < s.max_tokens:
            self._submit(s, "decode", new_tokens=1, draft_len=0)
        elif not s.finished.triggered:
            s.finished.succeed({"tokens": produced})
