"""The multi-turn benchmark's quick run (tools/bench_multiturn.py --quick) against a real verifier on
loopback: its results file has a row per turn with both variants, the answers are the same with and
without prefix reuse, and from the second turn on reuse prefills fewer drafter tokens."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

MEASURES = {"tokens_per_s", "cloud_rounds", "drafter_prefill_ms", "prefill_tokens", "reused_tokens", "new_tokens"}


def test_quick_multiturn_bench_writes_its_results_and_reuse_prefills_less(tmp_path, profile_path):
    run = subprocess.run([sys.executable, "tools/bench_multiturn.py", "--quick", "--out", str(tmp_path),
                          "--profile", str(profile_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["lossless"] and report["turns"] == 3
    assert (tmp_path / "table.md").read_text().count("\n| q4 |") == 3
    (only,) = report["runs"]
    assert only["drafter"] == "q4" and only["extra_rtt_ms"] == 20 and only["lossless"]
    assert [t["turn"] for t in only["turns"]] == [1, 2, 3]
    for t in only["turns"]:
        assert t["same_output"] and MEASURES <= set(t["reuse"]) and MEASURES <= set(t["no_reuse"])
        assert t["reuse"]["tokens_per_s"] > 0 and t["no_reuse"]["tokens_per_s"] > 0
        assert t["no_reuse"]["reused_tokens"] == 0
        if t["turn"] >= 2:
            assert t["reuse"]["prefill_tokens"] < t["no_reuse"]["prefill_tokens"]
            assert t["reuse"]["reused_tokens"] > 0
