"""The systems compared, as production policy objects: which edge controller, which batch scheduler.

- wisp: `Controller(PredictorPolicy(predictor, 16), DraftBound(16))`, what `make_policy("wisp", drafter)`
  builds when weights exist for the drafter, and `WispScheduler(estimator)` (margin x1.1).
- centralized: no drafting; the server decodes every token, one per session per forward, with continuous
  batching: `FcfsScheduler(max_batch_jobs=256, max_wait_s=0)` (vLLM's default max_num_seqs = 256; every
  finished step is re-queued before the next batch forms).
- sled_fixed / sled_confidence: SLED, drafting a fixed 6 tokens (`make_policy("fixed")`, the edge's default
  k) or until the top-1 probability falls below 0.5 with k_max 8 (`make_policy("sled")`); verification
  FCFS with a batch cap and a max wait: `FcfsScheduler(16 jobs, 10 ms)`, the server's `--policy fcfs`
  defaults. `sled` in the results is the better of the two per SLO class (the stronger baseline).
- wisp_no_predictor: fixed 6-token drafts + WispScheduler (the ablation without the controller).
- wisp_fcfs: the WISP controller + the FCFS scheduler (the ablation without SLO-aware batching).
- centralized_wisp: centralized decoding under WispScheduler (our own server's centralized mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from wisp_cloud.estimator import TimeEstimator
from wisp_cloud.scheduler import FcfsScheduler, VerifyScheduler
from wisp_cloud.wisp_scheduler import WispScheduler
from wisp_edge.controller.bounds import DraftBound
from wisp_edge.controller.policy import Controller, make_policy
from wisp_edge.controller.predictor import PredictorPolicy, RejectionPredictor

K_MAX = 16  # EdgeSettings.k_max
DRAFT_LENGTH = 6  # EdgeSettings.draft_length
FCFS_MAX_BATCH, FCFS_MAX_WAIT_S = 16, 0.010  # ServeSettings.fcfs_max_batch, fcfs_max_wait_ms
CONTINUOUS_MAX_SEQS = 256


@dataclass(frozen=True)
class System:
    name: str
    mode: str  # "speculative" | "centralized"
    edge: str  # "wisp" | "fixed" | "sled" | "none"
    server: str  # "wisp" | "fcfs" | "continuous"


SYSTEMS = {s.name: s for s in (
    System("wisp", "speculative", "wisp", "wisp"),
    System("centralized", "centralized", "none", "continuous"),
    System("sled_fixed", "speculative", "fixed", "fcfs"),
    System("sled_confidence", "speculative", "sled", "fcfs"),
    System("wisp_no_predictor", "speculative", "fixed", "wisp"),
    System("wisp_fcfs", "speculative", "wisp", "fcfs"),
    System("centralized_wisp", "centralized", "none", "wisp"),
)}
SLED_VARIANTS = ("sled_fixed", "sled_confidence")


def make_scheduler(system: System, estimator: TimeEstimator, prefill_wait_s: float | None = None,
                   ttft_slo_s: float | None = None) -> VerifyScheduler:
    """The server's scheduler; the WISP one knows the TTFT bound the run is judged by, as `wisp-cloud serve
    --ttft-slo-s` tells it."""
    if system.server == "wisp":
        return WispScheduler(estimator, prefill_wait_s=WispScheduler.prefill_wait_for(ttft_slo_s, prefill_wait_s))
    if system.server == "fcfs":
        return FcfsScheduler(max_batch_jobs=FCFS_MAX_BATCH, max_wait_s=FCFS_MAX_WAIT_S, estimator=estimator)
    if system.server == "continuous":
        return FcfsScheduler(max_batch_jobs=CONTINUOUS_MAX_SEQS, max_wait_s=0.0, estimator=estimator)
    raise ValueError(system.server)


def make_edge_policy(system: System, predictor: RejectionPredictor | None):
    """A fresh controller for one request (EdgeAgent.engine() builds one per generation)."""
    if system.edge == "wisp":
        if predictor is None:
            raise ValueError("the wisp controller needs a predictor")
        return Controller(PredictorPolicy(predictor, K_MAX), DraftBound(k_max=K_MAX))
    if system.edge == "fixed":
        return make_policy("fixed", None, draft_length=DRAFT_LENGTH)
    if system.edge == "sled":
        return make_policy("sled", None)
    raise ValueError(f"{system.name} does not draft")


def uses_predictor(system: System) -> bool:
    return system.edge == "wisp"
