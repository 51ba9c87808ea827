"""The service's batch loop: whenever the accelerator is free, the dispatcher's next plan, run as one ragged
forward on the worker thread; then each job's caller hears its result, or why there is none.

All bookkeeping (sessions, KV, scheduler, metrics) happens on the event loop thread; the worker thread
only touches the sessions of the batch it runs, which nobody else may touch while they are busy. A failed
forward must not take the server down: its sessions are reset and their edges resend their tokens.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from wisp_cloud.dispatch import Dispatcher
from wisp_cloud.metrics import Metrics
from wisp_cloud.scheduler import INF, Batch, VerifyJob
from wisp_cloud.session_table import Session
from wisp_cloud.verification import Verdict
from wisp_cloud.verifier import Prefill, Verifier, Verify
from wisp_edge.wire.errors import ApiError

log = logging.getLogger("wisp.service")

TRIM_EVERY_S = 5.0


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_malloc_trim = _libc_malloc_trim()


@dataclass
class Pending:
    """A job and who waits for it: the verifier's work, its session, and its caller's future, which gets
    (result, timing) unless `on_result` answers instead (a verify round records its reply first)."""

    job: VerifyJob
    work: Prefill | Verify
    session: Session
    future: asyncio.Future
    on_result: Callable[[Pending, Any, dict], None] | None = None


class BatchLoop:
    def __init__(self, dispatch: Dispatcher, verifier: Verifier, metrics: Metrics, *, clock: Callable[[], float],
                 executor: ThreadPoolExecutor, online_refit: bool, forget: Callable[[Session, str], None],
                 sweep: Callable[[float], None]) -> None:
        self.dispatch, self.verifier, self.metrics, self.clock = dispatch, verifier, metrics, clock
        self.online_refit = online_refit
        self._forget, self._sweep = forget, sweep  # the service's: drop a session for a reason; expire idle ones
        self._executor = executor  # one worker thread runs every forward (the runtime also loads the model on it)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._last_trim = 0.0
        self._demoted_seen = 0
        self.batches_run = 0

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="wisp-batch-loop")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self.dispatch.queued:
            self.fail(job.payload, ApiError(503, "shutting_down", "the server is shutting down", retry_after=1))
        self._executor.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def enqueue(self, session: Session, work: Prefill | Verify, kind: str, *, new_tokens: int, draft_len: int,
                on_result: Callable[[Pending, Any, dict], None] | None = None) -> Pending:
        if not self.running:
            raise ApiError(503, "not_ready", "the batch loop is not running", retry_after=1)
        job = self.dispatch.submit(session, kind, new_tokens=new_tokens, draft_len=draft_len, now=self.clock())
        pending = Pending(job, work, session, asyncio.get_running_loop().create_future(), on_result)
        job.payload = pending
        self.metrics.queue_depth.set(len(self.dispatch))
        self._wake.set()
        return pending

    def fail(self, pending: Pending, error: Exception) -> None:
        self.dispatch.withdraw(pending.job, pending.session)
        if pending.job.kind == "verify":
            pending.session.pending_round = None
        if not pending.future.done():
            pending.future.set_exception(error)
            pending.future.exception()  # marked retrieved: nobody may be waiting any more

    def _preempt(self, job: VerifyJob) -> None:
        """Nothing queued fits the KV memory left by busy sessions: give back the newest job's session
        (its edge resends) so the oldest can run. vLLM preempts by recomputation the same way."""
        pending: Pending = job.payload
        self.fail(pending, ApiError(410, "session_evicted", "evicted to free KV memory: open a new session "
                                                            "with your committed tokens and resume=true"))
        self._forget(pending.session, "evicted to free KV memory")
        self.metrics.evictions.inc()

    async def _idle(self, wait_s: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), None if wait_s == INF else wait_s)
        except TimeoutError:
            pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock()
            self._sweep(now)
            plan = self.dispatch.plan(now)
            if plan.preempted is not None:
                self._preempt(plan.preempted)
                continue
            if plan.batch is None:
                if not len(self.dispatch):
                    self._trim_heap(now)
                await self._idle(plan.wait_s)
                continue
            pendings: list[Pending] = [job.payload for job in plan.batch.jobs]
            self.metrics.queue_depth.set(len(self.dispatch))
            for session_id in plan.evicted:
                self.metrics.evictions.inc()
                evicted = self.dispatch.sessions.lookup(session_id)
                if evicted is not None:
                    self._forget(evicted, "evicted to free KV memory")
            started = self.clock()
            try:
                results, measured_ms = await loop.run_in_executor(self._executor, self._forward,
                                                                  [p.work for p in pendings])
            except Exception as exc:  # a bug or a device error must not take the server down
                self._failed(pendings, exc)
                continue
            self._record(plan.batch, pendings, measured_ms)
            for pending, result in zip(pendings, results):
                self._finish(pending, result, started, measured_ms, plan.batch)
            self.metrics.kv_used.set(self.dispatch.ledger.used_bytes)
            blocks = getattr(self.dispatch.ledger, "blocks", None)  # the paged pool's prefix cache
            if blocks is not None:
                self.metrics.sync_prefix_cache(blocks.queries_tokens, blocks.hits_tokens)

    def _failed(self, pendings: list[Pending], exc: Exception) -> None:
        """Each session's KV may be half written: drop them all; their edges resend committed tokens after
        Retry-After (410 on the retry), so an innocent batch-mate loses no token."""
        log.exception("batched forward failed", extra={"batch_size": len(pendings)}, exc_info=exc)
        self.metrics.batch_errors.inc()
        for pending in pendings:
            self.fail(pending, ApiError(503, "batch_failed", f"the batched forward failed ({type(exc).__name__}); "
                                                             "retry", retry_after=1))
            self._forget(pending.session, "reset after a failed forward")

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
        if self.verifier.model.device.type == "cuda":
            torch.cuda.synchronize()
        return results, (time.perf_counter() - t0) * 1000.0

    def _record(self, batch: Batch, pendings: list[Pending], measured_ms: float) -> None:
        self.batches_run += 1
        estimator = self.dispatch.estimator
        costs = [p.job.cost for p in pendings]
        predicted_ms = estimator.predict(costs)
        self.metrics.record_batch(len(pendings), batch.new_tokens or sum(c.new_tokens for c in costs), measured_ms,
                                  predicted_ms)
        if self.online_refit:
            estimator.observe(costs, measured_ms)
        demoted = getattr(self.dispatch.scheduler, "demoted_total", 0)
        if demoted > self._demoted_seen:
            self.metrics.demoted.inc(demoted - self._demoted_seen)
            self._demoted_seen = demoted
        log.debug("batch", extra={"batch_size": len(pendings), "new_tokens": batch.new_tokens,
                                  "predicted_ms": round(predicted_ms, 2), "measured_ms": round(measured_ms, 2),
                                  "queue_depth": len(self.dispatch)})

    def _finish(self, pending: Pending, result: Any, started: float, measured_ms: float, batch: Batch) -> None:
        job = pending.job
        met = self.dispatch.finish(job, pending.session, result.accepted if isinstance(result, Verdict) else 0,
                                   self.clock())
        if met is not None:
            self.metrics.slo_jobs.labels("met" if met else "missed").inc()
        queue_ms = max(0.0, (started - job.arrival) * 1000.0)
        self.metrics.queue_seconds.observe(queue_ms / 1000.0)
        timing = {"queue_ms": round(queue_ms, 3), "verify_ms": round(measured_ms, 3),
                  "predicted_ms": round(batch.predicted_ms, 3) if batch.predicted_ms is not None else None,
                  "batch_size": len(batch.jobs), "batch_tokens": batch.new_tokens, "queue_depth": len(self.dispatch),
                  "token_ms": round(self.dispatch.estimator.marginal_token_ms(job.cost), 4)}
        if pending.on_result is not None:
            pending.on_result(pending, result, timing)
        elif not pending.future.done():
            pending.future.set_result((result, timing))
