"""Where distributed speculation pays: WISP's capacity over centralized serving's and over SLED's, one factor at a
time, and where each ratio crosses 1.

Three axes move away from one base setup (`paper-kv` by default: the A100 profile with its real 5 GB KV pool and
its roofline per-cached-token cost): the context length (median prompt + median answer), the median RTT, and
the drafter's per-token acceptance. At each point every system's capacity at one SLO class comes from
`experiments.capacity_experiment` (the same search, seeds and interval as the capacity table). The ratio is
taken seed by seed, since one seed gives every system the same devices, links and prompts, and its median and
interval come from `stats.median_ci`. A crossover is where a ratio's median crosses 1, interpolated linearly
in log ratio against x on the plot's scale (log x for context and RTT, linear for acceptance).
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from tools.sim.experiments import capacity_experiment, log
from tools.sim.run import SimConfig
from tools.sim.stats import median_ci
from tools.sim.systems import SYSTEMS
from tools.sim.workload import Lengths

AXES = {
    "context": (256, 512, 1024, 2048, 4096, 8192),  # median prompt + median answer, tokens
    "rtt": (10, 20, 40, 80, 160),  # median RTT, ms
    "acceptance": (0.6, 0.75, 0.9),  # parametric pairs with a cached predictor (training another needs torch)
}
LOG_X = {"context": True, "rtt": True, "acceptance": False}
LABELS = {"context": "context: median prompt + median answer (tokens)", "rtt": "median RTT (ms)",
          "acceptance": "drafter acceptance per token"}
SYSTEMS_COMPARED = ("wisp", "centralized", "sled_confidence")  # WISP first; the others are the ratios' baselines
NOTE = ("points: the grid's points measured so far (AXES is the full grid; --points and --values measure fewer). "
        "The full grid at 5 seeds takes about an hour on a 2-core VM, so a run may hold fewer points, never "
        "fewer seeds. Acceptance stops at the parametric pairs with a cached predictor (0.6, 0.75, 0.9). "
        "Ratios are taken seed by seed; a baseline serving no device gives inf, and such points are left "
        "out of the plot and the crossovers.")
DRAFTING_ONLY = {"acceptance"}  # axes that change only what drafters do: a system that does not draft runs once
TOL = 0.08  # capacity search resolution, as the RTT and server-cost experiments use
COLUMNS = ("axis", "x", "slo", "quantity", "system", "median", "ci_low", "ci_high", "ci_coverage", "seeds",
           "per_seed")


def select(axes: str | None = None, points: int | None = None, values: tuple = ()) -> dict[str, tuple]:
    """The axes asked for (comma-separated names, default all), each thinned to `points` evenly spaced points
    (its ends included), or, for one axis, exactly `values` (to split a long sweep into short runs)."""
    names = axes.split(",") if axes else list(AXES)
    unknown = [n for n in names if n not in AXES]
    if unknown:
        raise ValueError(f"unknown axes {unknown}: choose from {list(AXES)}")
    if values:
        if len(names) != 1:
            raise ValueError("values are for one axis: give --axes too")
        return {names[0]: tuple(int(v) if float(v).is_integer() else float(v) for v in values)}
    chosen = {}
    for name in names:
        values = AXES[name]
        if points and points < len(values):
            idx = np.unique(np.round(np.linspace(0, len(values) - 1, max(points, 1))).astype(int))
            values = tuple(values[i] for i in idx)
        chosen[name] = values
    return chosen


def vary(cfg: SimConfig, axis: str, x: float) -> SimConfig:
    """The base setup with one factor moved. Context keeps the setup's answers (log-normal, median m) and sets
    the prompt's median to x - m (spread 0.25, clipped to [16, 1.5 x])."""
    if axis == "context":
        answer = cfg.workload.output.median
        prompt = Lengths(max(16.0, x - answer), 0.25, 16, int(1.5 * x))
        wl = replace(cfg.workload, prompt=prompt, name=f"prompts log-normal (median {x - answer:g}), answers "
                                                       f"log-normal (median {answer:g})")
        return replace(cfg, workload=wl)
    if axis == "rtt":
        return replace(cfg, rtt_ms=float(x))
    if axis == "acceptance":
        return replace(cfg, acceptance=f"param:{x:g}")
    raise ValueError(axis)


def crossover_experiment(cfg: SimConfig, axes: dict[str, tuple], systems=SYSTEMS_COMPARED, slo: float = 8.0,
                         threshold: float = 0.9, tol: float = TOL, guess: int = 64, seeds: int = 5) -> list[dict]:
    """One row per axis, point and system: its capacity (quantity "capacity"), median and interval over `seeds`
    seeds, each seed's in `per_seed`. `with_ratios` adds the ratios."""
    rows: list[dict] = []
    for axis, points in axes.items():
        previous = {s: guess for s in systems}
        fixed: dict[str, list[int]] = {}
        for x in points:
            point = vary(cfg, axis, x)
            found: dict[str, list[int]] = {}
            for system in systems:
                if system in fixed:
                    found[system] = fixed[system]
                    continue
                table: list[dict] = []
                capacity_experiment(point, (system,), (slo,), threshold, tol, previous[system], seeds, table)
                found[system] = [int(v) for v in table[0]["per_seed"].split()]
                previous[system] = max(1, int(np.median(found[system])))
                if axis in DRAFTING_ONLY and SYSTEMS[system].mode != "speculative":
                    fixed[system] = found[system]
            for system in systems:
                rows.append(_row(axis, x, slo, "capacity", system, found[system]))
            log(f"crossover {axis} {x:g}: capacities {found}")
    return rows


def with_ratios(rows: list[dict], systems=SYSTEMS_COMPARED) -> list[dict]:
    """The capacity rows, each point followed by WISP's capacity over each baseline's (quantity "ratio",
    system = the baseline), taken seed by seed: the same seed gives every system the same devices, links and
    prompts. A seed where neither serves a device has no ratio; one where only the baseline serves none gives
    inf."""
    wisp, baselines = systems[0], systems[1:]
    out: list[dict] = []
    capacity = [r for r in rows if r["quantity"] == "capacity"]
    for axis, x in dict.fromkeys((r["axis"], r["x"]) for r in capacity):
        here = {r["system"]: r for r in capacity if r["axis"] == axis and r["x"] == x}
        out += here.values()
        seeds = {s: [int(v) for v in str(r["per_seed"]).split()] for s, r in here.items()}
        for base in baselines:
            ratio = [w / b if b else math.inf for w, b in zip(seeds[wisp], seeds[base]) if w or b]
            if ratio:
                out.append(_row(axis, x, here[wisp]["slo"], "ratio", base, ratio, nd=3))
    return out


def _row(axis: str, x: float, slo: float, quantity: str, system: str, values: list, nd: int = 1) -> dict:
    ci = median_ci(values)
    return {"axis": axis, "x": x, "slo": slo, "quantity": quantity, "system": system, **ci.row(nd),
            "per_seed": " ".join(f"{v:.{nd}f}" if quantity == "ratio" else str(v) for v in values)}


def merge(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier run (`path`) for the points not re-run, and the new rows, by axis and x."""
    if not path.exists():
        return rows
    rerun = {(r["axis"], float(r["x"])) for r in rows}
    with open(path, newline="") as f:
        kept = [_typed(r) for r in csv.DictReader(f)]
    kept = [r for r in kept if (r["axis"], r["x"]) not in rerun]
    order = list(AXES)
    return sorted(kept + rows, key=lambda r: (order.index(r["axis"]), float(r["x"])))


def _typed(row: dict) -> dict:
    out: dict = dict(row)
    x = float(row["x"])
    out["x"] = int(x) if x.is_integer() else x
    for key in ("slo", "median", "ci_low", "ci_high", "ci_coverage"):
        out[key] = float(row[key])
    out["seeds"] = int(row["seeds"])
    return out


def crossovers(rows: list[dict]) -> list[dict]:
    """Every x where a ratio's median crosses 1: between two measured points on either side of 1 (interpolated),
    or at measured points exactly on 1 with the neighbours on either side. Touching 1 without crossing is not
    a crossover. Each comes with the side on which WISP is ahead and the ratios (median, interval) around it."""
    found = []
    ratio_rows = [r for r in rows if r["quantity"] == "ratio"]
    for axis in dict.fromkeys(r["axis"] for r in ratio_rows):
        for base in dict.fromkeys(r["system"] for r in ratio_rows if r["axis"] == axis):
            series = sorted((r for r in ratio_rows if r["axis"] == axis and r["system"] == base
                             and 0 < r["median"] < math.inf), key=lambda r: r["x"])
            off_one = [i for i, r in enumerate(series) if r["median"] != 1.0]
            for i, j in itertools.pairwise(off_one):
                a, b = series[i], series[j]
                if (a["median"] > 1) == (b["median"] > 1):
                    continue
                x = _interpolate(axis, a, b) if j == i + 1 else _middle(axis, series[i + 1]["x"], series[j - 1]["x"])
                found.append({"axis": axis, "vs": base, "x": round(x, 3), "between": [a["x"], b["x"]],
                              "wisp_ahead": "above" if b["median"] > 1 else "below",
                              "ratios_around": [[r["median"], r["ci_low"], r["ci_high"]] for r in (a, b)]})
    return found


def _interpolate(axis: str, a: dict, b: dict) -> float:
    """x where the log ratio, linear between a and b on the plot's x scale, is 0."""
    la, lb = math.log(a["median"]), math.log(b["median"])
    t = -la / (lb - la)
    return _middle(axis, a["x"], b["x"], t)


def _middle(axis: str, xa: float, xb: float, t: float = 0.5) -> float:
    if LOG_X[axis]:
        return math.exp(math.log(xa) + t * (math.log(xb) - math.log(xa)))
    return xa + t * (xb - xa)
