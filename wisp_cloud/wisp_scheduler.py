"""The WISP scheduler, the paper's SLO-aware policy, over the job and batch types of scheduler.py.

The deadlines D and S are defined there; how a batch is formed and who may join it is in `WispScheduler`'s
docstring. Pure like FCFS: the caller passes the clock and the free memory, and gets a `Batch`.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from wisp_cloud.attention_rows import LayoutTally
from wisp_cloud.estimator import TimeEstimator
from wisp_cloud.scheduler import CLOCK_STARTERS, INF, Batch, QueueStats, VerifyJob


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
        return self.job.slo_rate is None or self.job.demoted or self.job.kind in CLOCK_STARTERS

    def start_key(self) -> tuple[float, int]:
        return (self.start, self.seq)

    def deadline_key(self) -> tuple[float, int]:
        return (self.deadline, self.seq)

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
        # The batch's own terms (`TimeEstimator.layout_ms`): its attention layout, kept as it grows, and their
        # cost now; skipped when the estimator prices none of them (a profile of an older format).
        self.layout, self.layout_now_ms = LayoutTally(), 0.0
        self.priced_layout = bool(est.c6 or est.c7 or est.c8)
        self.full = False

    def _layout_with_ms(self, job) -> float:
        """The batch's own terms with `job` added."""
        if not self.priced_layout:
            return 0.0
        return self.est.layout_ms(*self.layout.layout(job.new_tokens, job.new_tokens + job.cached_tokens),
                                  self.tokens + job.new_tokens)

    def add(self, entry: _Entry) -> bool:
        job = entry.job
        if self.kv_bytes + job.kv_bytes > self.free_memory:
            return False
        # A late job (S < now) runs first but cannot bind the batch: its deadline is lost already, and
        # holding the batch to it would shrink every batch while a session catches up.
        late = entry.start < self.now
        limit = self.earliest if entry.best_effort or late else min(self.earliest, entry.deadline)
        layout_ms = None
        if self.chosen:  # the first job is exempt: a lone job cannot be helped by waiting
            if self.tokens + job.new_tokens > self.max_tokens:
                return False
            if limit != INF:  # a batch with no deadline in it need not be priced job by job
                layout_ms = self._layout_with_ms(job)
                if self.now + self.est.with_margin(self.raw_ms + entry.cost_ms + layout_ms) / 1000.0 > limit:
                    return False
        self.chosen.append(entry)
        self.taken.add(entry.seq)
        self.raw_ms += entry.cost_ms
        self.tokens += job.new_tokens
        if self.priced_layout:
            self.layout.add(job.new_tokens, job.new_tokens + job.cached_tokens)
            self.layout_now_ms = layout_ms if layout_ms is not None else \
                self.est.layout_ms(*self.layout.layout(), self.tokens)
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
        raw_budget_ms = ((self.earliest - self.now) * 1000.0 - margin.extra_ms) / margin.scale - self.raw_ms \
            - self.layout_now_ms  # a job added seldom lowers the batch's own terms (only by moving the chunk)
        return raw_budget_ms < self.min_cost_ms * (1 - 1e-9) - 1e-9


PREFILL_WAIT_SHARE = 0.2  # of a time-to-first-token target: how long a prefill may wait before it goes first


class WispScheduler:
    """SLO-aware batch forming, a greedy stand-in for a deadline-constrained knapsack.

    The SLO is a rate over the whole answer, so D is a cumulative schedule (t0 + (N + E + 1) / r): a job
    past its S belongs to a session behind schedule, not to a lost request; it can still catch up in later
    rounds if it is served first. On each call (whenever the accelerator frees up):
    1. SLO jobs with S < now - demote_after_s are demoted to best effort (`demoted_total`). The default,
       inf, demotes nobody: with demote_after_s = 0 (the paper's per-job rule) a session that fell behind
       once (its first cloud round alone takes a whole batch) was demoted round after round, served after
       everyone else, and never caught up (in `ours`, 1,300-3,700 demotions per run near capacity, 80%
       of them jobs already late when they arrived).
    2. Urgent jobs, S <= now + max(urgent_horizon_s, the last batch's predicted time), are tried
       earliest-completion-deadline first: the sessions furthest behind first, then whoever must start
       before the next decision (about one batch away). A late job (S < now) cannot bind the batch: its
       deadline is lost already, and holding the batch to it would shrink every batch while it catches up.
    3. The other SLO jobs are tried by density (E + 1) / T({i}), tokens per ms of solo verification:
       warm blocks that confirm many tokens cheaply first. (The paper writes E / T({i}); the +1 counts
       the correction/bonus token every round yields.)
    4. Best-effort jobs are tried oldest first: jobs without an SLO, demoted ones, and prefills and resumes
       (CLOCK_STARTERS). A prefill starts its session's SLO clock (t0 is when it finishes), so it can be
       neither early nor late; given a deadline of creation + 1/r it was late on arrival every time, went
       first as urgent, and a 100-300 ms cold prompt stretched the batches tight verify jobs were in.
    `max_refusals` refusals in a row end the walk (a later job rarely fits a budget, deadline, token cap or
    memory, that many before it did not), keeping a decision short with thousands queued.

    The admission rule, for a candidate x joining batch B (B' = B + x, finish' = now + T(B') / 1000,
    T with the estimator's margin): x is admitted iff
      - its kv_bytes fit the memory still free, and
      - new_tokens(B') <= max_batch_tokens, and
      - finish' <= D_j for every SLO job j in B' that is not late (a best-effort or late x's own deadline
        is ignored, but it may never push the batch past anyone else's).
    So a prefill joins a batch only where it delays no verify job past its deadline, or when it is alone.
    With `prefill_wait_s` (off by default) a prefill or resume queued that long goes first instead, so a
    newcomer's first token is not held back for as long as on-time verifies keep arriving.
    The first job of a batch is exempt from the token and deadline checks (never idle with work queued:
    a lone job cannot be helped by waiting); only memory binds it, so an empty batch with work queued
    means nothing fits the free memory.

    Keys (D, S, density) are computed at submit and recomputed when the estimator's version changes.
    The queue is held in sorted lists (by S, by density, by arrival) so a decision walks them in order
    without sorting; insert/delete are bisect plus a memmove, cheap at thousands of jobs. Two more (by
    marginal cost, by kv bytes) give the queue's minima, so the walk stops as soon as nothing could fit.
    """

    @staticmethod
    def prefill_wait_for(ttft_slo_s: float | None, prefill_wait_s: float | None = None) -> float | None:
        """How long a prefill may wait before it goes first: `prefill_wait_s` when given, else a fifth of the
        operator's time-to-first-token target (the rest is the batch it joins, the network and the edge;
        a fifth is what was measured: 1 s of a 5 s bound gave the `ours` setup FCFS's capacity or more at
        every rate class, best effort lost it at 2 and 4 tokens/s), else None: best effort, the paper's
        rule, where only the token rate is promised."""
        if prefill_wait_s is not None:
            return prefill_wait_s
        return None if ttft_slo_s is None else PREFILL_WAIT_SHARE * ttft_slo_s

    def __init__(self, estimator: TimeEstimator, *, urgent_horizon_s: float = 0.010, max_refusals: int = 64,
                 demote_after_s: float = INF, prefill_wait_s: float | None = None) -> None:
        self.estimator = estimator
        self.prefill_wait_s = prefill_wait_s  # a prefill or resume queued this long goes first (None: never)
        self.demote_after_s = demote_after_s
        self.max_refusals = max_refusals
        self.urgent_horizon_s = urgent_horizon_s
        self.demoted_total = 0
        self.last_batch_ms = 0.0  # predicted time of the batch formed last: how long until the next decision
        self._entries: dict[Hashable, _Entry] = {}
        self._by_seq: dict[int, _Entry] = {}
        self._by_start: list[tuple[float, int]] = []  # SLO jobs, not demoted
        self._by_deadline: list[tuple[float, int]] = []  # the same jobs, in the order urgent ones are tried
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
        solo_ms = est.predict_one(job.cost)
        entry.deadline = job.completion_deadline
        entry.start = entry.deadline - solo_ms / 1000.0
        entry.density = (job.expected_accepted + 1.0) / solo_ms if solo_ms > 0 else INF
        return entry

    def _file(self, entry: _Entry, put: Callable[[list, tuple[float, int]], None]) -> None:
        """Add the entry's keys to the sorted lists (put=insort) or take them out (put=_discard)."""
        put(self._by_cost, (entry.cost_ms, entry.seq))
        put(self._by_kv, (entry.job.kv_bytes, entry.seq))
        if entry.best_effort:
            put(self._best_effort, entry.arrival_key())
        else:
            put(self._by_start, entry.start_key())
            put(self._by_deadline, entry.deadline_key())
            put(self._by_density, entry.density_key())

    def _index(self, entry: _Entry) -> None:
        self._file(entry, insort)

    def _unindex(self, entry: _Entry) -> None:
        self._file(entry, _discard)

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
        self._by_deadline = sorted(e.deadline_key() for e in self._entries.values() if not e.best_effort)
        self._by_density = sorted(e.density_key() for e in self._entries.values() if not e.best_effort)
        self._by_cost = sorted((e.cost_ms, e.seq) for e in self._entries.values())

    def _demote_hopeless(self, now: float) -> None:
        while self._by_start and self._by_start[0][0] < now - self.demote_after_s:
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
        # Urgent: whoever must start before the next decision, which comes when this batch finishes (about
        # as long as the last one took); a fixed 10 ms let jobs pass S during a long batch and be demoted.
        horizon = now + max(self.urgent_horizon_s, self.last_batch_ms / 1000.0)
        # Urgent jobs (S <= horizon) earliest deadline first, walked in the deadline index: S = D - solo time,
        # so past D = horizon + the longest solo time nobody is urgent. With no demotion most of a long
        # queue can be late; collecting and sorting them all took most of a decision.
        longest_solo_s = self.estimator.with_margin(self.estimator.c0 + self._by_cost[-1][0]) / 1000.0 \
            if self._by_cost else 0.0
        last_urgent_deadline = horizon + longest_solo_s
        # Best effort, a prefill could wait behind on-time verifies for as long as they keep coming (seconds to
        # a first token under load); one that has waited `prefill_wait_s` goes first, and the batch's verify
        # jobs join it only where their deadlines allow.
        if self.prefill_wait_s is not None:
            for arrival, seq in self._best_effort:
                if builder.full or arrival > now - self.prefill_wait_s:
                    break
                entry = self._by_seq[seq]
                if entry.job.kind in CLOCK_STARTERS:
                    builder.add(entry)
        for deadline, seq in self._by_deadline:
            if builder.full or deadline > last_urgent_deadline:
                break
            entry = self._by_seq[seq]
            if entry.start <= horizon:
                builder.add(entry)
        for ordered in (self._by_density, self._best_effort):
            refused = 0  # per pass: SLO jobs refused by a deadline say nothing of whether best effort fits
            for _, seq in ordered:
                if builder.full:
                    break
                if seq not in builder.taken:
                    if builder.add(self._by_seq[seq]):
                        refused = 0
                    else:
                        # A batch bound by a deadline, its token cap or memory rarely finds room deep in the
                        # queue; a long run of refusals ends the walk so a decision stays around a
                        # millisecond with thousands queued (with no demotion, batches of late jobs are
                        # bound by the token cap alone, and the walk used to try the whole queue).
                        refused += 1
                        if refused >= self.max_refusals:
                            break

        for entry in builder.chosen:
            self.remove(entry.job.job_id)
        if not builder.chosen:
            return Batch([], 0.0, now, wait_s=0.0 if self._entries else INF)
        jobs = [e.job for e in builder.chosen]
        self.last_batch_ms = self.estimator.with_margin(builder.raw_ms + builder.layout_now_ms)
        return Batch(jobs, self.last_batch_ms, now, builder.tokens, builder.kv_bytes)

    def next_decision_time(self, now: float) -> float:
        """Work-conserving: with anything queued, decide now."""
        return now if self._entries else INF

    def stats(self, now: float) -> QueueStats:
        """O(depth): meant for metrics scrapes, not the decision path."""
        oldest = min((e.job.arrival for e in self._entries.values()), default=now)
        return QueueStats(len(self._entries), now - oldest, len(self._best_effort), self.demoted_total)
