"""PNG plots of the experiments (matplotlib, Agg backend; small files meant to be committed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"wisp": "#1f77b4", "centralized": "#7f7f7f", "sled": "#d62728", "sled_fixed": "#d62728",
          "sled_confidence": "#ff9896", "wisp_no_predictor": "#2ca02c", "wisp_fcfs": "#9467bd",
          "centralized_wisp": "#bcbd22"}
PAPER_CAPACITY = {"wisp": [164, 142, 103, 86], "centralized": [97, 80, 54, 41], "sled": [83, 42, 27, 21]}
PAPER_SLOS = ("2", "4", "6", "8")  # the classes PAPER_CAPACITY lists, tokens/s


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _errors(table: list | None, key, heights: list, keys: list, prefix: str = "") -> list | None:
    """[[below...], [above...]] for matplotlib's yerr from the table's ci_low / ci_high rows."""
    if not table:
        return None
    by = {key(r): r for r in table}
    lo = [max(0.0, h - by[k][f"{prefix}ci_low"]) if k in by else 0.0 for h, k in zip(heights, keys)]
    hi = [max(0.0, by[k][f"{prefix}ci_high"] - h) if k in by else 0.0 for h, k in zip(heights, keys)]
    return [lo, hi]


def capacity(cap: dict, path: Path, title: str, paper: bool = False, table: list | None = None) -> Path:
    systems = [s for s in cap if s != "sled"]
    slos = list(next(iter(cap.values())))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(slos))]
        heights = [cap[s][k] for k in slos]
        yerr = _errors(table, lambda r: (r["system"], f"{r['slo']:g}"), heights, [(s, k) for k in slos])
        ax.bar(xs, heights, width, label=s, color=COLORS.get(s), yerr=yerr, capsize=2, error_kw={"lw": 0.8})
    if paper:  # the paper's figures at the classes plotted (a run of some classes shows only theirs)
        shown = [(j, PAPER_SLOS.index(f"{float(k):g}")) for j, k in enumerate(slos) if f"{float(k):g}" in PAPER_SLOS]
        for s, marker in (("wisp", "o"), ("centralized", "s"), ("sled", "^")):
            ax.plot([j for j, _ in shown], [PAPER_CAPACITY[s][i] for _, i in shown], marker, color="k",
                    fillstyle="none", linestyle=":", label=f"paper: {s}")
    ax.set_xticks(range(len(slos)), [f"{k} tok/s" for k in slos])
    ax.set_ylabel("capacity (devices, attainment >= 90%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def goodput(good: dict, path: Path, title: str, table: list | None = None) -> Path:
    systems = [s for s in good if s != "sled"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    heights = [good[s] for s in systems]
    yerr = _errors(table, lambda r: r["system"], heights, systems, prefix="goodput_")
    ax.bar(systems, heights, color=[COLORS.get(s) for s in systems], yerr=yerr, capsize=3)
    ax.set_ylabel("goodput (tokens/s meeting SLO)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return _save(fig, path)


def burst(series: list, path: Path, title: str, start_s: float, length_s: float) -> Path:
    mults = sorted({r["multiplier"] for r in series})
    systems = sorted({r["system"] for r in series}, key=lambda s: s != "wisp")
    slos = sorted({r["slo"] for r in series})
    fig, axes = plt.subplots(1, len(mults), figsize=(4 * len(mults), 3.4), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, m in zip(axes[0], mults):
        ax.axvspan(start_s, start_s + length_s, color="0.9")
        for si, system in enumerate(systems):
            for ci, slo in enumerate(slos):
                pts = [(r["t"], r["attainment"]) for r in series if r["multiplier"] == m and r["system"] == system
                       and r["slo"] == slo and r["attainment"] is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle="-" if si == 0 else "--", color=cmap(ci / max(1, len(slos) - 1)),
                            label=f"{system} {slo:g} tok/s")
        ax.set_title(f"burst to {m:g}x base", fontsize=9)
        ax.set_xlabel("request arrival (s)")
    axes[0][0].set_ylabel("SLO attainment")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def rtt(rows: list, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for system in sorted({r["system"] for r in rows}):
        pts = sorted((r["rtt_ms"], r["capacity"]) for r in rows if r["system"] == system)
        ax.plot(*zip(*pts), marker="o", label=system, color=COLORS.get(system))
    ax.set_xscale("log")
    ax.set_xlabel("median RTT (ms)")
    ax.set_ylabel("capacity (devices)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sweep(rows: list, key: str, path: Path, title: str, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for system in sorted({r["system"] for r in rows}):
        pts = sorted((r[key], r["capacity"]) for r in rows if r["system"] == system)
        ax.plot(*zip(*pts), marker="o", label=system, color=COLORS.get(system))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("capacity (devices)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def crossover(rows: list, crossings: list, labels: dict, log_x: dict, path: Path, title: str) -> Path:
    """One panel per axis: WISP's capacity over each baseline's (median, interval bars), the line ratio = 1,
    and each crossover (where a median crosses 1) marked with a dotted line and its x."""
    ratio_rows = [r for r in rows if r["quantity"] == "ratio"]
    axes_names = list(dict.fromkeys(r["axis"] for r in ratio_rows))
    fig, axes = plt.subplots(1, len(axes_names), figsize=(4.2 * len(axes_names), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], axes_names):
        ax.axhline(1.0, color="k", lw=0.8)
        for k, base in enumerate(dict.fromkeys(r["system"] for r in ratio_rows if r["axis"] == name)):
            pts = sorted((r for r in ratio_rows if r["axis"] == name and r["system"] == base
                          and 0 < r["median"] < math.inf), key=lambda r: r["x"])  # a log axis shows neither 0 nor inf
            xs, ys = [r["x"] for r in pts], [r["median"] for r in pts]
            top = [r["ci_high"] if math.isfinite(r["ci_high"]) else 4 * y for y, r in zip(ys, pts)]  # open ends (0, inf)
            # are drawn 4x from the median
            yerr = [[max(0.0, y - max(r["ci_low"], y / 4)) for y, r in zip(ys, pts)],
                    [max(0.0, t - y) for y, t in zip(ys, top)]]
            color = COLORS.get("sled" if base.startswith("sled") else base)
            ax.errorbar(xs, ys, yerr=yerr, marker="o", ms=4, capsize=3, color=color, label=f"WISP / {base}")
            for c in crossings:
                if c["axis"] == name and c["vs"] == base:
                    ax.axvline(c["x"], color=color, ls=":", lw=1)
                    ax.annotate(f"{c['x']:.0f}" if c["x"] >= 10 else f"{c['x']:.3g}", (c["x"], 1.0), textcoords="offset points", xytext=(3, 4 + 10 * k),
                                fontsize=7, color=color)
        if log_x.get(name):
            ax.set_xscale("log")
            ax.minorticks_off()
        xs = sorted({r["x"] for r in ratio_rows if r["axis"] == name})
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(labels.get(name, name), fontsize=8)
        ax.grid(True, which="both", alpha=0.2)
    axes[0][0].set_ylabel("capacity ratio (WISP / baseline)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def hetero(table: list, path: Path, title: str) -> Path:
    """Heterogeneous blocks: each class's SLO attainment against the load (median, interval bars), per system."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for system in sorted({r["system"] for r in table}):
        for quantity, style in (("attainment_8", "-o"), ("attainment_2", "--s")):
            mine = sorted((r for r in table if r["system"] == system and r["quantity"] == quantity),
                          key=lambda r: r["devices"])
            if not mine:
                continue
            xs = [r["devices"] for r in mine]
            ys = [r["median"] for r in mine]
            err = [[y - r["ci_low"] for y, r in zip(ys, mine)], [r["ci_high"] - y for y, r in zip(ys, mine)]]
            ax.errorbar(xs, ys, yerr=err, fmt=style, color=COLORS.get(system), capsize=2, lw=1,
                        label=f"{system}: {quantity.split('_')[1]} tok/s class")
    ax.axhline(0.9, color="k", lw=0.5, ls=":")
    ax.set_xlabel("devices")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)
