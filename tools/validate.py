"""Sim-to-real validation: the real load test and the simulator, describing the same system, side by side.

    python tools/validate.py [--devices 1,2,4,6,8] [--systems wisp,centralized] [--rtt 20] [--slo 4]
                             [--tokens 48] [--requests 2] [--repeats 3] [--seeds 5]
                             [--out docs/results/validation]

The system: the verifier (`wisp-cloud serve --policy wisp --threads 1`) pinned to core 0; N edge devices
(threads of this process, each with its own Q4_1 llama.cpp drafter on one thread) all pinned to core 1;
loopback HTTP with `--rtt` ms added to every round trip; N devices x `--requests` requests back to back,
`--repeats` runs per point. Every request asks its own prompt of the public sets (MT-Bench + HumanEval): a
repeat would be served from the verifier's prefix cache almost free, which the simulator does not model.
`--tokens` greedy tokens each at an SLO of `--slo` tok/s, drafting ahead off. Systems: `wisp` (WISP's
controller and scheduler) and `centralized` (the same server decoding every token, streamed: the
simulator's `centralized_wisp`).

The simulator is built from what this run measures, never from the runs it is compared with: the target's
profile measured on the verifier's core (`wisp-cloud profile --threads 1`, full grid; the server plans with
it too); one device alone in the engine on the edge core, on two prompts the runs do not use (drafting time
per token with the controller, the drafter's prefill speed, the HTTP client's work per round); the loopback
round trip of `GET /health` plus `--rtt`; each run's prompt lengths device by device; and the shared edge
core (`SimConfig.shared_edge_cores=1`: the devices take turns on one core). The acceptance is the shipped
Q4_1 drafter's logged rounds on the public sets. Each real run is simulated with `--seeds` seeds; both
sides report the median and a 95% interval (`tools/sim/stats.median_ci`; with three real runs, their range).

Writes <out>/validation.csv, <out>/validation.png, <out>/summary.json (max_throughput_rel_error,
max_attainment_abs_error; aims 0.15 and 0.1), <out>/real.json (the load test's rows) and
<out>/verifier-profile.json (the profile both sides used).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.load_test import cpus, serve_and_run  # noqa: E402
from tools.prompt_sets import NAME as PROMPT_SET  # noqa: E402
from tools.sim.devices import DeviceProfile  # noqa: E402
from tools.sim.io import write_csv, write_json  # noqa: E402
from tools.sim.run import SimConfig, simulate  # noqa: E402
from tools.sim.stats import median_ci  # noqa: E402
from tools.sim.workload import Lengths, Workload  # noqa: E402

SIM_SYSTEM = {"wisp": "wisp", "centralized": "centralized_wisp"}  # the real server runs --policy wisp for both
THROUGHPUT_AIM, ATTAINMENT_AIM = 0.15, 0.10


def measure_device(url: str, drafter_name: str, prompts: list[list[int]], rtt_ms: float,
                   http_rtt_ms: float) -> DeviceProfile:
    """The device as the engine sees it, alone on the pinned edge core: drafting time per drafted token (the
    drafter's evaluation, sampling and the controller), the drafter's prefill speed, and the HTTP client's
    work per round (a round's wall time beyond the server's queue and forward, the emulated delay and the
    bare loopback round trip), from two generations on prompts the measured runs never use. Sharing the core
    among N devices is the simulator's part."""
    from tools.load_test import speculative_device
    from wisp_edge.agent import EdgeAgent
    from wisp_edge.drafters import load_drafter
    from wisp_edge.settings import EdgeSettings

    settings = EdgeSettings(server=url, drafter=drafter_name, slo_tokens_per_s=1.0, max_wait_s=120)
    agent = EdgeAgent(settings)
    info = agent.connect()
    agent.close()
    results: list = []
    speculative_device(settings, load_drafter(drafter_name, n_threads=1), "wisp", prompts[-2:], 48, rtt_ms,
                       tuple(info["eos_token_ids"]), info["vocab_fingerprint"], results, False)
    stats = [r.stats for r in results]
    draft_ms = sum(s["drafting_ms"] for s in stats) / sum(s["drafted"] for s in stats)
    prefill_tok_s = sum(len(p) + 1 for p in prompts[-2:]) / (sum(s["drafter_prefill_ms"] for s in stats) / 1000)
    rounds = sum(s["rounds"] for s in stats)
    beyond = sum(s["rtt_ms"] - s["verify_ms"] - s["queue_ms"] for s in stats) / rounds - rtt_ms - http_rtt_ms
    return DeviceProfile("validation-edge-core", draft_ms, prefill_tok_s, 0.0, jitter=0.05,
                         source=f"{drafter_name} drafter in the engine, alone on the pinned edge core: {draft_ms:.1f} "
                                f"ms per drafted token (controller included), prefill {prefill_tok_s:.0f} tok/s, "
                                f"{max(0.0, beyond):.1f} ms of client work per round",
                         round_cpu_ms=max(0.0, beyond))


def measure_profile(path: Path, server_cpus: set[int] | None, quick: bool) -> None:
    """`wisp-cloud profile` of the target on the verifier's core, one torch thread: its forward time."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "wisp_cloud.cli", "profile", "--threads", "1", "--no-progress", "--out", str(path)]
    subprocess.run(cmd + (["--quick"] if quick else []), check=True, cwd=ROOT, stdout=sys.stderr,
                   preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if server_cpus else None)


def sim_profile(measured: Path, out: Path) -> Path:
    """The verifier's measured estimator profile plus the simulator's block (the server's defaults)."""
    from tools.sim.server_profile import PROFILES_DIR

    data = json.loads(measured.read_text())
    sim = dict(json.loads((PROFILES_DIR / "cpu-smollm2-135m.json").read_text())["sim"])
    meta = data.get("metadata", {})
    sim.update(noise_sigma=round(max(meta.get("run_noise_pct", 5.0), meta.get("holdout", {}).get("mape_pct", 0.0))
                                 / 100, 4),
               source=f"the validation run's verifier profile ({measured.name}), pinned to one core, 1 torch thread",
               notes=["KV bytes, budget and batch cap: the server's defaults, as cpu-smollm2-135m"])
    data["sim"] = sim
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


def sim_runs(row: dict, args, base: SimConfig) -> tuple[list[float], list[float]]:
    """The simulator at one real run's point (its prompts, device by device), `--seeds` seeds: throughput and
    attainment per seed, computed as the load test computes them."""
    devices = row["devices"]
    asked = [[q["prompt_tokens"] for q in sorted(row["requests_detail"], key=lambda q: q["k"]) if q["device"] == d]
             for d in range(devices)]
    workload = replace(base.workload, replayed_prompts=tuple(tuple(x) for x in asked))
    thr, att = [], []
    for seed in range(args.seeds):
        run = simulate(replace(base, system=SIM_SYSTEM[row["mode"]], devices=devices, seed=seed, workload=workload))
        recs = [r for r in run.records if r.measured]
        span = max(r.t_last or r.arrival for r in recs) - min(r.arrival for r in recs)
        thr.append(sum(r.tokens for r in recs) / span if span > 0 else 0.0)
        att.append(sum(r.met for r in recs) / len(recs))
    return thr, att


def point(system: str, devices: int, real_rows: list[dict], sims: list[tuple[list[float], list[float]]]) -> dict:
    """One (system, devices) point: medians and 95% intervals of the real repeats and of every simulated run."""
    out = {"system": system, "devices": devices, "real_runs": len(real_rows)}
    for side, values in (("real", {"throughput": [r["throughput_tok_s"] for r in real_rows],
                                   "attainment": [r["slo_attainment"] for r in real_rows]}),
                         ("sim", {"throughput": [x for t, _ in sims for x in t],
                                  "attainment": [x for _, a in sims for x in a]})):
        for key, xs in values.items():
            ci = median_ci(xs)
            nd = 2 if key == "throughput" else 3
            out |= {f"{side}_{key}": round(ci.median, nd), f"{side}_{key}_ci_low": round(ci.ci_low, nd),
                    f"{side}_{key}_ci_high": round(ci.ci_high, nd)}
    out["throughput_rel_error"] = round(abs(out["sim_throughput"] - out["real_throughput"]) / out["real_throughput"], 3)
    out["attainment_abs_error"] = round(abs(out["sim_attainment"] - out["real_attainment"]), 3)
    out["real_tokens_per_round"] = round(float(np.median([r["tokens_per_round"] or 0 for r in real_rows])), 2)
    out["real_ttft_p50_ms"] = round(float(np.median([r["ttft_p50_ms"] for r in real_rows])), 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="1,2,4,6,8")
    p.add_argument("--systems", default="wisp,centralized")
    p.add_argument("--rtt", type=float, default=20.0, help="emulated round trip added to every request, ms")
    p.add_argument("--slo", type=float, default=4.0)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--requests", type=int, default=2, help="requests per device, back to back")
    p.add_argument("--seeds", type=int, default=5, help="simulator seeds per real run")
    p.add_argument("--repeats", type=int, default=3, help="real runs per point (each on prompts of its own)")
    p.add_argument("--drafter", default="q4")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--edge-cpus", default="1")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "validation")
    p.add_argument("--sim-only", action="store_true", help="re-run the simulator against <out>/real.json")
    p.add_argument("--quick-profile", action="store_true", help="the verifier's quick profile (a trial run)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.devices.split(",")]
    systems = args.systems.split(",")
    profile = args.out / "verifier-profile.json"
    real_path = args.out / "real.json"

    if not args.sim_only:
        measure_profile(profile, cpus(args.server_cpus), args.quick_profile)  # the server plans with it too
        lt = SimpleNamespace(drafter=args.drafter, slo=args.slo, tokens=args.tokens, requests=args.requests,
                             rtt=args.rtt, server_threads=1, prompts="public", draft_ahead=False,
                             server_cpus=args.server_cpus, edge_cpus=args.edge_cpus, profile=profile,
                             fresh_prompts=True)  # serve_and_run pins this process to the edge cores
        rows, context = [], {}

        def on_ready(server_url: str, prompts: list[list[int]]) -> None:
            import httpx

            from wisp_edge.bench import base_rtt_ms
            with httpx.Client(base_url=server_url) as http:
                context["http_rtt_ms"] = base_rtt_ms(http, n=30)
            context["device"] = asdict(measure_device(server_url, args.drafter, prompts, args.rtt,
                                                      context["http_rtt_ms"]))
            context["prompt_tokens"] = [len(x) for x in prompts]

        for r in serve_and_run(lt, "wisp", systems, counts * args.repeats, on_ready=on_ready):
            rows.append(r)
            print(f"real {r['mode']:>12} {r['devices']:>2} devices: {r['throughput_tok_s']:6.2f} tok/s, "
                  f"attainment {r['slo_attainment']:.2f}", file=sys.stderr, flush=True)
        write_json(real_path, {"args": {k: str(v) for k, v in vars(args).items()}, "prompt_set": PROMPT_SET,
                               **context, "rows": rows})
    real = json.loads(real_path.read_text())
    device = DeviceProfile(**real["device"])
    base = SimConfig(server=str(sim_profile(profile, args.out / "sim-server-profile.json")), network="loopback",
                     rtt_ms=args.rtt + real["http_rtt_ms"], acceptance=args.drafter, device_profile=device,
                     shared_edge_cores=1, draft_ahead=False, warmup_s=0.0, window_s=0.0, max_sim_s=3600.0,
                     requests_per_device=args.requests,
                     workload=Workload(prompt=Lengths(200, 0.0, 16, 4096), output=Lengths(args.tokens, 0.0, 1, 1 << 20),
                                       think_s=0.0, stagger_s=0.0, slo_mix=((args.slo, 1.0),), name=PROMPT_SET))
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in real["rows"]:
        groups.setdefault((r["mode"], r["devices"]), []).append(r)
    table = []
    for (system, devices), rows in groups.items():
        t = point(system, devices, rows, [sim_runs(r, args, base) for r in rows])
        table.append(t)
        print(f"{system:>12} {devices:>2}: throughput real {t['real_throughput']:6.2f} "
              f"[{t['real_throughput_ci_low']:.2f}, {t['real_throughput_ci_high']:.2f}] sim {t['sim_throughput']:6.2f} "
              f"[{t['sim_throughput_ci_low']:.2f}, {t['sim_throughput_ci_high']:.2f}] ({t['throughput_rel_error']:.0%}); "
              f"attainment real {t['real_attainment']:.2f} sim {t['sim_attainment']:.2f}", flush=True)
    write_csv(args.out / "validation.csv", table)
    summary = {"prompt_set": PROMPT_SET, "workload": f"{args.requests} requests per device, {args.tokens} greedy "
                                                     f"tokens, SLO {args.slo:g} tok/s, RTT {args.rtt:g} ms emulated",
               "max_throughput_rel_error": max(t["throughput_rel_error"] for t in table),
               "max_attainment_abs_error": max(t["attainment_abs_error"] for t in table),
               "aims": {"throughput_rel_error": THROUGHPUT_AIM, "attainment_abs_error": ATTAINMENT_AIM},
               "http_rtt_ms": real["http_rtt_ms"], "device": real["device"], "seeds": args.seeds,
               "real_repeats": max(t["real_runs"] for t in table), "rows": table}
    summary["within_aims"] = (summary["max_throughput_rel_error"] <= THROUGHPUT_AIM and
                              summary["max_attainment_abs_error"] <= ATTAINMENT_AIM)
    write_json(args.out / "summary.json", summary)
    plot(table, args.out / "validation.png", args)
    print(f"max throughput error {summary['max_throughput_rel_error']:.1%} (aim {THROUGHPUT_AIM:.0%}), max attainment "
          f"error {summary['max_attainment_abs_error']:.2f} (aim {ATTAINMENT_AIM}); {args.out}")
    return 0


def plot(table: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for system, colour in zip(dict.fromkeys(t["system"] for t in table), ("tab:blue", "tab:orange", "tab:green")):
        rows = [t for t in table if t["system"] == system]
        n = [t["devices"] for t in rows]
        for ax, key in zip(axes, ("throughput", "attainment")):
            mid = np.array([t[f"sim_{key}"] for t in rows])
            err = [mid - [t[f"sim_{key}_ci_low"] for t in rows], [t[f"sim_{key}_ci_high"] for t in rows] - mid]
            ax.errorbar(n, mid, yerr=err, color=colour, capsize=3, label=f"{system}: simulator (median, 95% CI)")
            real = np.array([t[f"real_{key}"] for t in rows])
            rerr = [real - [t[f"real_{key}_ci_low"] for t in rows], [t[f"real_{key}_ci_high"] for t in rows] - real]
            ax.errorbar(n, real, yerr=rerr, fmt="o", color=colour, capsize=3,
                        label=f"{system}: real load test (median of runs, range)")
    axes[0].set(xlabel="devices", ylabel="tokens/s", title="throughput")
    axes[1].set(xlabel="devices", ylabel=f"share of requests at >= {args.slo:g} tok/s", title="SLO attainment",
                ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Simulator vs real system (verifier on core {args.server_cpus}, devices on core {args.edge_cpus}, "
                 f"RTT +{args.rtt:g} ms)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
