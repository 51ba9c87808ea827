"""Verification batch scheduling: which queued draft blocks go into the next batched forward.

Two policies behind one interface (`VerifyScheduler`), both pure: the caller passes the clock (`now`, in
seconds) and the accelerator's free memory; they return a `Batch` and never sleep or do I/O, so the real
server and the simulator drive the same code.

- `WispScheduler` (the paper's SLO-aware policy): urgent jobs earliest-deadline-first, then the rest by
  density, every addition priced with the estimator and checked against memory, the token cap and the
  earliest completion deadline in the batch. Hopeless jobs are demoted to best effort.
- `FcfsScheduler` (the SLED baseline): first come first served with a batch cap and a max wait; no
  deadlines, no estimator.

Deadlines (ours, after PAPER.md): with r the SLO rate (tokens/s), N the tokens committed so far, t0 the
first token's time and E the expected accepted count of this round,
    completion deadline  D = t0 + (N + E + 1) / r - downlink      (the +1 is the correction/bonus token)
    start deadline       S = D - T({i}) / 1000                     (T in ms, with the estimator's margin)
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
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
    demoted: bool = False  # set by WispScheduler when the SLO became unreachable
    payload: Any = field(default=None, repr=False, compare=False)  # the server's own request object

    @property
    def cost(self) -> VerifyCost:
        return VerifyCost(self.new_tokens, self.cached_tokens)

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
    best_effort: int  # queued jobs with no SLO or a demoted one
    demoted_total: int  # jobs demoted since start (WISP only)


class VerifyScheduler(Protocol):
    def submit(self, job: VerifyJob) -> None: ...
    def remove(self, job_id: Hashable) -> VerifyJob | None: ...
    def form_batch(self, now: float, free_memory_bytes: float, max_batch_tokens: float) -> Batch: ...
    def next_decision_time(self, now: float) -> float: ...
    def stats(self, now: float) -> QueueStats: ...
    def __len__(self) -> int: ...


@dataclass(slots=True)
class _Entry:
    """A queued job with its scheduling keys, cached because they are read on every decision."""

    job: VerifyJob
    seq: int  # submission order: the tie-breaker that keeps every ordering total and stable
    deadline: float  # D
    cost_ms: float  # marginal raw cost in any batch (no intercept, no margin)
    start: float  # S
    density: float  # (E + 1) / T({i})

    @property
    def best_effort(self) -> bool:
        return self.job.slo_rate is None or self.job.demoted

    def start_key(self) -> tuple[float, int]:
        return (self.start, self.seq)

    def density_key(self) -> tuple[float, int]:
        return (-self.density, self.seq)

    def arrival_key(self) -> tuple[float, int]:
        return (self.job.arrival, self.seq)


def _discard(keys: list[tuple[float, int]], key: tuple[float, int]) -> None:
    i = bisect_left(keys, key)
    if i < len(keys) and keys[i] == key:
        del keys[i]


class _BatchBuilder:
    """One batch being formed, with WispScheduler's admission rule (see its docstring)."""

    def __init__(self, est: TimeEstimator, now: float, free_memory: float, max_tokens: float,
                 min_cost_ms: float, min_kv_bytes: int) -> None:
        self.est, self.now, self.free_memory, self.max_tokens = est, now, free_memory, max_tokens
        self.min_cost_ms, self.min_kv_bytes = min_cost_ms, min_kv_bytes  # lower bounds over the queue
        self.chosen: list[_Entry] = []
        self.taken: set[int] = set()
        self.raw_ms, self.tokens, self.kv_bytes, self.earliest = est.c0, 0, 0, INF
        self.full = False

    def add(self, entry: _Entry) -> bool:
        job = entry.job
        if self.kv_bytes + job.kv_bytes > self.free_memory:
            return False
        limit = self.earliest if entry.best_effort else min(self.earliest, entry.deadline)
        if self.chosen:  # the first job is exempt: a lone job cannot be helped by waiting
            if self.tokens + job.new_tokens > self.max_tokens:
                return False
            if self.now + self.est.with_margin(self.raw_ms + entry.cost_ms) / 1000.0 > limit:
                return False
        self.chosen.append(entry)
        self.taken.add(entry.seq)
        self.raw_ms += entry.cost_ms
        self.tokens += job.new_tokens
        self.kv_bytes += job.kv_bytes
        self.earliest = limit
        self.full = self._nothing_else_fits()
        return True

    def _nothing_else_fits(self) -> bool:
        """True only when no queued job can fit (tokens >= 1 each, cost and kv no less than the queue's minima),
        so the walk stops early without changing the result: a deadline-bound batch is decided in a few steps."""
        if self.tokens >= self.max_tokens or self.kv_bytes + self.min_kv_bytes > self.free_memory:
            return True
        if self.earliest == INF:
            return False
        margin = self.est.margin
        raw_budget_ms = ((self.earliest - self.now) * 1000.0 - margin.extra_ms) / margin.scale - self.raw_ms
        return raw_budget_ms < self.min_cost_ms * (1 - 1e-9) - 1e-9


class WispScheduler:
    """SLO-aware batch forming, a greedy stand-in for a deadline-constrained knapsack.

    On each call (whenever the accelerator frees up):
    1. SLO jobs with S < now cannot meet D even alone: they are demoted to best effort (`demoted_total`).
    2. Urgent jobs, S <= now + urgent_horizon_s, are tried earliest-completion-deadline first.
    3. The other SLO jobs are tried by density (E + 1) / T({i}), tokens per ms of solo verification:
       warm blocks that confirm many tokens cheaply first. (The paper writes E / T({i}); the +1 counts
       the correction/bonus token every round yields, so a prefill, E = 0, is not rated worthless.)
    4. Best-effort jobs are tried oldest first.
    Once the batch is bound by a deadline, `max_refusals` refusals in a row end the walk (a later job
    rarely fits a budget that many before it did not), keeping a decision short with thousands queued.

    The admission rule, for a candidate x joining batch B (B' = B + x, finish' = now + T(B') / 1000,
    T with the estimator's margin): x is admitted iff
      - its kv_bytes fit the memory still free, and
      - new_tokens(B') <= max_batch_tokens, and
      - finish' <= D_j for every SLO job j in B' (a best-effort x's own deadline is ignored, but it may
        never push the batch past anyone else's).
    The first job of a batch is exempt from the token and deadline checks (never idle with work queued:
    a lone job cannot be helped by waiting); only memory binds it, so an empty batch with work queued
    means nothing fits the free memory.

    Keys (D, S, density) are computed at submit and recomputed when the estimator's version changes.
    The queue is held in sorted lists (by S, by density, by arrival) so a decision walks them in order
    without sorting; insert/delete are bisect plus a memmove, cheap at thousands of jobs. Two more (by
    marginal cost, by kv bytes) give the queue's minima, so the walk stops as soon as nothing could fit.
    """

    def __init__(self, estimator: TimeEstimator, *, urgent_horizon_s: float = 0.010, max_refusals: int = 64) -> None:
        self.estimator = estimator
        self.max_refusals = max_refusals
        self.urgent_horizon_s = urgent_horizon_s
        self.demoted_total = 0
        self._entries: dict[Hashable, _Entry] = {}
        self._by_seq: dict[int, _Entry] = {}
        self._by_start: list[tuple[float, int]] = []  # SLO jobs, not demoted
        self._by_density: list[tuple[float, int]] = []  # the same jobs
        self._best_effort: list[tuple[float, int]] = []  # no SLO, or demoted
        self._by_cost: list[tuple[float, int]] = []  # every job: the cheapest bounds how full a batch can get
        self._by_kv: list[tuple[float, int]] = []  # every job, likewise for memory
        self._seq = 0
        self._estimator_version = estimator.version

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: Hashable) -> bool:
        return job_id in self._entries

    def _keyed(self, entry: _Entry) -> _Entry:
        est, job = self.estimator, entry.job
        entry.cost_ms = est.request_cost_ms(job.cost)
        solo_ms = est.with_margin(est.c0 + entry.cost_ms)
        entry.deadline = job.completion_deadline
        entry.start = entry.deadline - solo_ms / 1000.0
        entry.density = (job.expected_accepted + 1.0) / solo_ms if solo_ms > 0 else INF
        return entry

    def _index(self, entry: _Entry) -> None:
        insort(self._by_cost, (entry.cost_ms, entry.seq))
        insort(self._by_kv, (entry.job.kv_bytes, entry.seq))
        if entry.best_effort:
            insort(self._best_effort, entry.arrival_key())
        else:
            insort(self._by_start, entry.start_key())
            insort(self._by_density, entry.density_key())

    def _unindex(self, entry: _Entry) -> None:
        _discard(self._by_cost, (entry.cost_ms, entry.seq))
        _discard(self._by_kv, (entry.job.kv_bytes, entry.seq))
        if entry.best_effort:
            _discard(self._best_effort, entry.arrival_key())
        else:
            _discard(self._by_start, entry.start_key())
            _discard(self._by_density, entry.density_key())

    def submit(self, job: VerifyJob) -> None:
        if job.job_id in self._entries:
            raise ValueError(f"job {job.job_id!r} is already queued")
        if job.new_tokens < 1:
            raise ValueError(f"a verify runs at least the last committed token, got new_tokens={job.new_tokens}")
        if job.slo_rate is not None and job.slo_rate <= 0:
            raise ValueError(f"slo_rate must be > 0 or None, got {job.slo_rate}")
        entry = self._keyed(_Entry(job, self._seq, INF, 0.0, INF, 0.0))
        self._seq += 1
        self._entries[job.job_id] = entry
        self._by_seq[entry.seq] = entry
        self._index(entry)

    def remove(self, job_id: Hashable) -> VerifyJob | None:
        """Drop a queued job (a cancelled round); None if it is not queued."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return None
        del self._by_seq[entry.seq]
        self._unindex(entry)
        return entry.job

    def _rekey_if_estimator_changed(self) -> None:
        if self.estimator.version == self._estimator_version:
            return
        self._estimator_version = self.estimator.version
        for entry in self._entries.values():
            self._keyed(entry)
        self._by_start = sorted(e.start_key() for e in self._entries.values() if not e.best_effort)
        self._by_density = sorted(e.density_key() for e in self._entries.values() if not e.best_effort)
        self._by_cost = sorted((e.cost_ms, e.seq) for e in self._entries.values())

    def _demote_hopeless(self, now: float) -> None:
        while self._by_start and self._by_start[0][0] < now:
            entry = self._by_seq[self._by_start[0][1]]
            self._unindex(entry)
            entry.job.demoted = True
            self.demoted_total += 1
            self._index(entry)

    def form_batch(self, now: float, free_memory_bytes: float, max_batch_tokens: float) -> Batch:
        self._rekey_if_estimator_changed()
        self._demote_hopeless(now)
        smallest = (self._by_cost[0][0] if self._by_cost else 0.0, self._by_kv[0][0] if self._by_kv else 0)
        builder = _BatchBuilder(self.estimator, now, free_memory_bytes, max_batch_tokens, *smallest)
        horizon = now + self.urgent_horizon_s
        urgent = []
        for start, seq in self._by_start:
            if start > horizon:
                break
            urgent.append(self._by_seq[seq])
        urgent.sort(key=lambda e: (e.deadline, e.seq))
        for entry in urgent:
            if builder.full:
                break
            builder.add(entry)
        refused = 0
        for ordered in (self._by_density, self._best_effort):
            for _, seq in ordered:
                if builder.full:
                    break
                if seq not in builder.taken:
                    if builder.add(self._by_seq[seq]):
                        refused = 0
                    elif builder.earliest != INF:
                        # A deadline-bound batch rarely finds room deep in the queue; a long run of refusals
                        # ends the walk so a decision stays well under a millisecond with thousands queued.
                        refused += 1
                        if refused >= self.max_refusals:
                            break

        for entry in builder.chosen:
            self.remove(entry.job.job_id)
        if not builder.chosen:
            return Batch([], 0.0, now, wait_s=0.0 if self._entries else INF)
        jobs = [e.job for e in builder.chosen]
        return Batch(jobs, self.estimator.with_margin(builder.raw_ms), now, builder.tokens, builder.kv_bytes)

    def next_decision_time(self, now: float) -> float:
        """Work-conserving: with anything queued, decide now."""
        return now if self._entries else INF

    def stats(self, now: float) -> QueueStats:
        """O(depth): meant for metrics scrapes, not the decision path."""
        oldest = min((e.job.arrival for e in self._entries.values()), default=now)
        return QueueStats(len(self._entries), now - oldest, len(self._best_effort), self.demoted_total)


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
