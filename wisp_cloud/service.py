"""The verifier service without HTTP: open sessions, verify their rounds, decode centrally, close them.

The parts, one job each: `SessionTable` (sessions, tombstones, reply memory), `admission` (pure refusal
rules), `KVPool` (torch caches, accounted by `KVLedger`), `SloWindow` (recent SLO attainment), the
scheduler (`wisp` or `fcfs`, pure policies), `Dispatcher` (the queue where those parts meet, shared with
the simulator) and `BatchLoop` (one ragged forward at a time on a worker thread). This module turns
requests into jobs and jobs' results into replies; the HTTP layer talks to it through the methods and
views below only.

Replies to a verify are idempotent per round id; a block drafted from a stale prefix is refused with
the committed length; an evicted or forgotten session is refused with a code that tells the edge to
resend its committed tokens (it opens a session with `resume`), so no token is ever lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from prometheus_client import ProcessCollector

from wisp_cloud.admission import Limits
from wisp_cloud.batch_loop import BatchLoop, Pending
from wisp_cloud.dispatch import Dispatcher
from wisp_cloud.estimator import FEATURE_NAMES, TimeEstimator
from wisp_cloud.kv_pool import KVPool
from wisp_cloud.metrics import Metrics
from wisp_cloud.model.transformer import Transformer
from wisp_cloud.scheduler import FcfsScheduler, VerifyScheduler
from wisp_cloud.session_table import Session, SessionTable
from wisp_cloud.settings import ServeSettings
from wisp_cloud.slo_window import SloWindow
from wisp_cloud.verification import InvalidDraftError, Verdict
from wisp_cloud.verifier import Prefill, StalePositionError, Verifier, Verify
from wisp_cloud.wisp_scheduler import WispScheduler
from wisp_edge.wire.errors import ApiError
from wisp_edge.wire.protocol import SessionStarted
from wisp_edge.wire.sampling import SamplingParams

log = logging.getLogger("wisp.service")

SWEEP_EVERY_S = 1.0


def make_scheduler(settings: ServeSettings, estimator: TimeEstimator) -> VerifyScheduler:
    if settings.policy == "wisp":
        return WispScheduler(estimator, prefill_wait_s=WispScheduler.prefill_wait_for(settings.ttft_slo_s,
                                                                                       settings.prefill_wait_s))
    return FcfsScheduler(max_batch_jobs=settings.fcfs_max_batch, max_wait_s=settings.fcfs_max_wait_ms / 1000,
                         estimator=estimator)


class VerifierService:
    def __init__(self, model: Transformer, settings: ServeSettings, estimator: TimeEstimator, *,
                 model_id: str, vocab_fingerprint: str | None, kv_budget_bytes: int,
                 clock: Callable[[], float] = time.monotonic, executor: ThreadPoolExecutor | None = None) -> None:
        self.settings, self.estimator, self.clock = settings, estimator, clock
        self.model_id, self.vocab_fingerprint = model_id, vocab_fingerprint
        self.verifier = Verifier(model, max_draft=settings.max_draft)
        self.pool = KVPool(model, kv_budget_bytes, block_tokens=settings.kv_block_tokens)
        self.sessions = SessionTable()
        self.slo = SloWindow()
        self.dispatch = Dispatcher(make_scheduler(settings, estimator), estimator, self.pool, self.sessions,
                                   Limits.of(settings), max_batch_tokens=settings.max_batch_tokens,
                                   max_draft=settings.max_draft, slo=self.slo)
        self.metrics = Metrics()
        self.metrics.kv_budget.set(self.pool.budget_bytes)
        # wisp_process_resident_memory_bytes, wisp_process_open_fds, ...: what a soak or an operator watches.
        ProcessCollector(namespace="wisp", registry=self.metrics.registry)
        self.eos_ids = set(model.args.eos_token_ids)
        self.batches = BatchLoop(
            self.dispatch, self.verifier, self.metrics, clock=clock, online_refit=settings.online_refit,
            executor=executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-forward"),
            forget=self._forget, sweep=self._sweep_expired)
        self._last_sweep = 0.0

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.batches.start()

    async def stop(self) -> None:
        await self.batches.stop()

    @property
    def running(self) -> bool:
        return self.batches.running

    # --- sessions ----------------------------------------------------------------------------------

    async def create_session(self, prompt_ids: list[int], params: SamplingParams, *, slo_rate: float | None = None,
                             vocab_fingerprint: str | None = None, resume: bool = False,
                             owner: str | None = None) -> SessionStarted:
        """Open a speculative session for `owner` (prefill scheduled like any job): the reply to the edge."""
        session, first, timing = await self._open(prompt_ids, params, slo_rate=slo_rate, resume=resume,
                                                  vocab_fingerprint=vocab_fingerprint, owner=owner)
        return SessionStarted(session_id=session.id, first_token=first, position=session.position,
                              queue_ms=timing.get("queue_ms", 0.0), prefill_ms=timing.get("verify_ms", 0.0),
                              vocab_fingerprint=self.vocab_fingerprint, max_draft=self.settings.max_draft)

    async def _open(self, prompt_ids: list[int], params: SamplingParams, *, slo_rate: float | None = None,
                    vocab_fingerprint: str | None = None, resume: bool = False, mode: str = "speculative",
                    owner: str | None = None) -> tuple[Session, int | None, dict]:
        """Admit, prefill and register a session; returns it, its first target token (None on resume: the
        edge already holds its committed tokens) and the timing of the prefill."""
        if vocab_fingerprint and self.vocab_fingerprint and vocab_fingerprint != self.vocab_fingerprint:
            self.metrics.rejected.labels("vocab_mismatch").inc()
            raise ApiError(422, "vocab_mismatch", f"the drafter's vocabulary {vocab_fingerprint} differs from "
                                                  f"the target's {self.vocab_fingerprint}")
        slo_rate = slo_rate if slo_rate is not None else self.settings.default_slo
        now = self.clock()
        session_id = uuid.uuid4().hex
        try:
            target = self.verifier.open(session_id, prompt_ids, params, cache=None)
        except InvalidDraftError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(422, "invalid_request", str(exc)) from None
        refused, drop = self.dispatch.admission(now, len(prompt_ids))
        if refused is not None:
            self.metrics.rejected.labels(refused.reason).inc()
            log.warning("new session refused", extra={"code": refused.code, "reason": refused.message,
                                                       "retry_after_s": refused.retry_after})
            raise refused.error()
        if drop is not None:
            self._forget(drop, "evicted (too many sessions)")
            self.metrics.evictions.inc()
        target.cache = self.pool.new_cache(session_id)
        session = Session(session_id, mode, slo_rate, now, now, target=target, owner=owner)
        self.sessions.add(session)
        self.metrics.sessions.labels(mode).inc()
        fed = len(prompt_ids) - (1 if resume else 0)
        if fed == 0:  # resuming a one-token context: nothing to cache
            return session, None, {"queue_ms": 0.0, "verify_ms": 0.0, "batch_size": 0}
        try:
            pending = self.batches.enqueue(session, Prefill(target, sample_first=not resume),
                                           "resume" if resume else "prefill", new_tokens=fed, draft_len=0)
            first, timing = await pending.future
        except BaseException:
            self._close(session)
            raise
        log.info("session opened", extra={"session": session_id, "mode": mode, "prompt_tokens": len(prompt_ids),
                                          "resume": resume, "slo": slo_rate, "queue_ms": timing.get("queue_ms")})
        return session, first, timing

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The session, if `owner` opened it; 404 for an unknown session or another key's, 410 if it was dropped."""
        return self.sessions.get(session_id, owner)

    def close(self, session_id: str, owner: str | None = None) -> None:
        """Close a session `owner` opened and free its KV (404 / 410 as `get`)."""
        self._close(self.get(session_id, owner))

    def _close(self, session: Session) -> None:
        if session.closed:
            return
        for job in self.dispatch.close(session):
            self.batches.fail(job.payload, ApiError(410, "session_closed", "the session was closed"))
        self.metrics.sessions.labels(session.mode).dec()
        self.metrics.kv_used.set(self.pool.used_bytes)

    def _forget(self, session: Session, reason: str) -> None:
        """Drop a session's record and KV; the edge hears `reason` and resends its tokens."""
        log.info("session dropped", extra={"session": session.id, "reason": reason, "tokens": session.position})
        self._close(session)
        self.sessions.tombstone(session, reason)

    def _sweep_expired(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_EVERY_S:
            return
        self._last_sweep = now
        for session in self.sessions.expired(now, self.settings.session_ttl_s):
            self._forget(session, f"idle for more than {self.settings.session_ttl_s:.0f} s")

    # --- speculative rounds ------------------------------------------------------------------------

    async def verify(self, session_id: str, *, position: int, round_id: int, draft: list[int], q: list | None,
                     drafting_ms: float = 0.0, rtt_ms: float | None = None, owner: str | None = None) -> dict:
        session = self.get(session_id, owner)
        if session.mode != "speculative":
            raise ApiError(409, "wrong_mode", "this session decodes on the server")
        replayed = session.replay(round_id, position)
        if replayed is not None:
            return replayed
        if session.pending_round is not None:
            pending_round, pending_position, future = session.pending_round
            if pending_round == round_id and pending_position == position:
                return {**(await asyncio.shield(future)), "replayed": True}
            raise ApiError(409, "round_in_flight", f"round {pending_round} of this session is still being verified",
                           committed=session.position)
        if rtt_ms is not None:
            session.downlink_s = max(0.0, rtt_ms) / 2000.0
        work = Verify(session.target, position, list(draft), q)
        try:
            self.verifier.check(work)
        except StalePositionError as exc:
            self.metrics.rejected.labels("stale").inc()
            raise ApiError(409, "stale_position", str(exc), committed=exc.committed) from None
        except InvalidDraftError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(422, "invalid_request", str(exc)) from None
        pending = self.batches.enqueue(session, work, "verify", new_tokens=len(draft) + 1, draft_len=len(draft),
                                       on_result=partial(self._complete_round, round_id))
        session.pending_round = (round_id, position, pending.future)
        # Shielded: if this client goes away mid-round the round still completes and its reply is kept
        # for the retry, so the edge never loses the tokens the server committed.
        return await asyncio.shield(pending.future)

    def _complete_round(self, round_id: int, pending: Pending, verdict: Verdict, timing: dict) -> None:
        """Record the reply on the session first, so a retry of this round gets it even if its caller left."""
        session = pending.session
        reply = {"accepted": verdict.accepted, "token": verdict.token, "bonus": verdict.bonus,
                 "position": session.position, "round_id": round_id, **timing,
                 "suggested_max_draft": self.dispatch.suggested_max_draft()}
        session.remember(round_id, session.position - verdict.accepted - 1, reply)
        session.pending_round = None
        self.metrics.drafted.inc(pending.job.draft_len)
        self.metrics.accepted.inc(verdict.accepted)
        self.metrics.accepted_length.observe(verdict.accepted)
        self.metrics.generated.labels("speculative").inc(verdict.accepted + 1)
        if not pending.future.done():
            pending.future.set_result(reply)

    # --- centralized decoding ----------------------------------------------------------------------

    async def decode(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
                     slo_rate: float | None = None) -> AsyncIterator[int]:
        """Decode on the server alone (the centralized baseline), one scheduled job per token; the same
        batches carry other sessions' verify blocks (continuous batching). Stops after EOS or max_tokens.

        Each step is queued by the batch loop itself as the previous one finishes (`on_result`), before the
        loop forms its next batch. Queued by this coroutine when it resumes, the step came too late for that
        batch whenever other work was waiting: two decoding sessions took turns instead of sharing forwards
        (tools/validate.py measured 2 devices at 0.9x the tokens/s of one)."""
        session, token, _ = await self._open(prompt_ids, params, slo_rate=slo_rate, mode="centralized")
        queued = 1  # tokens produced or under way
        following: Pending | ApiError | None = None  # the step queued after the current one, or why none could be

        def step() -> Pending:
            # No draft: one q per draft token means none (an empty list) when sampling.
            work = Verify(session.target, session.position, [], None if params.greedy else [])
            return self.batches.enqueue(session, work, "decode", new_tokens=1, draft_len=0, on_result=on_result)

        def on_result(pending: Pending, verdict: Verdict, timing: dict) -> None:
            nonlocal queued, following
            queued += 1
            if queued < max_tokens and verdict.token not in self.eos_ids and not session.closed:
                try:
                    following = step()
                except ApiError as exc:  # heard by the consumer after this step's token
                    following = exc
            if not pending.future.done():
                pending.future.set_result((verdict, timing))

        pending: Pending | None = None
        try:
            self.metrics.generated.labels("centralized").inc()
            yield token
            if max_tokens > 1 and token not in self.eos_ids:
                pending = step()
            while pending is not None:
                verdict, _ = await pending.future
                nxt, following = following, None
                pending = nxt if isinstance(nxt, Pending) else None
                self.metrics.generated.labels("centralized").inc()
                yield verdict.token
                if isinstance(nxt, ApiError):
                    raise nxt
        finally:  # a step still queued is withdrawn here; one in a running batch finishes and queues no more
            self._close(session)

    # --- views for the HTTP layer ------------------------------------------------------------------

    def info(self) -> dict:
        """What an edge needs before opening sessions (the model's text side is the HTTP layer's)."""
        return {"vocab_fingerprint": self.vocab_fingerprint, "max_draft": self.settings.max_draft,
                "policy": self.settings.policy, "eos_token_ids": sorted(self.eos_ids)}

    def render_metrics(self) -> bytes:
        self.metrics.kv_used.set(self.pool.used_bytes)
        return self.metrics.render()

    def status(self) -> dict:
        attainment, count = self.slo.attainment(self.clock())
        return {"model": self.model_id, "policy": self.settings.policy, "sessions": len(self.sessions),
                "queue_depth": len(self.dispatch), "batches_run": self.batches.batches_run,
                "kv_used_bytes": self.pool.used_bytes, "kv_budget_bytes": self.pool.budget_bytes,
                "kv_evictions": self.pool.evictions, "slo_attainment": round(attainment, 4),
                "slo_jobs_recent": count,
                "estimator_ms": dict(zip(FEATURE_NAMES, (round(c, 6) for c in self.estimator.coefficients)))}
