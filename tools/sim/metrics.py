"""Metrics, defined once: per-request records and what the experiments report from them.

- Achieved rate of a request: (tokens - 1) / (last token time - first token time), on the device's clock
  (the first token is the prefill's; TTFT is reported, not part of the SLO, as PAPER.md says). A request
  meets its SLO when it finished (not refused for good, not failed) and its rate >= its SLO class.
- SLO attainment: the share of measured requests meeting their SLO (each device's requests 1..R; its
  request 0 warms the system up, and later ones keep the load on while the measured ones finish).
- Goodput: tokens delivered inside the measurement window by requests that met their SLO, per second.
- Capacity: the most concurrent devices with attainment >= the threshold (experiments.capacity).
- Wasted drafting: drafting time of tokens after the first rejection in a block (the engine's definition).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    device: int
    kind: str  # device profile name
    index: int
    slo: float
    measured: bool
    arrival: float
    prompt_tokens: int
    output_tokens: int
    t_first: float | None = None
    t_last: float | None = None
    tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafting_ms: float = 0.0
    wasted_ms: float = 0.0
    queue_ms: float = 0.0
    verify_ms: float = 0.0
    network_ms: float = 0.0
    refused: int = 0
    cloud_rounds: int = 0  # empty rounds sent while the drafter prefilled
    resumes: int = 0
    failed: bool = False
    ttft_limit_s: float | None = None  # a first token later than this misses the SLO whatever the rate after it
    round_log: list = field(default_factory=list, repr=False)  # (drafted, accepted) per round, for the tests
    token_log: list = field(default_factory=list, repr=False)  # (arrival time, tokens) as they reach the device

    def add_round(self, drafted: int, accepted: int, times_ms: list[float], queue_ms: float, verify_ms: float,
                  rtt_ms: float, hidden: int = 0) -> None:
        """`hidden`: leading tokens drafted during the previous round trip (draft ahead), off the critical path."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.drafting_ms += sum(times_ms[hidden:])
        self.wasted_ms += sum(times_ms[accepted + 1:])
        self.queue_ms += queue_ms
        self.verify_ms += verify_ms
        self.network_ms += max(0.0, rtt_ms - queue_ms - verify_ms)
        self.round_log.append((drafted, accepted))

    @property
    def done(self) -> bool:
        return not self.failed and self.t_last is not None and self.tokens >= self.output_tokens

    @property
    def rate(self) -> float:
        if not self.done:
            return 0.0
        span = self.t_last - self.t_first
        return (self.tokens - 1) / span if span > 0 else float("inf")

    @property
    def met(self) -> bool:
        return self.done and self.rate >= self.slo * (1 - 1e-9) and (
            self.ttft_limit_s is None or self.ttft <= self.ttft_limit_s)

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.arrival

    def row(self) -> dict:
        out = asdict(self)
        out.pop("round_log")
        out.pop("token_log")
        return {**out, "rate": self.rate, "met": self.met, "ttft": self.ttft}


def tokens_in(rec: RequestRecord, t0: float, t1: float) -> int:
    return sum(n for t, n in rec.token_log if t0 <= t < t1)


def summarize(records: list[RequestRecord], window: tuple[float, float]) -> dict:
    """Attainment (overall and per SLO class), goodput in `window`, TTFT and round statistics."""
    rs = [r for r in records if r.measured]
    out: dict = {"requests": len(rs)}
    w0, w1 = window
    span = max(w1 - w0, 1e-9)
    out["goodput"] = sum(tokens_in(r, w0, w1) for r in records if r.met) / span
    out["throughput"] = sum(tokens_in(r, w0, w1) for r in records) / span
    out["attainment"] = sum(r.met for r in rs) / len(rs) if rs else 0.0
    out["by_slo"] = {f"{slo:g}": {"requests": len(g), "attainment": sum(r.met for r in g) / len(g)}
                     for slo in sorted({r.slo for r in rs}) for g in [[r for r in rs if r.slo == slo]]}
    done = [r for r in rs if r.done]
    ttft = [r.ttft for r in done]
    out["ttft_p50_s"] = float(np.median(ttft)) if ttft else None
    out["ttft_p99_s"] = float(np.percentile(ttft, 99)) if ttft else None
    out["rate_p50"] = float(np.median([r.rate for r in done])) if done else 0.0
    out["failed"] = sum(not r.done for r in rs)
    out["refusals"] = sum(r.refused for r in rs)
    out["resumes"] = sum(r.resumes for r in rs)
    rounds = sum(r.rounds for r in done)
    spec_rounds = rounds - sum(r.cloud_rounds for r in done)  # rounds that drafted (cloud rounds drafted nothing)
    drafted = sum(r.drafted for r in done)
    tokens = sum(r.tokens for r in done)
    out["cloud_rounds_per_request"] = sum(r.cloud_rounds for r in done) / len(done) if done else 0.0
    if drafted:
        out["mean_accepted_length"] = 1 + sum(r.accepted for r in done) / spec_rounds  # tokens per drafted round
        out["acceptance_rate"] = sum(r.accepted for r in done) / drafted
        out["drafted_per_round"] = drafted / spec_rounds
        out["rounds_per_token"] = rounds / tokens
        out["wasted_drafting_ms_per_token"] = sum(r.wasted_ms for r in done) / tokens
        out["queue_ms_per_round"] = sum(r.queue_ms for r in done) / rounds
        out["verify_ms_per_round"] = sum(r.verify_ms for r in done) / rounds
    out["by_device"] = {kind: time_per_token([r for r in rs if r.kind == kind]) for kind in sorted({r.kind for r in rs})}
    return out


def time_per_token(rs: list[RequestRecord]) -> dict:
    """Where a device kind's time goes, in ms per output token after the first: drafting, network, queue and
    verify summed over rounds; `other` is the rest of the span (the drafter's prefill, the catch-up)."""
    done = [r for r in rs if r.done]
    out = {"requests": len(rs), "attainment": sum(r.met for r in rs) / len(rs) if rs else 0.0}
    tokens = sum(r.tokens - 1 for r in done)
    if not tokens:
        return out
    span = 1000.0 * sum(r.t_last - r.t_first for r in done) / tokens
    parts = {k: sum(getattr(r, f"{k}_ms") for r in done) / tokens for k in ("drafting", "network", "queue", "verify")}
    failing = [r for r in rs if not r.met]
    return {**out, "rate_p50": float(np.median([r.rate for r in done])), "ms_per_token": round(span, 1),
            **{f"{k}_ms": round(v, 1) for k, v in parts.items()}, "other_ms": round(span - sum(parts.values()), 1),
            "tokens_per_round": sum(r.tokens - 1 for r in done) / max(1, sum(r.rounds for r in done)),
            "failing_prompt_mean": float(np.mean([r.prompt_tokens for r in failing])) if failing else None,
            "prompt_mean": float(np.mean([r.prompt_tokens for r in rs]))}
