"""The crossover experiment (tools/sim/crossover.py): a tiny run writes its files with finite, positive ratios,
and a crossover is interpolated where a ratio's median crosses 1."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.sim import crossover as cx

TINY_AXES = {"context": (256, 1024), "rtt": (10, 80), "acceptance": (0.6, 0.9)}  # ours' CPU verifier at 8 tok/s
# serves no device at all at the axes' longest contexts, where a ratio has no finite value


def test_tiny_crossover_run_writes_its_files(tmp_path, monkeypatch):
    from tools import simulate as cli

    monkeypatch.setattr(cx, "AXES", TINY_AXES)
    cli.main(["--experiment", "crossover", "--quick", "--setup", "ours", "--points", "2", "--seeds", "1",
              "--tol", "1.0", "--measure-requests", "1", "--out", str(tmp_path)])
    with open(tmp_path / "crossover.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == cx.COLUMNS
    ratios = [r for r in rows if r["quantity"] == "ratio"]
    assert {(r["axis"], r["system"]) for r in ratios} == {(a, s) for a in cx.AXES for s in cx.SYSTEMS_COMPARED[1:]}
    assert all(len({r["x"] for r in ratios if r["axis"] == a}) == 2 for a in cx.AXES)
    for r in ratios:
        for key in ("median", "ci_low", "ci_high"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, r
    assert (tmp_path / "crossover.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())["crossover"]
    assert "--experiment crossover" in next(iter(summary["commands"].values()))
    assert isinstance(summary["crossovers"], list) and summary["ratio_median_ci"]


def _ratio(axis: str, x: float, median: float, low: float, high: float) -> dict:
    return {"axis": axis, "x": x, "quantity": "ratio", "system": "centralized", "median": median,
            "ci_low": low, "ci_high": high}


def test_crossover_is_interpolated_where_the_median_crosses_one():
    rows = [_ratio("rtt", 10, 2.0, 1.5, 2.5), _ratio("rtt", 40, 2.0, 1.5, 2.5), _ratio("rtt", 160, 0.5, 0.4, 0.6),
            _ratio("acceptance", 0.6, 0.5, 0.5, 0.5), _ratio("acceptance", 0.9, 2.0, 2.0, 2.0)]
    (rtt, acc) = cx.crossovers(rows)
    assert rtt["between"] == [40, 160] and rtt["x"] == pytest.approx(80.0)  # log ratio linear in log RTT
    assert rtt["wisp_ahead"] == "below" and rtt["ratios_around"] == [[2.0, 1.5, 2.5], [0.5, 0.4, 0.6]]
    assert acc["x"] == pytest.approx(0.75) and acc["wisp_ahead"] == "above"  # acceptance: linear x


def test_a_point_on_one_is_a_crossover_only_between_opposite_sides():
    through = [_ratio("rtt", 10, 2.0, 2, 2), _ratio("rtt", 40, 1.0, 1, 1), _ratio("rtt", 160, 0.5, 0.5, 0.5)]
    (only,) = cx.crossovers(through)
    assert only["x"] == pytest.approx(40.0) and only["between"] == [10, 160]
    touching = [_ratio("context", 256, 4.0, 3, 5), _ratio("context", 8192, 1.0, 1, 1)]  # both serve one device
    assert cx.crossovers(touching) == []
