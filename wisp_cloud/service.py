"""The verifier service: sessions, the job queue, the batch loop and admission control, without HTTP.

Every piece of target work is a job: a session's prefill (or a resume after eviction), a speculative
verify block, or one centralized decode step. Jobs go to the scheduler (`wisp` or `fcfs`, pure policy
objects); the loop asks it for a batch whenever the accelerator is free, evicts idle sessions if the
batch needs KV memory, runs one ragged forward in a worker thread, and resolves each job's future.
All bookkeeping (sessions, pool, scheduler, metrics) happens on the event loop thread; the worker
thread only touches the sessions of the batch it runs, which nobody else may touch while they are busy.

Replies to a verify are idempotent per round id; a block drafted from a stale prefix is refused with
the committed length; an evicted or forgotten session is refused with a code that tells the edge to
resend its committed tokens (it opens a session with `resume`), so no token is ever lost. A session
belongs to the API key that opened it (`owner`, a hash of the key): any other key hears 404, as if
the session did not exist.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import ProcessCollector

from wisp_cloud.estimator import FEATURE_NAMES, TimeEstimator, VerifyCost
from wisp_cloud.kv_pool import KVPool
from wisp_cloud.metrics import Metrics
from wisp_cloud.model.transformer import Transformer
from wisp_cloud.scheduler import INF, FcfsScheduler, VerifyJob, VerifyScheduler, WispScheduler
from wisp_cloud.settings import ServeSettings
from wisp_cloud.verification import InvalidDraftError, Verdict
from wisp_cloud.verifier import Prefill, StalePositionError, TargetSession, Verifier, Verify
from wisp_edge.openai_compat import ApiError
from wisp_edge.sampling import SamplingParams

log = logging.getLogger("wisp.service")

REPLY_MEMORY = 8  # rounds whose replies a session keeps for retries
TOMBSTONES = 65536  # forgotten session ids remembered, so the edge hears "evicted" rather than "unknown"
ATTAINMENT_WINDOW_S = 10.0
ACTIVE_WINDOW_S = 5.0  # under load, a session used this recently keeps its KV against newcomers
TRIM_EVERY_S = 5.0


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_malloc_trim = _libc_malloc_trim()


class ServiceError(ApiError):
    """A refusal by the verifier service (HTTP status, stable code, reason, optional Retry-After)."""


@dataclass
class Session:
    target: TargetSession
    mode: str  # "speculative" | "centralized"
    slo_rate: float | None
    first_token_time: float
    last_used: float
    owner: str | None = None  # id of the API key that opened it (None: the server runs without keys)
    generated: int = 0  # committed since the first target token (the SLO's N)
    alpha: float = 0.6  # per-token acceptance EWMA, the scheduler's E
    downlink_s: float = 0.0
    busy: bool = False  # a job is queued or running
    closed: bool = False
    replies: OrderedDict[int, tuple[int, dict]] = field(default_factory=OrderedDict)
    pending_round: tuple[int, int, asyncio.Future] | None = None  # (round id, position, future)

    @property
    def id(self) -> str:
        return self.target.session_id


@dataclass
class _Pending:
    job: VerifyJob
    work: Prefill | Verify
    session: Session
    future: asyncio.Future
    kind: str  # "prefill" | "resume" | "verify" | "decode"
    round_id: int | None = None


class VerifierService:
    def __init__(self, model: Transformer, settings: ServeSettings, estimator: TimeEstimator, *,
                 model_id: str, vocab_fingerprint: str | None, kv_budget_bytes: int,
                 clock: Callable[[], float] = time.monotonic, executor: ThreadPoolExecutor | None = None) -> None:
        self.model, self.settings, self.estimator = model, settings, estimator
        self.model_id, self.vocab_fingerprint = model_id, vocab_fingerprint
        self.clock = clock
        self.verifier = Verifier(model, max_draft=settings.max_draft)
        self.pool = KVPool(model, kv_budget_bytes, block_tokens=settings.kv_block_tokens)
        self.scheduler: VerifyScheduler = (
            WispScheduler(estimator) if settings.policy == "wisp" else
            FcfsScheduler(max_batch_jobs=settings.fcfs_max_batch, max_wait_s=settings.fcfs_max_wait_ms / 1000,
                          estimator=estimator))
        self.metrics = Metrics()
        self.metrics.kv_budget.set(self.pool.budget_bytes)
        # wisp_process_resident_memory_bytes, wisp_process_open_fds, ...: what a soak or an operator watches.
        ProcessCollector(namespace="wisp", registry=self.metrics.registry)
        self.eos_ids = set(model.args.eos_token_ids)
        self.sessions: dict[str, Session] = {}
        self._tombstones: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # id -> (reason, owner)
        self._queued: dict[int, _Pending] = {}
        self._job_ids = itertools.count(1)
        self._slo_outcomes: deque[tuple[float, bool]] = deque(maxlen=1024)
        # One worker thread runs every forward (the runtime also loads the model on it).
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-forward")
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._last_sweep = 0.0
        self._last_trim = 0.0
        self.batches_run = 0
        self._demoted_seen = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._batch_loop(), name="wisp-batch-loop")

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        for pending in list(self._queued.values()):
            self._fail(pending, ServiceError(503, "shutting_down", "the server is shutting down", retry_after=1))
        self._executor.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    # --- sessions ----------------------------------------------------------------------------------

    async def create_session(self, prompt_ids: list[int], params: SamplingParams, *, slo_rate: float | None = None,
                             vocab_fingerprint: str | None = None, resume: bool = False,
                             mode: str = "speculative", owner: str | None = None) -> tuple[Session, int | None, dict]:
        """Admit, prefill (scheduled like any job) and register a session; returns it, its first target
        token (None on resume: the edge already holds its committed tokens) and the timing of the prefill."""
        if vocab_fingerprint and self.vocab_fingerprint and vocab_fingerprint != self.vocab_fingerprint:
            self.metrics.rejected.labels("vocab_mismatch").inc()
            raise ServiceError(422, "vocab_mismatch", f"the drafter's vocabulary {vocab_fingerprint} differs from "
                                                      f"the target's {self.vocab_fingerprint}")
        slo_rate = slo_rate if slo_rate is not None else self.settings.default_slo
        now = self.clock()
        session_id = uuid.uuid4().hex
        try:
            target = self.verifier.open(session_id, prompt_ids, params, cache=None)
        except InvalidDraftError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise ServiceError(422, "invalid_request", str(exc)) from None
        need = self.pool.blocks_bytes(len(prompt_ids) + 1)
        if need > self.pool.budget_bytes:
            self.metrics.rejected.labels("too_long").inc()
            raise ServiceError(413, "context_too_long", f"{len(prompt_ids)} tokens need {need} bytes of KV, more "
                                                        f"than the whole pool ({self.pool.budget_bytes})")
        self._admit(need)
        target.cache = self.pool.new_cache(session_id)
        session = Session(target, mode, slo_rate, now, now, owner)
        self.sessions[session_id] = session
        self.metrics.sessions.labels(mode).inc()
        work = Prefill(target, sample_first=not resume)
        fed = len(prompt_ids) - (1 if resume else 0)
        if fed == 0:  # resuming a one-token context: nothing to cache
            return session, None, {"queue_ms": 0.0, "verify_ms": 0.0, "batch_size": 0}
        try:
            first, timing = await self._submit(session, work, "resume" if resume else "prefill", new_tokens=fed,
                                               cached=0, draft_len=0)
        except BaseException:
            self.close(session_id)
            raise
        log.info("session opened", extra={"session": session_id, "mode": mode, "prompt_tokens": len(prompt_ids),
                                          "resume": resume, "slo": slo_rate, "queue_ms": timing.get("queue_ms")})
        return session, first, timing

    def _admit(self, kv_bytes: int) -> None:
        """Refuse new work, never admitted work, when the queue, the SLOs or memory cannot take it."""
        try:
            self._check_capacity(kv_bytes)
        except ServiceError as exc:
            log.warning("new session refused", extra={"code": exc.code, "reason": exc.message,
                                                      "retry_after_s": exc.retry_after})
            raise

    def _check_capacity(self, kv_bytes: int) -> None:
        depth = len(self._queued)
        backlog_ms = self._backlog_ms()
        retry = min(30.0, max(1.0, math.ceil(backlog_ms / 1000.0)))
        if depth >= self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ServiceError(429, "overloaded", f"{depth} jobs queued (limit {self.settings.max_queue})",
                               retry_after=retry)
        if backlog_ms > self.settings.max_backlog_ms:
            self.metrics.rejected.labels("backlog").inc()
            raise ServiceError(429, "overloaded", f"predicted queue time {backlog_ms:.0f} ms exceeds "
                                                  f"{self.settings.max_backlog_ms:.0f} ms", retry_after=retry)
        attainment, count = self.slo_attainment()
        if count >= 20 and attainment < 0.5 and depth > 0:
            self.metrics.rejected.labels("slo").inc()
            raise ServiceError(429, "overloaded", f"only {attainment:.0%} of recent rounds met their SLO",
                               retry_after=retry)
        if len(self.sessions) >= self.settings.max_sessions and not self._drop_idle_sessions(1):
            self.metrics.rejected.labels("sessions_full").inc()
            raise ServiceError(503, "too_many_sessions", f"{len(self.sessions)} sessions open, all busy",
                               retry_after=retry)
        # Memory: what queued jobs will take is spoken for; under load (work queued) a newcomer may not
        # evict sessions that are mid-answer, only ones idle for a while (on a quiet server the least
        # recently used idle session still makes room: it resends its tokens when it comes back).
        now = self.clock()

        def kept(session_id: str) -> bool:
            session = self.sessions.get(session_id)
            return session is not None and (session.busy or (depth > 0 and now - session.last_used < ACTIVE_WINDOW_S))

        reserved = sum(p.job.kv_bytes for p in self._queued.values())
        available = self.pool.free_bytes + self.pool.evictable_bytes(kept) - reserved
        if available < kv_bytes:
            self.metrics.rejected.labels("kv_full").inc()
            raise ServiceError(503, "kv_full", f"the KV pool is full of active sessions ({kv_bytes} bytes needed, "
                                               f"{max(0, available)} free or reclaimable)", retry_after=retry)

    def _backlog_ms(self) -> float:
        return self.estimator.backlog_ms((p.job.cost for p in self._queued.values()), self.settings.max_batch_tokens)

    def slo_attainment(self) -> tuple[float, int]:
        """Share of SLO jobs finished by their deadline in the last few seconds, and how many there were."""
        horizon = self.clock() - ATTAINMENT_WINDOW_S
        recent = [ok for t, ok in self._slo_outcomes if t >= horizon]
        return (sum(recent) / len(recent) if recent else 1.0), len(recent)

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The session, if `owner` opened it; 404 for an unknown session or another key's, 410 if it was dropped."""
        session = self.sessions.get(session_id)
        if session is not None and session.owner != owner:
            session = None
        if session is None:
            reason, dropped_owner = self._tombstones.get(session_id, (None, None))
            if reason and dropped_owner == owner:
                raise ServiceError(410, "session_evicted", f"session {session_id} was {reason}: open a new session "
                                                           "with your committed tokens and resume=true")
            raise ServiceError(404, "unknown_session", f"no session {session_id} (the server may have restarted): "
                                                       "open a new session with your committed tokens and resume=true")
        return session

    def close(self, session_id: str) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        session.closed = True
        self.metrics.sessions.labels(session.mode).dec()
        for job_id, pending in list(self._queued.items()):
            if pending.session is session:
                self.scheduler.remove(job_id)
                self._fail(pending, ServiceError(410, "session_closed", "the session was closed"))
        if not session.busy:  # a running batch releases it when it finishes
            self.pool.release(session_id)
        self.metrics.kv_used.set(self.pool.used_bytes)
        return True

    def _forget(self, session: Session, reason: str) -> None:
        """Drop a session's record and KV; the edge hears `reason` and resends its tokens."""
        log.info("session dropped", extra={"session": session.id, "reason": reason, "tokens": session.target.position})
        self.close(session.id)
        self._tombstones[session.id] = (reason, session.owner)
        while len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _busy(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        return session is not None and session.busy

    def _drop_idle_sessions(self, count: int) -> bool:
        dropped = 0
        for session in sorted(self.sessions.values(), key=lambda s: s.last_used):
            if dropped == count:
                break
            if not session.busy:
                self._forget(session, "evicted (too many sessions)")
                self.metrics.evictions.inc()
                dropped += 1
        return dropped == count

    def _sweep_expired(self, now: float) -> None:
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for session in list(self.sessions.values()):
            if not session.busy and now - session.last_used > self.settings.session_ttl_s:
                self._forget(session, f"idle for more than {self.settings.session_ttl_s:.0f} s")

    # --- speculative rounds ------------------------------------------------------------------------

    async def verify(self, session_id: str, *, position: int, round_id: int, draft: list[int], q: list | None,
                     drafting_ms: float = 0.0, rtt_ms: float | None = None, owner: str | None = None) -> dict:
        session = self.get(session_id, owner)
        if session.mode != "speculative":
            raise ServiceError(409, "wrong_mode", "this session decodes on the server")
        cached = session.replies.get(round_id)
        if cached is not None and cached[0] == position:
            return {**cached[1], "replayed": True}
        if session.pending_round is not None:
            pending_round, pending_position, future = session.pending_round
            if pending_round == round_id and pending_position == position:
                return {**(await asyncio.shield(future)), "replayed": True}
            raise ServiceError(409, "round_in_flight", f"round {pending_round} of this session is still being verified",
                               committed=session.target.position)
        if rtt_ms is not None:
            session.downlink_s = max(0.0, rtt_ms) / 2000.0
        work = Verify(session.target, position, list(draft), q)
        try:
            self.verifier.check(work)
        except StalePositionError as exc:
            self.metrics.rejected.labels("stale").inc()
            raise ServiceError(409, "stale_position", str(exc), committed=exc.committed) from None
        except InvalidDraftError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise ServiceError(422, "invalid_request", str(exc)) from None
        pending = self._enqueue(session, work, "verify", new_tokens=len(draft) + 1,
                                cached=session.target.cache.length, draft_len=len(draft))
        pending.round_id = round_id
        session.pending_round = (round_id, position, pending.future)
        # Shielded: if this client goes away mid-round the round still completes and its reply is kept
        # for the retry, so the edge never loses the tokens the server committed.
        return await asyncio.shield(pending.future)

    def _suggested_max_draft(self) -> int:
        """A fair share of the batch token budget per active session, minus the target's own token."""
        active = max(1, sum(1 for s in self.sessions.values() if s.mode == "speculative"))
        return int(max(1, min(self.settings.max_draft, self.settings.max_batch_tokens // active - 1)))

    # --- centralized decoding ----------------------------------------------------------------------

    async def decode(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
                     slo_rate: float | None = None) -> AsyncIterator[int]:
        """Decode on the server alone (the centralized baseline), one scheduled job per token; the same
        batches carry other sessions' verify blocks (continuous batching). Stops after EOS or max_tokens."""
        session, token, _ = await self.create_session(prompt_ids, params, slo_rate=slo_rate, mode="centralized")
        try:
            self.metrics.generated.labels("centralized").inc()
            yield token
            produced = 1
            while produced < max_tokens and token not in self.eos_ids:
                # No draft: one q per draft token means none (an empty list) when sampling.
                work = Verify(session.target, session.target.position, [], None if params.greedy else [])
                verdict, _ = await self._submit(session, work, "decode", new_tokens=1,
                                                cached=session.target.cache.length, draft_len=0)
                token = verdict.token
                produced += 1
                self.metrics.generated.labels("centralized").inc()
                yield token
        finally:
            self.close(session.id)

    # --- the queue and the batch loop --------------------------------------------------------------

    async def _submit(self, session: Session, work: Prefill | Verify, kind: str, *, new_tokens: int, cached: int,
                      draft_len: int) -> tuple[Any, dict]:
        pending = self._enqueue(session, work, kind, new_tokens=new_tokens, cached=cached, draft_len=draft_len)
        return await pending.future

    def _enqueue(self, session: Session, work: Prefill | Verify, kind: str, *, new_tokens: int, cached: int,
                 draft_len: int) -> _Pending:
        if not self.running:
            raise ServiceError(503, "not_ready", "the batch loop is not running", retry_after=1)
        now = self.clock()
        cache = session.target.cache
        kv_bytes = self.pool.growth_bytes(cache, cache.length + new_tokens)
        if cache.capacity * self.pool.bytes_per_token + kv_bytes > self.pool.budget_bytes:
            raise ServiceError(413, "context_too_long", "the session no longer fits the KV pool")
        job = VerifyJob(next(self._job_ids), session.id, new_tokens, cached, draft_len, now,
                        slo_rate=session.slo_rate, committed=session.generated,
                        first_token_time=session.first_token_time, alpha=session.alpha,
                        downlink_s=session.downlink_s, kv_bytes=kv_bytes)
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(job, work, session, future, kind)
        job.payload = pending
        self.scheduler.submit(job)
        self._queued[job.job_id] = pending
        session.busy = True
        session.last_used = now
        self.pool.touch(session.id)
        self.metrics.queue_depth.set(len(self._queued))
        self._wake.set()
        return pending

    def _fail(self, pending: _Pending, error: Exception) -> None:
        self._queued.pop(pending.job.job_id, None)
        pending.session.busy = False
        if pending.kind == "verify":
            pending.session.pending_round = None
        if not pending.future.done():
            pending.future.set_exception(error)
            pending.future.exception()  # marked retrieved: nobody may be waiting any more

    def _preempt_newest(self) -> None:
        """Nothing queued fits the KV memory left by busy sessions: give back the newest job's session
        (its edge resends) so the oldest can run. vLLM preempts by recomputation the same way."""
        pending = max(self._queued.values(), key=lambda p: p.job.arrival)
        self.scheduler.remove(pending.job.job_id)
        self._fail(pending, ServiceError(410, "session_evicted", "evicted to free KV memory: open a new session "
                                                                 "with your committed tokens and resume=true"))
        self._forget(pending.session, "evicted to free KV memory")
        self.metrics.evictions.inc()

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock()
            self._sweep_expired(now)
            free = self.pool.free_bytes + self.pool.evictable_bytes(self._busy)
            batch = self.scheduler.form_batch(now, free, self.settings.max_batch_tokens)
            if not batch.jobs:
                if self._queued and batch.wait_s == 0.0:
                    self._preempt_newest()
                    continue
                if not self._queued:
                    self._trim_heap(now)
                self._wake.clear()
                timeout = None if batch.wait_s == INF else max(batch.wait_s, 0.0002)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            pendings: list[_Pending] = [job.payload for job in batch.jobs]
            for pending in pendings:
                self._queued.pop(pending.job.job_id, None)
            self.metrics.queue_depth.set(len(self._queued))
            for evicted in self.pool.evict_for(batch.kv_bytes, self._busy):
                self.metrics.evictions.inc()
                if evicted in self.sessions:
                    self._forget(self.sessions[evicted], "evicted to free KV memory")
            started = self.clock()
            try:
                results, measured_ms = await loop.run_in_executor(self._executor, self._forward,
                                                                  [p.work for p in pendings])
            except Exception as exc:  # a bug or a device error must not take the server down
                log.exception("batched forward failed", extra={"batch_size": len(pendings)})
                self.metrics.batch_errors.inc()
                # Each session's KV may be half written: drop them all; their edges resend committed
                # tokens after Retry-After (410 on the retry), so an innocent batch-mate loses no token.
                for pending in pendings:
                    self._fail(pending, ServiceError(503, "batch_failed", f"the batched forward failed "
                                                                          f"({type(exc).__name__}); retry",
                                                     retry_after=1))
                    self._forget(pending.session, "reset after a failed forward")
                continue
            self._record_batch(batch, pendings, started, measured_ms)
            for pending, result in zip(pendings, results):
                self._finish(pending, result, started, measured_ms, batch)
            self.metrics.kv_used.set(self.pool.used_bytes)

    def _trim_heap(self, now: float) -> None:
        """When idle, at most every TRIM_EVERY_S, hand freed heap pages back to the OS: ragged batches
        allocate tensors of ever-different sizes, and glibc keeps what they free, so without this the
        resident memory of a long-running server creeps up although nothing leaks."""
        if _malloc_trim is None or now - self._last_trim < TRIM_EVERY_S:
            return
        self._last_trim = now
        _malloc_trim(0)

    def _forward(self, work: list[Prefill | Verify]) -> tuple[list, float]:
        import torch

        t0 = time.perf_counter()
        results = self.verifier.run(work)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return results, (time.perf_counter() - t0) * 1000.0

    def _record_batch(self, batch, pendings: list[_Pending], started: float, measured_ms: float) -> None:
        self.batches_run += 1
        m = self.metrics
        m.batch_size.observe(len(pendings))
        m.batch_tokens.observe(batch.new_tokens or sum(p.job.new_tokens for p in pendings))
        m.verify_seconds.observe(measured_ms / 1000.0)
        costs = [p.job.cost for p in pendings]
        predicted_ms = self.estimator.predict(costs)
        m.predicted_seconds.observe(predicted_ms / 1000.0)
        if predicted_ms > 0:
            m.prediction_ratio.observe(measured_ms / predicted_ms)
        if self.settings.online_refit:
            self.estimator.observe([VerifyCost(c.new_tokens, c.cached_tokens) for c in costs], measured_ms)
        demoted = getattr(self.scheduler, "demoted_total", 0)
        if demoted > self._demoted_seen:
            m.demoted.inc(demoted - self._demoted_seen)
            self._demoted_seen = demoted
        log.debug("batch", extra={"batch_size": len(pendings), "new_tokens": batch.new_tokens,
                                  "predicted_ms": round(predicted_ms, 2), "measured_ms": round(measured_ms, 2),
                                  "queue_depth": len(self._queued)})

    def _finish(self, pending: _Pending, result: Any, started: float, measured_ms: float, batch) -> None:
        done = self.clock()
        session, job = pending.session, pending.job
        session.busy = False
        session.last_used = done
        if session.closed:
            self.pool.release(session.id)
        if isinstance(result, Verdict) and job.draft_len:
            observed = result.accepted / job.draft_len
            session.alpha = 0.7 * session.alpha + 0.3 * observed
        if pending.kind == "prefill":
            session.first_token_time = done
        elif pending.kind == "resume":
            session.first_token_time, session.generated = done, 0  # the SLO clock restarts with the session
        else:
            session.generated += 1 + (result.accepted if isinstance(result, Verdict) else 0)
        if job.slo_rate is not None:
            ok = done <= job.completion_deadline
            self._slo_outcomes.append((done, ok))
            self.metrics.slo_jobs.labels("met" if ok else "missed").inc()
        queue_ms = (started - job.arrival) * 1000.0
        self.metrics.queue_seconds.observe(max(0.0, queue_ms) / 1000.0)
        timing = {"queue_ms": round(max(0.0, queue_ms), 3), "verify_ms": round(measured_ms, 3),
                  "predicted_ms": round(batch.predicted_ms, 3) if batch.predicted_ms is not None else None,
                  "batch_size": len(batch.jobs), "batch_tokens": batch.new_tokens,
                  "queue_depth": len(self._queued)}
        if pending.kind == "verify":
            self._complete_round(pending, result, timing)
        elif not pending.future.done():
            pending.future.set_result((result, timing))

    def _complete_round(self, pending: _Pending, verdict: Verdict, timing: dict) -> None:
        """Record the reply on the session first, so a retry of this round gets it even if its caller left."""
        session, job = pending.session, pending.job
        reply = {"accepted": verdict.accepted, "token": verdict.token, "bonus": verdict.bonus,
                 "position": session.target.position, "round_id": pending.round_id, **timing,
                 "suggested_max_draft": self._suggested_max_draft()}
        position = session.target.position - verdict.accepted - 1
        session.replies[pending.round_id] = (position, reply)
        while len(session.replies) > REPLY_MEMORY:
            session.replies.popitem(last=False)
        session.pending_round = None
        self.metrics.drafted.inc(job.draft_len)
        self.metrics.accepted.inc(verdict.accepted)
        self.metrics.accepted_length.observe(verdict.accepted)
        self.metrics.generated.labels("speculative").inc(verdict.accepted + 1)
        if not pending.future.done():
            pending.future.set_result(reply)

    # --- reporting ---------------------------------------------------------------------------------

    def status(self) -> dict:
        attainment, count = self.slo_attainment()
        return {"model": self.model_id, "policy": self.settings.policy, "sessions": len(self.sessions),
                "queue_depth": len(self._queued), "batches_run": self.batches_run,
                "kv_used_bytes": self.pool.used_bytes, "kv_budget_bytes": self.pool.budget_bytes,
                "kv_evictions": self.pool.evictions, "slo_attainment": round(attainment, 4),
                "slo_jobs_recent": count,
                "estimator_ms": dict(zip(FEATURE_NAMES, (round(c, 6) for c in self.estimator.coefficients)))}
