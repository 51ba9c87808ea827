"""Admission control, pure: plain numbers about the server's load in, a refusal (or None) out.

New work is refused, never admitted work: a newcomer is turned away at once, with a Retry-After, when
the queue is too deep, the predicted backlog too long, most recent rounds missed their SLO, every session
slot is busy, or the KV it needs is spoken for. No clock, no I/O: the service and the simulator both ask
here with the numbers they hold, so they refuse the same sessions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wisp_edge.wire.errors import ApiError

MAX_RETRY_S = 30.0
MIN_SLO_JOBS = 20  # recent SLO jobs needed before attainment may refuse anyone
MIN_ATTAINMENT = 0.5
ACTIVE_WINDOW_S = 5.0  # by default, a session used this recently keeps its KV against newcomers


@dataclass(frozen=True)
class Limits:
    max_queue: int
    max_backlog_ms: float
    max_sessions: int
    keep_active_s: float = ACTIVE_WINDOW_S  # see keeps_kv

    @classmethod
    def of(cls, settings) -> Limits:
        """From anything with these ServeSettings fields (the server's settings, the simulator's)."""
        return cls(settings.max_queue, settings.max_backlog_ms, settings.max_sessions, settings.kv_keep_active_s)


@dataclass(frozen=True)
class Load:
    """What the server holds when a newcomer asks."""

    queue_depth: int
    backlog_ms: float  # predicted time to drain the queue
    slo_attainment: float  # share of recent SLO jobs that met their deadline
    slo_jobs: int  # how many recent SLO jobs that share is of
    open_sessions: int
    idle_session: bool  # one open session is idle, so it can be dropped for the newcomer
    kv_needed: float
    kv_available: float  # free + reclaimable from sessions out of use - reserved by queued work


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str  # stable, for clients
    message: str
    retry_after: float | None
    reason: str  # the finer label, for metrics

    def error(self) -> ApiError:
        return ApiError(self.status, self.code, self.message, retry_after=self.retry_after)


def retry_after_s(backlog_ms: float) -> float:
    """Come back once the predicted backlog has drained: 1 to 30 s."""
    return min(MAX_RETRY_S, max(1.0, math.ceil(backlog_ms / 1000.0)))


def too_long(prompt_tokens: int, kv_needed: float, kv_budget: float) -> Refusal | None:
    """A context the whole pool cannot hold is refused for good (413), whatever the load."""
    if kv_needed <= kv_budget:
        return None
    return Refusal(413, "context_too_long", f"{prompt_tokens} tokens need {kv_needed} bytes of KV, more than the "
                                            f"whole pool ({kv_budget})", None, "too_long")


def refusal(load: Load, limits: Limits) -> Refusal | None:
    """The first rule the newcomer breaks, in the order queue, backlog, SLO, sessions, memory; None: admit."""
    retry = retry_after_s(load.backlog_ms)
    if load.queue_depth >= limits.max_queue:
        return Refusal(429, "overloaded", f"{load.queue_depth} jobs queued (limit {limits.max_queue})", retry,
                       "queue_full")
    if load.backlog_ms > limits.max_backlog_ms:
        return Refusal(429, "overloaded", f"predicted queue time {load.backlog_ms:.0f} ms exceeds "
                                          f"{limits.max_backlog_ms:.0f} ms", retry, "backlog")
    if load.slo_jobs >= MIN_SLO_JOBS and load.slo_attainment < MIN_ATTAINMENT and load.queue_depth > 0:
        return Refusal(429, "overloaded", f"only {load.slo_attainment:.0%} of recent rounds met their SLO", retry,
                       "slo")
    if load.open_sessions >= limits.max_sessions and not load.idle_session:
        return Refusal(503, "too_many_sessions", f"{load.open_sessions} sessions open, all busy", retry,
                       "sessions_full")
    if load.kv_available < load.kv_needed:
        return Refusal(503, "kv_full", f"the KV pool is full of active sessions ({load.kv_needed} bytes needed, "
                                       f"{max(0, load.kv_available)} free or reclaimable)", retry, "kv_full")
    return None


def keeps_kv(busy: bool, idle_s: float, keep_active_s: float) -> bool:
    """Whether a session's KV is out of a newcomer's reach: it is mid-answer, or it was used within
    keep_active_s (`--kv-keep-active-s`, ACTIVE_WINDOW_S by default), so its edge is drafting the next
    block or the round trip is on the wire. Older idle sessions make room; they resend their tokens when
    they come back.

    This once held only while work was queued ("on a quiet server the least recently used idle session
    makes room"), but a queue that is empty at the instant a newcomer asks is not a quiet server: on a
    KV-bound A100 (`paper-kv`, 132 devices at 4 tokens/s) the SLO-aware scheduler drained its queue often
    enough that newcomers took the KV of sessions between two rounds, which then resumed and evicted others
    (2,083 evictions in a run against 801 under FCFS, whose queue is seldom empty)."""
    return busy or idle_s < keep_active_s
