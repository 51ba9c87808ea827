"""Verification batch scheduling: which queued draft blocks go into the next batched forward.

Two policies behind one interface (`VerifyScheduler`), both pure: the caller passes the clock (`now`, in
seconds) and the accelerator's free memory; they return a `Batch` and never sleep or do I/O, so the real
server and the simulator drive the same code.

- `WispScheduler` (the paper's SLO-aware policy, in wisp_scheduler.py): urgent jobs earliest-deadline-first,
  then the rest by density, every addition priced with the estimator and checked against memory, the token
  cap and the earliest completion deadline in the batch; prefills and resumes (which start the SLO clock)
  are best effort. Optionally, jobs late by more than a grace are demoted to best effort.
- `FcfsScheduler` (the SLED baseline, here): first come first served with a batch cap and a max wait; no
  deadlines, no estimator.

Deadlines (ours, after PAPER.md): with r the SLO rate (tokens/s), N the tokens committed so far, t0 the
first token's time and E the expected accepted count of this round,
    completion deadline  D = t0 + (N + E + 1) / r - downlink      (the +1 is the correction/bonus token)
    start deadline       S = D - T({i}) / 1000                     (T in ms, with the estimator's margin)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol

from wisp_cloud.estimator import TimeEstimator, VerifyCost

INF = math.inf


def expected_accepted(alpha: float, draft_len: int) -> float:
    """E = sum_{j=1..k} alpha^j = alpha (1 - alpha^k) / (1 - alpha): accepted drafts if each survives w.p. alpha."""
    alpha = min(max(alpha, 0.0), 1.0)
    if draft_len <= 0:
        return 0.0
    if alpha > 1.0 - 1e-9:  # the closed form is 0/0 at alpha = 1; the limit is k
        return float(draft_len)
    return alpha * (1.0 - alpha**draft_len) / (1.0 - alpha)


# Jobs that start a session's SLO clock (D's t0 is when they finish): they can be neither early nor late, so
# the token-rate SLO does not bound them (the scheduler treats them as best effort, attainment skips them).
CLOCK_STARTERS = frozenset({"prefill", "resume"})


def logit_rows(kind: str, new_tokens: int) -> int:
    """Rows of logits a job reads (the estimator's R): a prefill samples the first token from its last row, a
    resume samples nothing (the edge already holds that token), a verify block or a decode step reads all."""
    if kind == "prefill":
        return min(new_tokens, 1)
    return 0 if kind == "resume" else new_tokens


@dataclass
class VerifyJob:
    """One queued verify (or prefill) request: what it costs and when its session needs the answer."""

    job_id: Hashable
    session_id: str
    new_tokens: int  # n: tokens the forward runs for this request (a prefill: the uncached prompt)
    cached_tokens: int  # C: prefix already in this session's KV
    draft_len: int  # k: draft tokens in the block (0 for a prefill)
    arrival: float  # s, on the scheduler's clock
    slo_rate: float | None = None  # r, tokens/s; None: best effort
    committed: int = 0  # N: tokens committed to the session so far
    first_token_time: float = 0.0  # t0, s
    alpha: float = 0.0  # the session's per-token acceptance EWMA
    downlink_s: float = 0.0  # expected time for the reply to reach the device
    kv_bytes: int = 0  # accelerator memory the round needs
    kind: str = "verify"  # "prefill" | "resume" | "verify" | "decode": what finishing it means to the session
    demoted: bool = False  # set by WispScheduler when the SLO became unreachable
    payload: Any = field(default=None, repr=False, compare=False)  # the server's own request object

    @property
    def cost(self) -> VerifyCost:
        return VerifyCost(self.new_tokens, self.cached_tokens, logit_rows(self.kind, self.new_tokens))

    @property
    def expected_accepted(self) -> float:
        return expected_accepted(self.alpha, self.draft_len)

    @property
    def completion_deadline(self) -> float:
        """D: when verification must finish so the reply lands on schedule; inf for best effort."""
        if self.slo_rate is None:
            return INF
        return self.first_token_time + (self.committed + self.expected_accepted + 1) / self.slo_rate - self.downlink_s

    def start_deadline(self, estimator: TimeEstimator) -> float:
        """S: the latest start that still meets D when verified alone."""
        return self.completion_deadline - estimator.predict_one(self.cost) / 1000.0


@dataclass
class Batch:
    """A scheduling decision. Empty means: nothing to run now; call again in `wait_s` seconds (inf: the queue
    is empty; 0: work is queued but nothing fits the free memory, so call again when memory frees)."""

    jobs: list[VerifyJob]
    predicted_ms: float | None  # the estimator's T(batch) with margin; None when the policy has no estimator
    formed_at: float
    new_tokens: int = 0
    kv_bytes: int = 0
    wait_s: float = 0.0

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def predicted_finish(self) -> float | None:
        return None if self.predicted_ms is None else self.formed_at + self.predicted_ms / 1000.0


@dataclass(frozen=True)
class QueueStats:
    depth: int
    oldest_wait_s: float  # 0 when empty
    best_effort: int  # queued jobs with no SLO or a demoted one (WISP: also prefills and resumes)
    demoted_total: int  # jobs demoted since start (WISP only)


class VerifyScheduler(Protocol):
    def submit(self, job: VerifyJob) -> None: ...
    def remove(self, job_id: Hashable) -> VerifyJob | None: ...
    def form_batch(self, now: float, free_memory_bytes: float, max_batch_tokens: float) -> Batch: ...
    def next_decision_time(self, now: float) -> float: ...
    def stats(self, now: float) -> QueueStats: ...
    def __len__(self) -> int: ...


class FcfsScheduler:
    """The SLED baseline: first come first served, released when full or when the oldest has waited max_wait.

    A batch takes jobs strictly in submission order (no skipping ahead) up to `max_batch_jobs`, the token
    cap (the smaller of the constructor's and the call's) and the free memory. It is released when it is
    full (the job cap is reached, or the next job in line does not fit) or when the oldest queued job has
    waited `max_wait_s`; otherwise the batch is empty and `wait_s` says when the wait runs out. The first
    job is exempt from the token cap so an oversized prompt is not stuck forever. The estimator, if given,
    only labels the batch with a predicted time: SLED uses none to decide.
    """

    def __init__(self, *, max_batch_jobs: int = 16, max_wait_s: float = 0.010, max_batch_tokens: float = INF,
                 estimator: TimeEstimator | None = None) -> None:
        if max_batch_jobs < 1 or max_wait_s < 0:
            raise ValueError("need max_batch_jobs >= 1 and max_wait_s >= 0")
        self.max_batch_jobs = max_batch_jobs
        self.max_wait_s = max_wait_s
        self.max_batch_tokens = max_batch_tokens
        self.estimator = estimator
        self._queue: dict[Hashable, VerifyJob] = {}  # insertion order is the service order

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, job_id: Hashable) -> bool:
        return job_id in self._queue

    def submit(self, job: VerifyJob) -> None:
        if job.job_id in self._queue:
            raise ValueError(f"job {job.job_id!r} is already queued")
        if job.new_tokens < 1:
            raise ValueError(f"a verify runs at least the last committed token, got new_tokens={job.new_tokens}")
        self._queue[job.job_id] = job

    def remove(self, job_id: Hashable) -> VerifyJob | None:
        return self._queue.pop(job_id, None)

    def _oldest(self) -> VerifyJob:
        return next(iter(self._queue.values()))

    def _select(self, token_cap: float, free_memory_bytes: float) -> tuple[list[VerifyJob], int, int, bool]:
        """The head of the line that fits together, and whether that batch is full (cannot grow)."""
        chosen: list[VerifyJob] = []
        tokens = kv_bytes = 0
        for job in self._queue.values():
            if len(chosen) == self.max_batch_jobs:
                return chosen, tokens, kv_bytes, True
            too_many_tokens = bool(chosen) and tokens + job.new_tokens > token_cap
            if too_many_tokens or kv_bytes + job.kv_bytes > free_memory_bytes:
                return chosen, tokens, kv_bytes, True  # strict FCFS: nobody skips the job in line
            chosen.append(job)
            tokens += job.new_tokens
            kv_bytes += job.kv_bytes
        return chosen, tokens, kv_bytes, len(chosen) == self.max_batch_jobs or tokens >= token_cap

    def form_batch(self, now: float, free_memory_bytes: float, max_batch_tokens: float) -> Batch:
        if not self._queue:
            return Batch([], None, now, wait_s=INF)
        chosen, tokens, kv_bytes, full = self._select(min(self.max_batch_tokens, max_batch_tokens), free_memory_bytes)
        release_at = self._oldest().arrival + self.max_wait_s
        if not chosen:
            return Batch([], None, now, wait_s=0.0)  # the head does not fit the free memory
        if not full and now < release_at:
            return Batch([], None, now, wait_s=release_at - now)
        for job in chosen:
            del self._queue[job.job_id]
        predicted = self.estimator.predict([j.cost for j in chosen]) if self.estimator else None
        return Batch(chosen, predicted, now, tokens, kv_bytes)

    def next_decision_time(self, now: float) -> float:
        """When form_batch will release a batch, by the policy's own caps and max wait (memory is not known here)."""
        if not self._queue:
            return INF
        if self._select(self.max_batch_tokens, INF)[3]:
            return now
        return max(now, self._oldest().arrival + self.max_wait_s)

    def stats(self, now: float) -> QueueStats:
        if not self._queue:
            return QueueStats(0, 0.0, 0, 0)
        best_effort = sum(1 for j in self._queue.values() if j.slo_rate is None)
        return QueueStats(len(self._queue), now - self._oldest().arrival, best_effort, 0)
