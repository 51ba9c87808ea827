"""One simulation: a server, N devices (plus burst devices), a measurement window; returns the records and a summary.

Devices send requests from a closed loop (workload.py). Each device's requests 1..R are measured for SLO
attainment (request 0 warms the system up); goodput counts the tokens delivered inside [warmup, warmup +
window). The devices keep the load on until every measured request, and every request that arrived before
the window closed, has finished; then the run stops. With `measure_until` (bursts), every request arriving
before that time is measured instead.
Randomness is keyed by (seed, device, request), so device i sees the same profile, link, prompts and
acceptance draws whatever N is (common random numbers across a capacity search), and a run is a pure
function of its config.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import simpy

from tools.sim import edge
from tools.sim.acceptance import TraceAcceptance, make_acceptance
from tools.sim.devices import DeviceProfile, fleet_device
from tools.sim.metrics import RequestRecord, summarize
from tools.sim.network import NETWORKS, Link
from tools.sim.predictors import predictor_for
from tools.sim.server import ServerSettings, SimServer
from tools.sim.server_profile import load_server_profile
from tools.sim.systems import SYSTEMS, make_edge_policy, make_scheduler, uses_predictor
from tools.sim.workload import Workload, burst_devices, device_window


@dataclass(frozen=True)
class SimConfig:
    system: str = "wisp"
    devices: int = 50  # concurrent devices (the base, when there are bursts)
    server: str = "a100-qwen3-32b"
    truth: str = "profile"  # forward time: "profile" (linear, + noise) or "roofline"
    kv_budget_gb: float | None = None  # None: the profile's; math.inf: memory never binds
    fleet: str = "paper"
    network: str = "wifi-metro"
    rtt_ms: float | None = None  # overrides the network's median RTT
    acceptance: str = "param:0.75"
    workload: Workload = field(default_factory=Workload)
    warmup_s: float = 20.0  # goodput window [warmup_s, warmup_s + window_s)
    window_s: float = 60.0
    measure_requests: int = 2  # R: each device's requests 1..R are measured for attainment
    measure_until: float | None = None  # bursts: measure every request arriving before this time instead
    max_sim_s: float = 900.0
    seed: int = 0
    admission: bool = True
    online_refit: bool = True
    early_stop_below: float | None = None  # stop once attainment below this is certain (capacity searches)
    prefill_wait_s: float | None = None  # the WISP scheduler's wait before a prefill goes first; None: a fifth of
    # max_ttft_s (ServeSettings' ttft_slo_s), or with no TTFT bound best effort
    max_ttft_s: float | None = None  # None: the paper's SLO, a rate from the first token on, however late it
    # came; a number: a request whose first token comes later misses its SLO (admission cannot buy capacity)
    drafter_prefill: str = "cloud"  # our engine: the verifier decodes meanwhile; "sequential": the device waits;
    # what-ifs: "overlapped" with the server's prefill; "free"
    draft_ahead: bool = False  # the engine's default is on (drafting during verification); the published sweeps
    # predate it, so they keep it off and the levers study measures it
    coefficients: tuple | None = None  # a what-if server: replaces the profile's (c0, c1, c2, c3); None keeps one
    requests_per_device: int | None = None  # a fixed closed loop (the real load test's): each device sends exactly
    # this many requests back to back and every one is measured; None: the open-ended loop above
    device_profile: DeviceProfile | None = None  # every device is this one (a measured device), else the fleet's
    shared_edge_cores: int | None = None  # the devices draft on this many shared CPU cores (device i on core
    # i mod n, as the real load test runs them); None: each device has its own

    @property
    def workload_name(self) -> str:
        """The prompt set behind the lengths and the acceptance, as results files name it."""
        acceptance = _acceptance(self.acceptance)
        return f"{self.workload.name}; acceptance {self.acceptance} ({acceptance.split} rounds of {acceptance.traces.name})"


@dataclass
class RunResult:
    config: SimConfig
    summary: dict
    records: list[RequestRecord]
    server: SimServer
    truncated: bool
    wall_s: float
    policies: list = field(default_factory=list, repr=False)  # the edge policy objects built (tests)


@lru_cache(maxsize=16)
def _acceptance(spec: str) -> TraceAcceptance:
    return make_acceptance(spec)


@lru_cache(maxsize=16)
def _predictor(spec: str):
    return predictor_for(_acceptance(spec))


class _Monitor:
    """Fires `stop` once every measured request, and every request that arrived before the window closed, has
    finished (or, with early stopping, once attainment below the threshold is certain)."""

    def __init__(self, env: simpy.Environment, window_end: float, expected: int | None,
                 early_stop_below: float | None) -> None:
        self.env, self.window_end, self.expected, self.early = env, window_end, expected, early_stop_below
        self.open = self.finished = self.missed = 0
        self.stop = env.event()
        env.process(self._at_window_end())

    def _at_window_end(self):
        yield self.env.timeout(self.window_end)
        self._check()

    def begin(self) -> None:
        self.open += 1

    def end(self, rec: RequestRecord) -> None:
        self.open -= 1
        if rec.measured:
            self.finished += 1
            self.missed += not rec.met
        self._check()

    def _check(self) -> None:
        if self.stop.triggered:
            return
        if self.early is not None and self.expected and self.missed > (1 - self.early) * self.expected:
            self.stop.succeed()  # attainment can no longer reach the threshold
        elif self.env.now >= self.window_end and self.open == 0 and \
                (self.expected is None or self.finished >= self.expected):
            self.stop.succeed()


def simulate(cfg: SimConfig, *, keep_policies: bool = False) -> RunResult:
    t_wall = time.perf_counter()
    system = SYSTEMS[cfg.system]
    budget = None if cfg.kv_budget_gb is None else cfg.kv_budget_gb * 1e9
    profile = load_server_profile(cfg.server, kv_budget_bytes=budget, online_refit=cfg.online_refit,
                                  coefficients=cfg.coefficients)
    env = simpy.Environment()
    scheduler = make_scheduler(system, profile.estimator, cfg.prefill_wait_s, cfg.max_ttft_s)
    server = SimServer(env, profile, scheduler, profile.forward_model(cfg.truth), np.random.default_rng([cfg.seed, 1]),
                       ServerSettings(max_batch_tokens=profile.max_batch_tokens, admission=cfg.admission))
    speculative = system.mode == "speculative"
    acceptance = _acceptance(cfg.acceptance) if speculative else None
    predictor = _predictor(cfg.acceptance) if speculative and uses_predictor(system) else None
    netprof = NETWORKS[cfg.network] if cfg.rtt_ms is None else NETWORKS[cfg.network].with_rtt(cfg.rtt_ms)
    wl = cfg.workload
    window = (cfg.warmup_s, cfg.warmup_s + cfg.window_s)
    watch_until = window[1] if cfg.measure_until is None else max(window[1], cfg.measure_until)
    expected = None if cfg.measure_until is not None else cfg.devices * cfg.measure_requests
    if cfg.requests_per_device is not None:
        expected = cfg.devices * cfg.requests_per_device
    cores = [simpy.Resource(env, capacity=1) for _ in range(cfg.shared_edge_cores or 0)]
    monitor = _Monitor(env, watch_until, expected, cfg.early_stop_below)
    records: list[RequestRecord] = []
    policies: list = []

    def is_measured(k: int, now: float) -> bool:
        if cfg.requests_per_device is not None:
            return True
        if cfg.measure_until is not None:
            return now < cfg.measure_until
        return 1 <= k <= cfg.measure_requests

    def device(i: int):
        dev = edge.Device(i, cfg.device_profile or fleet_device(cfg.fleet, i, cfg.seed),
                          Link.sample(netprof, np.random.default_rng([cfg.seed, i, 2])),
                          np.random.default_rng([cfg.seed, i, 3]), cores[i % len(cores)] if cores else None)
        start, end = device_window(i, cfg.devices, wl.bursts, math.inf)
        stagger = wl.stagger_s if i < cfg.devices else min(2.0, (end - start) / 4)
        yield env.timeout(start + np.random.default_rng([cfg.seed, i, 4]).uniform(0.0, stagger))
        k = 0
        while env.now < end and (cfg.requests_per_device is None or k < cfg.requests_per_device):
            rng = np.random.default_rng([cfg.seed, i, k, 5])
            slo = wl.slo_of(rng)
            rec = RequestRecord(i, dev.profile.name, k, slo, is_measured(k, env.now), env.now,
                                wl.prompt_tokens(i, k, rng, slo), wl.output.sample(rng), ttft_limit_s=cfg.max_ttft_s)
            records.append(rec)
            watched = rec.measured or env.now < watch_until
            if watched:
                monitor.begin()
            if speculative:
                path = acceptance.path(rng, rec.output_tokens)
                policy = make_edge_policy(system, predictor)
                if keep_policies:
                    policies.append(policy)
                yield from edge.speculative(env, server, dev, rec, path, policy, uses_predictor(system),
                                             cfg.drafter_prefill, cfg.draft_ahead)
            else:
                yield from edge.centralized(env, server, dev, rec)
            if watched:
                monitor.end(rec)
            yield env.timeout(rng.exponential(wl.think_s) if wl.think_s > 0 else 0.0)
            k += 1

    for i in range(burst_devices(cfg.devices, wl.bursts)):
        env.process(device(i))
    env.run(until=env.any_of([monitor.stop, env.timeout(cfg.max_sim_s)]))
    truncated = not monitor.stop.triggered
    summary = summarize(records, window)
    st = server.stats
    summary["server"] = {"batches": st.batches, "utilization": st.busy_s / env.now if env.now else 0.0,
                         "mean_batch_jobs": st.batch_jobs / st.batches if st.batches else 0.0,
                         "mean_batch_tokens": st.batch_tokens / st.batches if st.batches else 0.0,
                         "predicted_over_measured": st.predicted_ms / st.measured_ms if st.measured_ms else None,
                         "preempted": st.preempted, "evicted": st.evicted, "refused": dict(st.refused),
                         "demoted": getattr(scheduler, "demoted_total", 0)}
    summary["sim_s"] = env.now
    summary["truncated"] = truncated
    return RunResult(cfg, summary, records, server, truncated, time.perf_counter() - t_wall, policies)
