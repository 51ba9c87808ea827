"""Prometheus metrics of the verifier, one registry per service (tests run several in one process).

Every series is prefixed `wisp_`. Histograms use buckets that resolve what an operator tunes:
batch sizes up to a few hundred, verification times from a millisecond to seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
RATIO_BUCKETS = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("wisp_queue_depth", "Jobs waiting for a batch", registry=r)
        self.sessions = Gauge("wisp_sessions", "Open sessions by mode", ["mode"], registry=r)
        self.batch_size = Histogram("wisp_batch_size", "Requests per batched forward", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("wisp_batch_tokens", "New tokens per batched forward", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.verify_seconds = Histogram("wisp_verify_seconds", "Measured time of one batched forward",
                                        buckets=TIME_BUCKETS, registry=r)
        self.predicted_seconds = Histogram("wisp_verify_predicted_seconds",
                                           "Estimator's prediction (with margin) for the same batches",
                                           buckets=TIME_BUCKETS, registry=r)
        self.prediction_ratio = Histogram("wisp_verify_actual_over_predicted", "Measured / predicted batch time",
                                          buckets=RATIO_BUCKETS, registry=r)
        self.queue_seconds = Histogram("wisp_queue_wait_seconds", "Time a job waited for its batch",
                                       buckets=TIME_BUCKETS, registry=r)
        self.slo_jobs = Counter("wisp_slo_jobs", "Jobs with an SLO, by whether they finished by their deadline",
                                ["outcome"], registry=r)
        self.demoted = Counter("wisp_demoted_jobs", "Jobs demoted to best effort (SLO unreachable)", registry=r)
        self.accepted_length = Histogram("wisp_accepted_length", "Draft tokens accepted per verify round",
                                         buckets=(0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 32), registry=r)
        self.drafted = Counter("wisp_drafted_tokens", "Draft tokens received", registry=r)
        self.accepted = Counter("wisp_accepted_tokens", "Draft tokens accepted", registry=r)
        self.generated = Counter("wisp_generated_tokens", "Tokens committed by the target, by mode", ["mode"],
                                 registry=r)
        self.kv_used = Gauge("wisp_kv_used_bytes", "KV pool bytes allocated", registry=r)
        self.kv_budget = Gauge("wisp_kv_budget_bytes", "KV pool budget", registry=r)
        self.evictions = Counter("wisp_kv_evictions", "Idle sessions evicted to free KV memory", registry=r)
        self.rejected = Counter("wisp_rejected_requests", "Requests refused, by reason", ["reason"], registry=r)
        self.http = Counter("wisp_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=r)
        self.batch_errors = Counter("wisp_batch_errors", "Batched forwards that raised", registry=r)
        # vLLM's names and counting: prompt tokens looked up, and of those found in cached KV blocks
        self.prefix_queries = Counter("wisp_prefix_cache_queries", "Prefill tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("wisp_prefix_cache_hits", "Prefill tokens found in the prefix cache (not "
                                   "recomputed)", registry=r)
        self._prefix_seen = (0, 0)

    def record_batch(self, size: int, new_tokens: int, measured_ms: float, predicted_ms: float) -> None:
        """One batched forward: its size, its time, and how the estimator's prediction compared."""
        self.batch_size.observe(size)
        self.batch_tokens.observe(new_tokens)
        self.verify_seconds.observe(measured_ms / 1000.0)
        self.predicted_seconds.observe(predicted_ms / 1000.0)
        if predicted_ms > 0:
            self.prediction_ratio.observe(measured_ms / predicted_ms)

    def sync_prefix_cache(self, queries_tokens: int, hits_tokens: int) -> None:
        """Bring the prefix-cache counters up to the block pool's running totals."""
        seen_q, seen_h = self._prefix_seen
        self.prefix_queries.inc(max(0, queries_tokens - seen_q))
        self.prefix_hits.inc(max(0, hits_tokens - seen_h))
        self._prefix_seen = (queries_tokens, hits_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
