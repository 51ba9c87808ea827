"""The experiments of issue 7: capacity per SLO class, goodput at a fixed load, bursts, RTT sensitivity.

Each returns plain rows (for CSV) and a small summary (for JSON); `tools/simulate.py` writes them and the
plots. Setups (`SETUPS`) bundle the server profile, the fleet, the network, the acceptance model and the
workload; everything else is the production policies (systems.py).
"""

from __future__ import annotations

import fcntl
import math
import sys
import time
from dataclasses import replace

import numpy as np

from tools.sim.run import SimConfig, simulate
from tools.sim.stats import median_ci
from tools.sim.systems import SLED_VARIANTS
from tools.sim.workload import QUICK, SLO_CLASSES, Burst, Lengths, Workload, public_workload

PUBLIC = public_workload()  # every setup's requests: the public sets' prompt lengths
SETUPS = {
    # The paper's setting, as far as it was recovered: an A100-class server with a 32B target, Pi 5 and Orin
    # Nano boards drafting with a 0.6B-class model, Wi-Fi + metro network, acceptance 0.75 per token.
    # KV memory is not binding (the paper's simulation evidently did not model it: see the README).
    "paper": SimConfig(server="a100-qwen3-32b", fleet="paper", network="wifi-metro", acceptance="param:0.75",
                       workload=PUBLIC,
                       kv_budget_gb=math.inf, measure_requests=1),  # capacities of 100s: one request each is plenty
    # The same with the KV pool a real A100-80GB has left beside Qwen3-32B's weights (5 GB, 19k tokens): the
    # memory that binds the paper's measured centralized baseline (see the README).
    "paper-kv": SimConfig(server="a100-qwen3-32b", fleet="paper", network="wifi-metro", acceptance="param:0.75",
                          workload=PUBLIC,
                          kv_budget_gb=None, measure_requests=1),
    # Ours, end to end: the verifier we ship on this 2-core VM, the shipped 4-bit drafter on one VM core per
    # device, its logged rounds replayed, the server's default 1 GiB KV pool.
    "ours": SimConfig(server="cpu-smollm2-135m", fleet="vm-q4", network="wifi-metro", acceptance="q4",
                      workload=PUBLIC),
    "ours-student": SimConfig(workload=PUBLIC, server="cpu-smollm2-135m", fleet="vm-student", network="wifi-metro",
                              acceptance="student"),
}
GOODPUT_DEVICES = {"paper": 120, "paper-kv": 60, "ours": 40, "ours-student": 30}  # near the systems' capacities at the mix
CAPACITY_GUESS = {"paper": 96, "paper-kv": 64, "ours": 24, "ours-student": 16}  # where each search starts (2 tok/s)
HETERO_LOADS = {"paper": (30, 45, 60, 75), "paper-kv": (10, 20, 30), "ours": (6, 9, 12, 16), "ours-student": (4, 6, 8)}
BURST_BASE = {"paper": 40, "paper-kv": 20, "ours": 8, "ours-student": 6}
MAIN_SYSTEMS = ("wisp", "centralized", "sled_fixed", "sled_confidence", "wisp_no_predictor", "wisp_fcfs")


LOCK_PATH: str | None = None  # run each simulation under this flock (the machine is shared)


def run_sim(cfg: SimConfig):
    """simulate(cfg), holding LOCK_PATH for the run only, so other heavy jobs can interleave."""
    if LOCK_PATH is None:
        return simulate(cfg)
    with open(LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            return simulate(cfg)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quick(cfg: SimConfig) -> SimConfig:
    """The reduced sweep's runs: short answers, a 10 s measurement window."""
    return replace(cfg, workload=QUICK, warmup_s=5.0, window_s=20.0, measure_requests=2, max_sim_s=300.0)


# --- capacity -------------------------------------------------------------------------------------------------

def capacity_search(cfg: SimConfig, system: str, slo: float | None, threshold: float, guess: int, *,
                    tol: float = 0.05, max_devices: int = 4000, rows: list | None = None) -> int:
    """The most devices with SLO attainment >= threshold: bracket from `guess` (x1.5 steps), then bisect until
    the bracket is within `tol` of the answer. Every run uses the same seed (common random numbers). `slo`
    None keeps the workload's own mix of classes (attainment over all of them)."""
    label = "mix" if slo is None else f"{slo:g}"
    seen: dict[int, float] = {0: 1.0}

    def passes(n: int) -> bool:
        if n not in seen:
            run = run_sim(replace(cfg, system=system, devices=n, workload=cfg.workload.with_slo(slo),
                                   early_stop_below=threshold, window_s=0.0))
            seen[n] = run.summary["attainment"]
            if rows is not None:
                rows.append({"system": system, "slo": label, "seed": cfg.seed, "devices": n,
                             "attainment": round(seen[n], 4),
                             "goodput": round(run.summary["goodput"], 1), "wall_s": round(run.wall_s, 2),
                             "truncated": run.truncated})
            log(f"  {system:<18} slo {label}  {n:>5} devices: attainment {seen[n]:.3f}  ({run.wall_s:.1f} s)")
        return seen[n] >= threshold

    lo, hi = 0, None
    if passes(max(1, guess)):
        lo = max(1, guess)
        while hi is None:
            if lo >= max_devices:
                return lo
            n = min(max_devices, max(lo + 1, int(lo * 1.5)))
            if passes(n):
                lo = n
            else:
                hi = n
    else:
        hi = max(1, guess)
        while hi > 1:
            n = min(hi - 1, max(1, int(hi / 1.5)))
            if passes(n):
                lo = n
                break
            hi = n
    while hi - lo > max(1, tol * lo):
        mid = (lo + hi) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo


def capacity_experiment(cfg: SimConfig, systems=MAIN_SYSTEMS, slos=SLO_CLASSES, threshold: float = 0.9,
                        tol: float = 0.05, guess: int = 64, seeds: int = 1,
                        table: list | None = None) -> tuple[dict, list]:
    """{system: {"2": n, ...}} plus the sled aggregate (the better variant per class), and every run as a row.
    With several seeds, the capacity is the median of the per-seed searches (each seed in the rows), and
    `table` (if given) gets one row per system and class: median, ci_low, ci_high (stats.median_ci), seeds."""
    capacity: dict[str, dict[str, int]] = {}
    rows: list[dict] = []
    per_seed: dict[tuple[str, str], list[int]] = {}
    for system in systems:
        capacity[system] = {}
        previous = guess
        for slo in sorted(slos):
            t0 = time.time()
            found = []
            for seed in range(cfg.seed, cfg.seed + seeds):
                found.append(capacity_search(replace(cfg, seed=seed), system, slo, threshold, previous, tol=tol,
                                             rows=rows))
            n = int(np.median(found)) if seeds > 1 else found[0]
            capacity[system][f"{slo:g}"] = n
            per_seed[(system, f"{slo:g}")] = found
            if table is not None:
                table.append({"system": system, "slo": slo, **median_ci(found).row(),
                              "per_seed": " ".join(map(str, found))})
            previous = max(1, n)
            log(f"capacity {system} @ {slo:g} tok/s = {n} devices {found if seeds > 1 else ''} "
                f"({time.time() - t0:.0f} s)")
    if all(v in capacity for v in SLED_VARIANTS):
        capacity["sled"] = {k: max(capacity[v][k] for v in SLED_VARIANTS) for k in capacity[SLED_VARIANTS[0]]}
        if table is not None:  # the better variant seed by seed (the same seed = the same devices and prompts)
            for k in capacity["sled"]:
                found = [max(a, b) for a, b in zip(*(per_seed[(v, k)] for v in SLED_VARIANTS))]
                table.append({"system": "sled", "slo": float(k), **median_ci(found).row(),
                              "per_seed": " ".join(map(str, found))})
    return capacity, rows


# --- goodput --------------------------------------------------------------------------------------------------

def goodput_experiment(cfg: SimConfig, devices: int, systems=MAIN_SYSTEMS, seeds: int = 1,
                       table: list | None = None) -> tuple[dict, list]:
    """Every system at the same load (the workload's SLO classes: the mix 2/4/6/8, or one): goodput and what
    explains it, one row per system and seed; the goodput reported is the median over seeds, and `table`
    (if given) gets one row per system with the median and interval of goodput and attainment
    (stats.median_ci)."""
    goodput, rows = {}, []
    for system in systems:
        mine = [goodput_run(replace(cfg, seed=seed), devices, system) for seed in range(cfg.seed, cfg.seed + seeds)]
        rows += mine
        good = median_ci([r["goodput"] for r in mine])
        goodput[system] = round(good.median, 1)
        if table is not None:
            att = median_ci([r["attainment"] for r in mine])
            table.append({"system": system, "devices": devices, **{f"goodput_{k}": v for k, v in good.row().items()},
                          **{f"attainment_{k}": v for k, v in att.row(3).items() if k != "seeds"}})
    if all(v in goodput for v in SLED_VARIANTS):
        goodput["sled"] = max(goodput[v] for v in SLED_VARIANTS)
    return goodput, rows


def goodput_run(cfg: SimConfig, devices: int, system: str) -> dict:
    """One goodput run's row."""
    run = run_sim(replace(cfg, system=system, devices=devices))
    s = run.summary
    row = {"system": system, "seed": cfg.seed, "devices": devices, "goodput": round(s["goodput"], 1),
           "throughput": round(s.get("throughput", 0.0), 1), "attainment": round(s["attainment"], 4),
           **{f"attainment_{k}": round(v["attainment"], 4) for k, v in s.get("by_slo", {}).items()},
           "ttft_p50_s": _r(s.get("ttft_p50_s")), "ttft_p99_s": _r(s.get("ttft_p99_s")),
           "mean_accepted_length": _r(s.get("mean_accepted_length")),
           "drafted_per_round": _r(s.get("drafted_per_round")), "acceptance_rate": _r(s.get("acceptance_rate")),
           "wasted_drafting_ms_per_token": _r(s.get("wasted_drafting_ms_per_token")),
           "queue_ms_per_round": _r(s.get("queue_ms_per_round")),
           "mean_batch_jobs": _r(s["server"]["mean_batch_jobs"]),
           "mean_batch_tokens": _r(s["server"]["mean_batch_tokens"]), "demoted": s["server"]["demoted"],
           "preempted": s["server"]["preempted"], "refusals": s.get("refusals", 0), "wall_s": round(run.wall_s, 1)}
    log(f"goodput {system:<18} {devices} devices, seed {cfg.seed}: {row['goodput']} tok/s, "
        f"attainment {row['attainment']:.3f}")
    return row


def _r(x, nd: int = 3):
    return None if x is None else round(float(x), nd)


# --- bursts ---------------------------------------------------------------------------------------------------

BURST_WORKLOAD = replace(PUBLIC, output=Lengths(64, 0.3, 24, 128), stagger_s=5.0,
                         name=PUBLIC.name.replace("median 160", "median 64"))


def burst_experiment(cfg: SimConfig, base: int, multipliers=(2.0, 3.0, 4.0), systems=("wisp", "wisp_fcfs"), *,
                     start_s: float = 60.0, length_s: float = 40.0, end_s: float = 140.0, bin_s: float = 10.0,
                     seeds: int = 5) -> tuple[dict, list]:
    """Base load, then m x base for `length_s`, then back: SLO attainment of requests by arrival time, per class.
    Every request arriving in [0, end_s) is measured; `seeds` runs are pooled (a bin holds few requests)."""
    series, summary = [], {}
    for m in multipliers:
        wl = replace(BURST_WORKLOAD, bursts=(Burst(start_s, start_s + length_s, m),))
        for system in systems:
            recs = []
            for seed in range(cfg.seed, cfg.seed + seeds):
                run = run_sim(replace(cfg, system=system, devices=base, workload=wl, warmup_s=0.0, window_s=end_s,
                                      measure_until=end_s, max_sim_s=end_s + 600.0, seed=seed))
                recs += [r for r in run.records if r.measured]
            during = [r for r in recs if start_s <= r.arrival < start_s + length_s]
            key = f"x{m:g}/{system}"
            summary[key] = {f"{slo:g}": _share([r for r in during if r.slo == slo]) for slo in SLO_CLASSES}
            summary[key]["all"] = _share(during)
            summary[key]["peak_devices"] = int(round(base * m))
            for b in range(int(end_s / bin_s)):
                t0, t1 = b * bin_s, (b + 1) * bin_s
                in_bin = [r for r in recs if t0 <= r.arrival < t1]
                for slo in SLO_CLASSES:
                    group = [r for r in in_bin if r.slo == slo]
                    series.append({"multiplier": m, "system": system, "t": t0, "slo": slo, "requests": len(group),
                                   "attainment": _share(group)})
            log(f"burst x{m:g} {system:<10} during the burst: {summary[key]}")
    return summary, series


def _share(recs) -> float | None:
    return round(sum(r.met for r in recs) / len(recs), 4) if recs else None


# --- heterogeneous blocks ----------------------------------------------------------------------------------------

DOCUMENT_PROMPTS = Lengths(1536, 0.3, 768, 3072)  # long documents to read (summaries, extraction, code review)
HETERO_WORKLOAD = replace(PUBLIC, slo_mix=((8.0, 0.5), (2.0, 0.5)), prompt_by_slo=((2.0, DOCUMENT_PROMPTS),),
                          name="heterogeneous: half 8 tok/s chats (" + PUBLIC.name.split(" (")[0] + "), half "
                               "2 tok/s documents (prompts log-normal, median 1,536 tokens); answers log-normal "
                               "(median 160)")


def hetero_experiment(cfg: SimConfig, loads, systems=("wisp", "wisp_fcfs"), seeds: int = 5, threshold: float = 0.9,
                      tol: float = 0.08, guess: int = 64) -> tuple[list, list]:
    """Light and heavy verifications in the same batches: half the devices chat at 8 tokens/s (short prompts,
    a few draft tokens on a short context each round), half read long documents at 2 tokens/s (a cold
    prefill of ~1.5k tokens, then verify blocks over a long context). Batched first come, first served, a
    heavy job sets the batch time and drags the tight ones past their deadlines: the interference the
    SLO-aware scheduler is for. Per system: the capacity of the mix (attainment over both classes) and, at
    each fixed load, goodput and each class's attainment; medians over seeds with their interval."""
    cfg = replace(cfg, workload=HETERO_WORKLOAD)
    table: list[dict] = []
    rows: list[dict] = []
    for system in systems:
        found = [capacity_search(replace(cfg, seed=seed), system, None, threshold, guess, tol=tol, rows=rows)
                 for seed in range(cfg.seed, cfg.seed + seeds)]
        table.append({"system": system, "quantity": "capacity", "devices": "", **median_ci(found).row(),
                      "per_seed": " ".join(map(str, found))})
        log(f"hetero capacity {system}: {found}")
        for n in loads:
            runs = [goodput_run(replace(cfg, seed=seed), n, system) for seed in range(cfg.seed, cfg.seed + seeds)]
            rows += [{"system": system, "slo": "mix", **r} for r in runs]
            for quantity in ("goodput", "attainment", "attainment_8", "attainment_2", "queue_ms_per_round"):
                values = [r[quantity] for r in runs if r.get(quantity) is not None]
                if values:
                    table.append({"system": system, "quantity": quantity, "devices": n,
                                  **median_ci(values).row(1 if quantity in ("goodput", "queue_ms_per_round") else 3),
                                  "per_seed": " ".join(f"{v:g}" for v in values)})
    return table, rows


# --- RTT ------------------------------------------------------------------------------------------------------

def rtt_experiment(cfg: SimConfig, rtts=(5, 10, 20, 40, 80, 160, 320), systems=("wisp", "centralized",
                   "sled_confidence"), slo: float = 4.0, threshold: float = 0.9, tol: float = 0.08,
                   guess: int = 64) -> tuple[dict, list]:
    """Capacity at one SLO class as the median RTT grows: where distributed speculation stops paying."""
    result: dict[str, dict[str, int]] = {s: {} for s in systems}
    rows: list[dict] = []
    for system in systems:
        previous = guess
        for rtt in rtts:
            n = capacity_search(replace(cfg, rtt_ms=float(rtt)), system, slo, threshold, previous, tol=tol)
            result[system][f"{rtt:g}"] = n
            rows.append({"system": system, "rtt_ms": rtt, "slo": slo, "capacity": n})
            previous = max(1, n)
            log(f"rtt {rtt} ms {system}: capacity {n}")
    return result, rows


def ratios(capacity: dict, goodput: dict) -> dict:
    out: dict = {}
    for base in ("centralized", "sled"):
        if "wisp" in capacity and base in capacity:
            out[f"capacity_wisp_over_{base}"] = {k: (round(capacity["wisp"][k] / v, 3) if v else None)
                                                 for k, v in capacity[base].items()}
        if "wisp" in goodput and goodput.get(base):
            out[f"goodput_wisp_over_{base}"] = round(goodput["wisp"] / goodput[base], 3)
    return out


# --- what server makes distributed speculation pay ------------------------------------------------------------

def server_cost_experiment(cfg: SimConfig, per_cached_ms=(0.0, 1.5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
                           systems=("wisp", "centralized", "sled_confidence"), slo: float = 8.0,
                           threshold: float = 0.9, tol: float = 0.08, guess: int = 64) -> tuple[dict, list]:
    """Capacity at one SLO class as the per-request cost of a forward grows (c3, ms per cached token: reading
    each request's KV; an A100 roofline gives 1.5e-4, our CPU verifier 2.4e-2). Centralized pays it for every
    token, speculation once per round."""
    result: dict[str, dict[str, int]] = {s: {} for s in systems}
    rows: list[dict] = []
    for system in systems:
        previous = guess
        for c3 in per_cached_ms:
            n = capacity_search(replace(cfg, coefficients=(None, None, None, c3)), system, slo, threshold, previous,
                                tol=tol)
            result[system][f"{c3:g}"] = n
            rows.append({"system": system, "per_cached_token_ms": c3, "slo": slo, "capacity": n})
            previous = max(1, n)
            log(f"c3 {c3:g} ms/token {system}: capacity {n}")
    return result, rows


# --- what moves WISP's capacity ---------------------------------------------------------------------------------

LEVERS = {
    "as set up": {},
    "device waits for its drafter's prefill (no cloud rounds)": {"drafter_prefill": "sequential"},
    "drafter prefill overlapped with the server's": {"drafter_prefill": "overlapped"},
    "no drafter prefill on the device (what-if)": {"drafter_prefill": "free"},
    "device drafts during verification (draft_ahead)": {"draft_ahead": True},
    "acceptance 0.9 (param:0.9)": {"acceptance": "param:0.9"},
    "Orin Nano boards only": {"fleet": "orin-nano"},
    "RTT 10 ms": {"rtt_ms": 10.0},
    "roofline forward time": {"truth": "roofline"},
    "KV pool of a real A100-80GB (5 GB: 19k tokens)": {"kv_budget_gb": None},
}


def levers_experiment(cfg: SimConfig, systems=("wisp", "centralized"), slo: float = 8.0, threshold: float = 0.9,
                      tol: float = 0.08, guess: int = 64, levers: dict = LEVERS) -> tuple[dict, list]:
    """Capacity at one SLO class when one assumption changes at a time (two measured requests per device)."""
    cfg = replace(cfg, measure_requests=max(2, cfg.measure_requests))
    result: dict[str, dict[str, int]] = {}
    rows: list[dict] = []
    for name, changes in levers.items():
        result[name] = {}
        for system in systems:
            if system == "centralized" and changes and set(changes) <= {"drafter_prefill", "acceptance", "fleet", "draft_ahead"}:
                continue  # nothing drafts: the change cannot matter
            n = capacity_search(replace(cfg, **changes), system, slo, threshold, guess, tol=tol)
            result[name][system] = n
            rows.append({"lever": name, "system": system, "slo": slo, "capacity": n})
            log(f"lever '{name}' {system}: capacity {n}")
    return result, rows
