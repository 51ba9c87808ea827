"""What a generation measured: per round (drafts, acceptance, timings) and overall (the summary the CLI,
the agent's metrics and the benchmarks read)."""

from __future__ import annotations

from dataclasses import dataclass, field

from wisp_edge.round_plan import Round


@dataclass
class RoundStats:
    drafted: int
    accepted: int
    drafting_ms: float
    wasted_drafting_ms: float  # time spent drafting tokens after the first rejected one
    rtt_ms: float  # wall time of the verify call
    verify_ms: float
    queue_ms: float


@dataclass
class GenerationStats:
    rounds: list[RoundStats] = field(default_factory=list)
    prefill_ms: float = 0.0
    wall_s: float = 0.0
    new_tokens: int = 0
    unverified: int = 0  # drafter-only tokens (allow_local, verifier unreachable)
    drafter_prefill_ms: float = 0.0  # the drafter's prompt prefill (in the background while cloud_rounds ran)
    cloud_rounds: int = 0  # rounds with no draft: the verifier decoded while the drafter prefilled
    ahead_ready: int = 0  # rounds whose block was drafted while the previous one was being verified
    ahead_wasted_ms: float = 0.0  # drafting ahead that was rolled back (it overlapped a round trip)
    faults: dict[str, int] = field(default_factory=dict)  # what the backend survived (retries, resumes, ...)

    def start_round(self, rnd: Round) -> None:
        self.cloud_rounds += rnd.cloud
        self.ahead_ready += rnd.reuse > 0

    def end_round(self, drafting_ms: list[float], accepted: int, rtt_ms: float, verify_ms: float,
                  queue_ms: float) -> None:
        """One verified round; `drafting_ms` has a time per drafted token."""
        wasted = sum(drafting_ms[accepted + 1:])
        self.rounds.append(RoundStats(len(drafting_ms), accepted, sum(drafting_ms), wasted, rtt_ms, verify_ms,
                                      queue_ms))

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per speculative round (accepted drafts + the target's own token); rounds that
        drafted nothing (cloud rounds during the drafter's prefill, a last single token) are left out."""
        spec = [r for r in self.rounds if r.drafted]
        return (sum(r.accepted for r in spec) / len(spec) + 1.0) if spec else 0.0

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(r.drafted for r in self.rounds)
        return sum(r.accepted for r in self.rounds) / drafted if drafted else 0.0

    def summary(self) -> dict:
        return {
            "new_tokens": self.new_tokens, "rounds": len(self.rounds), "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.new_tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "acceptance_rate": round(self.acceptance_rate, 4), "mean_accepted_per_round": round(self.mean_accepted, 3),
            "drafted": sum(r.drafted for r in self.rounds), "accepted": sum(r.accepted for r in self.rounds),
            "drafting_ms": round(sum(r.drafting_ms for r in self.rounds), 1),
            "wasted_drafting_ms": round(sum(r.wasted_drafting_ms for r in self.rounds), 1),
            "verify_ms": round(sum(r.verify_ms for r in self.rounds), 1), "prefill_ms": round(self.prefill_ms, 1),
            "rtt_ms": round(sum(r.rtt_ms for r in self.rounds), 1), "queue_ms": round(sum(r.queue_ms for r in self.rounds), 1),
            "unverified_tokens": self.unverified, "faults": dict(self.faults),
            "drafter_prefill_ms": round(self.drafter_prefill_ms, 1), "cloud_rounds": self.cloud_rounds,
            "ahead_ready_rounds": self.ahead_ready, "ahead_wasted_ms": round(self.ahead_wasted_ms, 1),
        }


class FaultCounter:
    """A networked backend's fault counters (`HttpVerifier.faults()`) since this was made; none in-process."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.before = self._now()

    def _now(self) -> dict[str, int]:
        faults = getattr(self.backend, "faults", None)
        return faults() if callable(faults) else {}

    def since(self) -> dict[str, int]:
        return {k: v - self.before.get(k, 0) for k, v in self._now().items()}
