"""The verifier's work queue, where its pure parts meet: the session table, admission, KV accounting, the
SLO window and the scheduler. Clock-free and I/O-free (the caller passes `now`), so the service (asyncio
and a worker thread) and the simulator (SimPy) drive the same decisions: who is admitted, which jobs form
each batch, whose KV is reclaimed for it, whose session is given back when nothing fits.

Every piece of target work is a job: a session's prefill (or its resume after an eviction), a verify
block, or one centralized decode step. What a job carries (`VerifyJob.payload`) and what running a batch
means belong to the caller; the queue and the bookkeeping around it belong here.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

from wisp_cloud.admission import Limits, Load, Refusal, keeps_kv, refusal, too_long
from wisp_cloud.estimator import TimeEstimator
from wisp_cloud.kv_ledger import KVLedger
from wisp_cloud.scheduler import CLOCK_STARTERS, INF, Batch, VerifyJob, VerifyScheduler
from wisp_cloud.session_table import SessionRecord, SessionTable
from wisp_cloud.slo_window import SloWindow
from wisp_edge.wire.errors import ApiError

MIN_WAIT_S = 0.0002  # shortest timed wait of a batch loop, so a tiny wait does not spin


@dataclass
class Plan:
    """What the batch loop does next: run `batch` (once the sessions in `evicted` are forgotten: their KV
    made room for it), give back the session of `preempted` (nothing queued fits the memory busy sessions
    leave), or wait for a submission, at most `wait_s` seconds (inf: until one comes)."""

    batch: Batch | None = None
    evicted: list[Hashable] = field(default_factory=list)
    preempted: VerifyJob | None = None
    wait_s: float = INF


class Dispatcher:
    def __init__(self, scheduler: VerifyScheduler, estimator: TimeEstimator, ledger: KVLedger,
                 sessions: SessionTable, limits: Limits, *, max_batch_tokens: int, max_draft: int,
                 slo: SloWindow | None = None) -> None:
        self.scheduler, self.estimator, self.ledger, self.sessions = scheduler, estimator, ledger, sessions
        self.limits, self.max_batch_tokens, self.max_draft = limits, max_batch_tokens, max_draft
        self.slo = slo or SloWindow()
        self._queued: dict[Hashable, VerifyJob] = {}
        self._job_ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def queued(self) -> list[VerifyJob]:
        return list(self._queued.values())

    def backlog_ms(self) -> float:
        return self.estimator.backlog_ms((job.cost for job in self._queued.values()), self.max_batch_tokens)

    def suggested_max_draft(self) -> int:
        """A fair share of the batch token budget per active session, minus the target's own token."""
        active = max(1, self.sessions.speculative)
        return int(max(1, min(self.max_draft, self.max_batch_tokens // active - 1)))

    # --- admission -----------------------------------------------------------------------------------

    def admission(self, now: float, prompt_tokens: int, *,
                  check_load: bool = True) -> tuple[Refusal | None, SessionRecord | None]:
        """Whether a newcomer with `prompt_tokens` may open a session: the refusal, or None and the idle
        session to drop first (None: no slot needs freeing). With `check_load` off only size is checked."""
        need = self.ledger.blocks_bytes(prompt_tokens + 1)
        refused = too_long(prompt_tokens, need, self.ledger.budget_bytes)
        if refused is not None or not check_load:
            return refused, None
        depth = len(self._queued)
        drop = self.sessions.least_recent_idle() if len(self.sessions) >= self.limits.max_sessions else None

        def kept(session_id: Hashable) -> bool:
            session = self.sessions.lookup(session_id)
            return session is not None and session is not drop and \
                keeps_kv(session.busy, now - session.last_used, self.limits.keep_active_s)

        # Memory: what queued jobs will take is spoken for; what sessions in use hold is out of reach.
        available = self.ledger.free_bytes + self.ledger.evictable_bytes(kept) - self.ledger.reserved_bytes
        attainment, count = self.slo.attainment(now)
        load = Load(depth, self.backlog_ms(), attainment, count, len(self.sessions), drop is not None, need,
                    available)
        refused = refusal(load, self.limits)
        return refused, (drop if refused is None else None)

    # --- the queue -----------------------------------------------------------------------------------

    def submit(self, session: SessionRecord, kind: str, *, new_tokens: int, draft_len: int,
               now: float) -> VerifyJob:
        """Queue a job for `session` (its KV `session.cache` grows by what the round allocates)."""
        cache = session.cache
        kv_bytes = self.ledger.growth_bytes(cache, cache.length + new_tokens)
        if cache.capacity * self.ledger.bytes_per_token + kv_bytes > self.ledger.budget_bytes:
            raise ApiError(413, "context_too_long", "the session no longer fits the KV pool")
        job = VerifyJob(next(self._job_ids), session.id, new_tokens, cache.length, draft_len, now,
                        slo_rate=session.slo_rate, committed=session.generated,
                        first_token_time=session.first_token_time, alpha=session.alpha,
                        downlink_s=session.downlink_s, kv_bytes=kv_bytes, kind=kind)
        self.scheduler.submit(job)
        self._queued[job.job_id] = job
        self.ledger.reserve(job.job_id, kv_bytes)
        session.busy = True
        session.last_used = now
        self.ledger.touch(session.id)
        return job

    def withdraw(self, job: VerifyJob, session: SessionRecord) -> None:
        """The job will not finish (failed, cancelled, preempted): off the queue if queued; its session is idle."""
        if self._queued.pop(job.job_id, None) is not None:
            self.scheduler.remove(job.job_id)
            self.ledger.unreserve(job.job_id)
        session.busy = False

    def close(self, session: SessionRecord) -> list[VerifyJob]:
        """Drop a session: its queued jobs are withdrawn (returned, for their callers to hear why) and its KV
        released, unless a running batch holds it (the batch releases it when it finishes)."""
        if self.sessions.pop(session.id) is None:
            return []
        session.closed = True
        withdrawn = [job for job in self._queued.values() if job.session_id == session.id]
        for job in withdrawn:
            self.withdraw(job, session)
        if not session.busy:
            self.ledger.release(session.id)
        return withdrawn

    def plan(self, now: float) -> Plan:
        """The next step of the batch loop, whenever the accelerator is free."""
        free = self.ledger.free_bytes + self.ledger.evictable_bytes(self.sessions.busy)
        batch = self.scheduler.form_batch(now, free, self.max_batch_tokens)
        if not batch.jobs:
            if self._queued and batch.wait_s == 0.0:
                return Plan(preempted=max(self._queued.values(), key=lambda job: job.arrival))
            return Plan(wait_s=max(batch.wait_s, MIN_WAIT_S))
        for job in batch.jobs:
            del self._queued[job.job_id]
            self.ledger.unreserve(job.job_id)
        return Plan(batch, self.ledger.evict_for(batch.kv_bytes, self.sessions.busy))

    def finish(self, job: VerifyJob, session: SessionRecord, accepted: int, done: float) -> bool | None:
        """A job ran and `accepted` of its drafts were accepted: the session's state moves on. Returns whether
        it met its SLO (None: it had none, or it is a prefill or resume, which the token-rate SLO does not
        bound: a prefill's finish starts the SLO clock)."""
        session.busy = False
        session.last_used = done
        if session.closed:
            self.ledger.release(session.id)
        session.record_round(job.kind, accepted, job.draft_len, done)
        if job.slo_rate is None or job.kind in CLOCK_STARTERS:  # counted, every prefill was a miss
            return None
        met = done <= job.completion_deadline
        self.slo.record(done, met)
        return met
