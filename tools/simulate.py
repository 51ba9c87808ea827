#!/usr/bin/env python3
"""WISP's discrete-event simulator (tools/sim/): capacity, goodput, bursts and RTT sensitivity, on the production
scheduler, estimator and speculation controller.

    python tools/simulate.py --quick --json                        # reduced sweep (< 1 min), JSON on stdout
    python tools/simulate.py --experiment all --setup paper --out docs/results/paper
    python tools/simulate.py --experiment capacity --setup ours --systems wisp,centralized --slos 4,8
    python tools/simulate.py --run --system wisp --devices 80 --slo 8 --setup paper   # one run, its summary
    python tools/simulate.py --experiment crossover        # where WISP pays (paper-kv), docs/results/crossover

Setups (tools/sim/experiments.py SETUPS): `paper` (A100-class server, Qwen3-32B-like profile, Pi 5 / Orin
Nano boards, parametric acceptance 0.75), `ours` (our CPU verifier profile, the shipped 4-bit drafter on
one VM core per device, its logged rounds replayed), `ours-student` (the same with the student drafter).
Outputs: <out>/<experiment>.csv and .json, <out>/<experiment>.png, and <out>/summary.json. Progress goes to
stderr. Capacity = the most concurrent devices with SLO attainment >= --attainment (default 0.9).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.sim import crossover as cx
from tools.sim import experiments as ex  # noqa: E402
from tools.sim import plots  # noqa: E402
from tools.sim.io import with_earlier_systems, write_csv, write_json  # noqa: E402
from tools.sim.run import simulate  # noqa: E402
from tools.sim.workload import SLO_CLASSES, Lengths  # noqa: E402

QUICK_SYSTEMS = ex.MAIN_SYSTEMS


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sweep (capacity + goodput) in under a minute")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--experiment", default="all",
                   help="capacity | goodput | burst | rtt | server | levers | all (comma-separated); hetero (not in "
                        "all: 8 tok/s chats beside 2 tok/s long documents, --hetero-loads); or crossover "
                        "(not in all: WISP's capacity ratios across context, RTT and acceptance; setup paper-kv, "
                        "out docs/results/crossover by default)")
    p.add_argument("--setup", choices=sorted(ex.SETUPS), help="default: paper (quick: ours)")
    p.add_argument("--out", type=Path, help="output directory (default: a temporary one with --quick, else "
                                            "docs/results/<setup>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attainment", type=float, default=0.9, help="SLO attainment that defines capacity")
    p.add_argument("--systems", help=f"comma-separated, default {','.join(ex.MAIN_SYSTEMS)}")
    p.add_argument("--slos", type=_floats, default=SLO_CLASSES, help="SLO classes, tokens/s")
    p.add_argument("--tol", type=float, help="capacity search resolution (relative); default 0.05 (quick 0.15)")
    p.add_argument("--goodput-devices", type=int, help="the fixed load of the goodput experiment")
    p.add_argument("--burst-base", type=int, help="base devices of the burst experiment")
    p.add_argument("--max-ttft-s", type=float, help="a request whose first token comes later than this misses its "
                   "SLO, and the WISP scheduler knows it (as `wisp-cloud serve --ttft-slo-s`: a prefill waits at most "
                   "a fifth of it); default: none, the paper's SLO: a rate from the first token on, however late")
    p.add_argument("--prefill-wait-s", type=float, help="the WISP scheduler's --prefill-wait-s: a prefill queued "
                   "this long goes first (default: a fifth of --max-ttft-s; without one, prefills are best effort)")
    p.add_argument("--hetero-loads", help="hetero: the fixed loads (devices), comma-separated")
    p.add_argument("--rtts", type=_floats, default=(5, 10, 20, 40, 80, 160, 320))
    p.add_argument("--rtt-slo", type=float, default=8.0)
    p.add_argument("--axes", help=f"crossover: which axes (default {','.join(cx.AXES)}); a run of some points "
                                  "replaces their rows in an existing crossover.csv and keeps the others")
    p.add_argument("--points", type=int, help="crossover: this many evenly spaced points per axis (ends included)")
    p.add_argument("--values", type=_floats, default=(), help="crossover: exactly these points of the one --axes")
    p.add_argument("--crossover-slo", type=float, default=8.0, help="crossover: the SLO class, tokens/s")
    p.add_argument("--acceptance", help="override the setup's acceptance model (q4, student, param:0.75, ...)")
    p.add_argument("--truth", choices=["profile", "roofline"], help="forward-time model (A100 profile only)")
    p.add_argument("--kv-budget-gb", type=float, help="override the KV budget (inf: unbounded)")
    p.add_argument("--fleet", help="override the setup's device fleet (tools/sim/devices.py FLEETS)")
    p.add_argument("--drafter-prefill", choices=["cloud", "sequential", "overlapped", "free"],
                   help="how the device prefills its drafter: cloud (our engine: the verifier decodes meanwhile), "
                        "sequential (the device waits), what-ifs overlapped (with the server's prefill) and free")
    p.add_argument("--draft-ahead", action=argparse.BooleanOptionalAction,
                   help="devices draft the next block during verification, as the edge engine does by default "
                        "(the published sweeps predate it and run without)")
    p.add_argument("--c3", type=float, help="what-if server: the per-cached-token cost, ms (the profile's otherwise)")
    p.add_argument("--seeds", type=int, help="capacity and goodput: the median over this many seeds, "
                   "with a distribution-free interval (tools/sim/stats.py); --quick: 1")
    p.add_argument("--measure-requests", type=int, help="requests measured per device (setup's default otherwise)")
    p.add_argument("--update", action="store_true",
                   help="capacity and goodput: keep the rows of the systems not run now from the CSVs already in "
                        "--out (re-run some systems after a change; tables, plots and summary show all)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--lock", help="hold this flock during each simulation (e.g. /tmp/wisp_heavy.lock on a shared box)")
    p.add_argument("--run", action="store_true", help="one simulation (--system, --devices, --slo) and its summary")
    p.add_argument("--system", default="wisp")
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--slo", type=float, help="one SLO class for --run and the goodput experiment "
                                             "(default: the mix 2/4/6/8)")
    return p.parse_args(argv)


def base_config(a: argparse.Namespace):
    cfg = replace(ex.SETUPS[a.setup], seed=a.seed)
    if a.acceptance:
        cfg = replace(cfg, acceptance=a.acceptance)
    if a.truth:
        cfg = replace(cfg, truth=a.truth)
    if a.kv_budget_gb is not None:
        cfg = replace(cfg, kv_budget_gb=a.kv_budget_gb)
    if a.fleet:
        cfg = replace(cfg, fleet=a.fleet)
    if a.drafter_prefill:
        cfg = replace(cfg, drafter_prefill=a.drafter_prefill)
    if a.draft_ahead is not None:
        cfg = replace(cfg, draft_ahead=a.draft_ahead)
    if a.c3 is not None:
        cfg = replace(cfg, coefficients=(None, None, None, a.c3))
    if a.max_ttft_s is not None:
        cfg = replace(cfg, max_ttft_s=a.max_ttft_s)
    if a.prefill_wait_s is not None:
        cfg = replace(cfg, prefill_wait_s=a.prefill_wait_s)
    if a.slo:
        cfg = replace(cfg, workload=cfg.workload.with_slo(a.slo))
    cfg = ex.quick(cfg) if a.quick else cfg
    if a.measure_requests:  # given explicitly, it wins over --quick's
        cfg = replace(cfg, measure_requests=a.measure_requests)
    return cfg


def main(argv=None) -> int:
    a = parse(argv)
    command = shlex.join(["python", "tools/simulate.py", *(sys.argv[1:] if argv is None else argv)])
    only_crossover = a.experiment == "crossover"
    a.setup = a.setup or ("paper-kv" if only_crossover else "ours" if a.quick else "paper")
    a.seeds = a.seeds or (1 if a.quick else 5)
    ex.LOCK_PATH = a.lock
    cfg = base_config(a)
    t0 = time.time()
    if a.run:
        run = simulate(replace(cfg, system=a.system, devices=a.devices))
        print(json.dumps({"config": {"setup": a.setup, "system": a.system, "devices": a.devices, "slo": a.slo},
                          "wall_s": round(run.wall_s, 2), **run.summary}, indent=None if a.json else 1, default=str))
        return 0
    out = a.out or (Path(tempfile.mkdtemp(prefix="wisp-sim-")) if a.quick else
                    ROOT / "docs" / "results" / ("crossover" if only_crossover else a.setup))
    out.mkdir(parents=True, exist_ok=True)
    systems = tuple(a.systems.split(",")) if a.systems else (QUICK_SYSTEMS if a.quick else ex.MAIN_SYSTEMS)
    wanted = {"capacity", "goodput"} if a.quick and a.experiment == "all" else (
        {"capacity", "goodput", "burst", "rtt", "server", "levers"} if a.experiment == "all"
        else set(a.experiment.split(",")))
    tol = a.tol if a.tol is not None else (0.15 if a.quick else 0.05)
    summary: dict = {"setup": a.setup, "quick": a.quick, "seed": a.seed, "attainment_threshold": a.attainment,
                     "config": _describe(cfg), "systems": list(systems), "out": str(out)}
    timings: dict[str, float] = {}
    mark = time.time()

    def done(name: str) -> None:
        nonlocal mark
        timings[name] = round(time.time() - mark, 1)
        mark = time.time()

    if "capacity" in wanted:
        table: list[dict] = []
        cap, rows = ex.capacity_experiment(cfg, systems, a.slos, a.attainment, tol,
                                           guess=ex.CAPACITY_GUESS.get(a.setup, 32), seeds=a.seeds, table=table)
        table = [{"workload": cfg.workload_name, **r} for r in table]
        if a.update:
            table = with_earlier_systems(out / "capacity.csv", table, cap)
            rows = with_earlier_systems(out / "capacity_runs.csv", rows, cap)
            cap = {}
            for r in table:
                cap.setdefault(r["system"], {})[f"{float(r['slo']):g}"] = int(r["median"])
        summary["capacity"] = cap
        summary["capacity_ci"] = {f"{r['system']}@{float(r['slo']):g}": [r["ci_low"], r["ci_high"]] for r in table}
        write_csv(out / "capacity_runs.csv", rows)
        write_csv(out / "capacity.csv", table)
        write_json(out / "capacity.json", cap)
        if not a.no_plots:
            plots.capacity(cap, out / "capacity.png", f"capacity per SLO class ({a.setup}), median of {a.seeds} "
                           "seeds, bars: interval", paper=a.setup.startswith("paper"), table=table)
        done("capacity")
    if "goodput" in wanted:
        devices = a.goodput_devices or ex.GOODPUT_DEVICES[a.setup]
        table = []
        good, rows = ex.goodput_experiment(cfg, devices, systems, seeds=a.seeds, table=table)
        table = [{"workload": cfg.workload_name, **r} for r in table]
        if a.update:
            table = with_earlier_systems(out / "goodput.csv", table, good)
            rows = with_earlier_systems(out / "goodput_runs.csv", rows, good)
            good = {r["system"]: r["goodput_median"] for r in table}
            if all(v in good for v in ex.SLED_VARIANTS):  # the better SLED variant, as goodput_experiment adds it
                good["sled"] = max(good[v] for v in ex.SLED_VARIANTS)
        summary["goodput"] = good
        summary["goodput_ci"] = {r["system"]: [r["goodput_ci_low"], r["goodput_ci_high"]] for r in table}
        summary["goodput_devices"] = devices
        write_csv(out / "goodput_runs.csv", rows)
        write_csv(out / "goodput.csv", table)
        if not a.no_plots:
            classes = f"{a.slo:g} tok/s" if a.slo else "mix 2/4/6/8"
            plots.goodput(good, out / "goodput.png", f"goodput at {devices} devices, SLO {classes} ({a.setup}), "
                          f"median of {a.seeds} seeds", table=table)
        done("goodput")
    if "capacity" in summary or "goodput" in summary:
        summary["ratios"] = ex.ratios(summary.get("capacity", {}), summary.get("goodput", {}))
    if "burst" in wanted:
        base = a.burst_base or ex.BURST_BASE[a.setup]
        bsum, series = ex.burst_experiment(cfg, base)
        summary["burst"] = {"base_devices": base, **bsum}
        write_csv(out / "burst.csv", series)
        if not a.no_plots:
            plots.burst(series, out / "burst.png", f"bursts from {base} devices ({a.setup}): WISP (solid) vs FCFS "
                                                   "(dashed), 5 seeds pooled", 60.0, 40.0)
        done("burst")
    if "rtt" in wanted:
        rtt, rows = ex.rtt_experiment(cfg, a.rtts, slo=a.rtt_slo, threshold=a.attainment,
                                      guess=ex.CAPACITY_GUESS.get(a.setup, 32))
        summary["rtt"] = {"slo": a.rtt_slo, "capacity": rtt}
        write_csv(out / "rtt.csv", rows)
        if not a.no_plots:
            plots.rtt(rows, out / "rtt.png", f"capacity at {a.rtt_slo:g} tok/s vs RTT ({a.setup})")
        done("rtt")
    if "server" in wanted:
        srv, rows = ex.server_cost_experiment(cfg, threshold=a.attainment, guess=ex.CAPACITY_GUESS.get(a.setup, 32))
        summary["server_cost"] = {"slo": 8.0, "capacity_by_per_cached_token_ms": srv}
        write_csv(out / "server_cost.csv", rows)
        if not a.no_plots:
            plots.sweep(rows, "per_cached_token_ms", out / "server_cost.png", "capacity at 8 tok/s vs per-request "
                        f"KV-read cost ({a.setup})", "c3: ms per cached token per forward")
        done("server")
    if "levers" in wanted:
        lev, rows = ex.levers_experiment(cfg, threshold=a.attainment, guess=ex.CAPACITY_GUESS.get(a.setup, 32) // 2)
        summary["levers"] = {"slo": 8.0, "capacity": lev}
        write_csv(out / "levers.csv", rows)
        done("levers")
    if "hetero" in wanted:
        loads = [int(x) for x in a.hetero_loads.split(",")] if a.hetero_loads else ex.HETERO_LOADS[a.setup]
        table, rows = ex.hetero_experiment(cfg, loads, systems, a.seeds, a.attainment, tol,
                                           ex.CAPACITY_GUESS.get(a.setup, 32) // 2)
        summary["hetero"] = {"workload": ex.HETERO_WORKLOAD.name, "loads": loads,
                             **{f"{r['system']}/{r['quantity']}" + (f"@{r['devices']}" if r["devices"] != "" else ""):
                                [r["median"], r["ci_low"], r["ci_high"]] for r in table}}
        write_csv(out / "hetero_runs.csv", rows)
        write_csv(out / "hetero.csv", [{"workload": ex.HETERO_WORKLOAD.name, **r} for r in table])
        if not a.no_plots:
            plots.hetero(table, out / "hetero.png", f"heterogeneous blocks ({a.setup}): 8 tok/s chats, 2 tok/s "
                         f"documents\nmedian of {a.seeds} seeds, bars: interval")
        done("hetero")
    if "crossover" in wanted:
        summary["crossover"] = crossover(a, cfg, out, command)
        done("crossover")
    summary["wall_s"] = round(time.time() - t0, 1)
    previous = out / "summary.json"
    if previous.exists() and not a.quick:  # a partial rerun updates the experiments it ran, keeps the others
        old = json.loads(previous.read_text())
        timings = {**old.get("timings_s", {}), **timings}
        summary = {**old, **summary}
    summary["timings_s"] = timings
    write_json(out / "summary.json", summary)
    if a.json:
        print(json.dumps(summary, default=str))
    else:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def crossover(a: argparse.Namespace, cfg, out: Path, command: str) -> dict:
    """The crossover experiment's files (crossover.csv, crossover.png) and its part of summary.json."""
    axes = cx.select(a.axes, a.points, a.values)
    systems = tuple(a.systems.split(",")) if a.systems else cx.SYSTEMS_COMPARED
    tol = a.tol if a.tol is not None else (0.15 if a.quick else cx.TOL)
    rows = cx.crossover_experiment(cfg, axes, systems, a.crossover_slo, a.attainment, tol,
                                   ex.CAPACITY_GUESS.get(a.setup, 32), a.seeds)
    previous = json.loads((out / "summary.json").read_text()).get("crossover", {}) if (
        not a.quick and (out / "summary.json").exists()) else {}
    if not a.quick:
        rows = cx.merge(out / "crossover.csv", rows)
    rows = cx.with_ratios(rows, systems)
    crossings = cx.crossovers(rows)
    write_csv(out / "crossover.csv", [{k: r[k] for k in cx.COLUMNS} for r in rows])
    if not a.no_plots:
        plots.crossover(rows, crossings, cx.LABELS, cx.LOG_X, out / "crossover.png",
                        f"where WISP pays ({a.setup}, {a.crossover_slo:g} tok/s): capacity ratio, median of "
                        f"{a.seeds} seeds, bars: interval; dotted: ratio crosses 1")
    ratio = {f"{r['axis']}@{r['x']:g}/wisp_over_{r['system']}": [r["median"], r["ci_low"], r["ci_high"]]
             for r in rows if r["quantity"] == "ratio"}
    return {"slo": a.crossover_slo, "systems": list(systems), "tol": tol, "seeds": a.seeds,
            "full_grid": {k: list(v) for k, v in cx.AXES.items()}, "note": cx.NOTE,
            "points": sorted({(r["axis"], r["x"]) for r in rows}, key=lambda p: (list(cx.AXES).index(p[0]), p[1])),
            "commands": {**previous.get("commands", {}), **{f"{k}@{x:g}": command for k, v in axes.items() for x in v}},
            "crossovers": crossings, "ratio_median_ci": ratio}


def _describe(cfg) -> dict:
    wl = cfg.workload
    return {"server": cfg.server, "truth": cfg.truth, "kv_budget_gb": None if cfg.kv_budget_gb is None else (
        "inf" if math.isinf(cfg.kv_budget_gb) else cfg.kv_budget_gb), "fleet": cfg.fleet, "network": cfg.network,
        "acceptance": cfg.acceptance, "coefficients": cfg.coefficients, "drafter_prefill": cfg.drafter_prefill,
        "draft_ahead": cfg.draft_ahead, "measure_requests": cfg.measure_requests, "workload": cfg.workload_name,
        "max_ttft_s": cfg.max_ttft_s, "prefill_wait_s": cfg.prefill_wait_s,
        "prompt": vars(wl.prompt) if isinstance(wl.prompt, Lengths) else "public sets' lengths "
        "(tools/sim/profiles/public_prompt_tokens.json)", "output": vars(wl.output),
        "think_s": wl.think_s, "warmup_s": cfg.warmup_s, "window_s": cfg.window_s}


if __name__ == "__main__":
    sys.exit(main())
