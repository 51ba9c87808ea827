"""The simulator (tools/sim): tokens are conserved, a seed fixes the run, the policies it drives are the
production classes, replayed traces keep their acceptance, and a small sweep runs end to end."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.sim import experiments as ex  # noqa: E402
from tools.sim.devices import DEVICES  # noqa: E402
from tools.sim.acceptance import ParametricAcceptance, load_traces, make_acceptance  # noqa: E402
from tools.sim.run import simulate  # noqa: E402
from tools.sim.workload import Lengths, Workload  # noqa: E402
from wisp_cloud.estimator import TimeEstimator  # noqa: E402
from wisp_cloud.scheduler import FcfsScheduler  # noqa: E402
from wisp_cloud.wisp_scheduler import WispScheduler  # noqa: E402
from wisp_edge.controller.bounds import DraftBound  # noqa: E402
from wisp_edge.controller.policy import Controller, make_policy  # noqa: E402
from wisp_edge.controller.predictor import (PREDICTOR_DIR, ConfidencePolicy, PredictorPolicy,  # noqa: E402
                                            RejectionPredictor)
from wisp_edge.engine import FixedLength  # noqa: E402

TINY = Workload(prompt=Lengths(64, 0.3, 16, 128), output=Lengths(40, 0.3, 16, 64), think_s=0.5, stagger_s=2.0)
SMALL = replace(ex.SETUPS["ours"], devices=6, workload=TINY, warmup_s=2.0, window_s=8.0, measure_requests=1,
                max_sim_s=300.0)


def _conserved(run) -> None:
    done = [r for r in run.records if r.done]
    assert done, "no request finished"
    for r in done:
        assert r.tokens == r.output_tokens, "each answer reaches its length exactly"
        assert sum(n for _, n in r.token_log) == r.tokens
        if r.round_log:  # speculative: the first token, then accepted drafts + one target token per round
            assert all(0 <= a <= d for d, a in r.round_log)
            assert r.tokens == 1 + sum(a + 1 for _, a in r.round_log)
            assert r.accepted == sum(a for _, a in r.round_log) and r.drafted == sum(d for d, _ in r.round_log)
        times = [t for t, _ in r.token_log]
        assert times == sorted(times) and r.t_first == times[0] and r.t_last == times[-1]


@pytest.mark.parametrize("system", ["wisp", "centralized", "sled_fixed", "sled_confidence", "wisp_fcfs"])
def test_tokens_are_conserved(system):
    run = simulate(replace(SMALL, system=system))
    _conserved(run)
    assert not run.truncated and run.summary["requests"] == SMALL.devices * SMALL.measure_requests


def test_drafting_ahead_conserves_tokens_and_hides_drafting_time():
    """The engine's draft_ahead in simulated time: with acceptance 0.9 most guesses are right, so part of each
    block was drafted during the previous round trip and the device spends less drafting time per token."""
    base = replace(SMALL, system="wisp", acceptance="param:0.9")
    plain, ahead = simulate(base), simulate(replace(base, draft_ahead=True))
    _conserved(ahead)

    def drafting_per_token(run):
        done = [r for r in run.records if r.done]
        return sum(r.drafting_ms for r in done) / sum(r.tokens for r in done)

    assert drafting_per_token(ahead) < 0.8 * drafting_per_token(plain)


def test_tokens_are_conserved_through_evictions_and_resumes():
    """A KV pool of ~650 tokens for 6 sessions of up to ~190 each: sessions are evicted (or preempted) and resumed;
    no token is lost or doubled."""
    run = simulate(replace(SMALL, system="wisp", kv_budget_gb=0.03, admission=False))
    _conserved(run)
    st = run.summary["server"]
    assert st["evicted"] + st["preempted"] > 0 and sum(r.resumes for r in run.records) > 0


def test_same_seed_same_run_other_seed_other_run():
    def fingerprint(run):
        return [(r.device, r.index, r.arrival, r.t_first, r.t_last, tuple(r.round_log)) for r in run.records]

    a, b = simulate(replace(SMALL, system="wisp")), simulate(replace(SMALL, system="wisp"))
    assert fingerprint(a) == fingerprint(b)
    assert json.dumps(a.summary, sort_keys=True) == json.dumps(b.summary, sort_keys=True)
    c = simulate(replace(SMALL, system="wisp", seed=1))
    assert fingerprint(c) != fingerprint(a)


def test_the_policies_are_the_production_classes():
    wisp = simulate(replace(SMALL, system="wisp"), keep_policies=True)
    assert type(wisp.server.scheduler) is WispScheduler
    assert type(wisp.server.estimator) is TimeEstimator and wisp.server.scheduler.estimator is wisp.server.estimator
    shipped = RejectionPredictor.load(PREDICTOR_DIR / "q4.npz")
    assert wisp.policies
    for policy in wisp.policies:
        assert type(policy) is Controller and type(policy.bound) is DraftBound
        assert type(policy.stop_rule) is PredictorPolicy and policy.stop_rule.k_max == 16
        for (w, b), (w0, b0) in zip(policy.stop_rule.predictor.layers, shipped.layers):
            np.testing.assert_array_equal(w, w0)
            np.testing.assert_array_equal(b, b0)
    drafted = [d for r in wisp.records for d, _ in r.round_log]
    assert len(set(drafted)) > 1, "the controller, not a constant, sets the draft lengths"

    sled = simulate(replace(SMALL, system="sled_confidence"), keep_policies=True)
    assert type(sled.server.scheduler) is FcfsScheduler and sled.server.scheduler.max_batch_jobs == 16
    assert all(type(p) is ConfidencePolicy and (p.threshold, p.k_max) == (0.5, 8) for p in sled.policies)
    fixed = simulate(replace(SMALL, system="sled_fixed"), keep_policies=True)
    assert all(type(p) is FixedLength and p.k == 6 for p in fixed.policies)
    for r in fixed.records:  # a fixed policy drafts 6 a round, unless the answer's budget is shorter
        assert all(d == min(6, r.output_tokens - 1) or d < 6 for d, _ in r.round_log)
        assert all(d == 0 for d, _ in r.round_log[:r.cloud_rounds])  # the verifier decoded while it prefilled
        assert all(d == 6 for d, _ in r.round_log[r.cloud_rounds:-2])
    assert any(r.cloud_rounds for r in fixed.records)
    central = simulate(replace(SMALL, system="centralized"))
    assert type(central.server.scheduler) is FcfsScheduler and central.server.scheduler.max_wait_s == 0.0


def test_wisp_policy_matches_what_the_edge_agent_builds():
    """systems.make_edge_policy("wisp") is what make_policy("wisp", drafter) builds when weights match the drafter."""
    from tools.sim.systems import SYSTEMS, make_edge_policy
    from wisp_edge.drafters import resolve_drafter_path

    gguf = resolve_drafter_path("q4")
    if not gguf.exists():
        pytest.skip("the shipped q4 drafter is not built")

    class Stub:
        model_path = gguf

    agent = make_policy("wisp", Stub(), k_max=16)
    sim = make_edge_policy(SYSTEMS["wisp"], RejectionPredictor.load(PREDICTOR_DIR / "q4.npz"))
    assert type(agent) is type(sim) and type(agent.stop_rule) is type(sim.stop_rule)
    assert agent.stop_rule.predictor.tau == sim.stop_rule.predictor.tau and agent.stop_rule.k_max == sim.stop_rule.k_max
    assert agent.bound == sim.bound


def test_trace_replay_keeps_the_logged_acceptance():
    traces = load_traces("q4")
    replay = make_acceptance("q4")
    rng = np.random.default_rng(0)
    paths = [replay.path(rng, 200) for _ in range(20)]
    rate = np.concatenate([p.accepted for p in paths]).mean()
    assert rate == pytest.approx(traces.acceptance_rate(replay.split), abs=0.03)  # the public split if logged
    p = paths[0]
    first_reject = int(np.argmin(p.accepted))
    # past a rejection, the block reads the rows the drafter really produced there (or the next positions)
    assert p.row(0, first_reject, None) == tuple(p.stats[first_reject])
    assert len(p.row(0, first_reject + 1, first_reject)) == 5


def test_parametric_model_hits_its_acceptance():
    model = make_acceptance("param:0.6")
    assert isinstance(model, ParametricAcceptance)
    rng = np.random.default_rng(1)
    rate = np.concatenate([model.path(rng, 300).accepted for _ in range(30)]).mean()
    assert rate == pytest.approx(0.6, abs=0.03)


def test_small_sweep_end_to_end():
    cfg = replace(SMALL, workload=replace(TINY, output=Lengths(32, 0.2, 16, 48)))
    cap, rows = ex.capacity_experiment(cfg, ("wisp", "centralized"), (8.0,), 0.9, tol=0.3, guess=4)
    assert set(cap) == {"wisp", "centralized"} and all(isinstance(v["8"], int) for v in cap.values())
    assert cap["wisp"]["8"] >= 1 and rows
    good, _ = ex.goodput_experiment(replace(cfg, window_s=6.0), 4, ("wisp", "centralized"))
    assert good["wisp"] > 0
    ratios = ex.ratios(cap, good)
    assert "capacity_wisp_over_centralized" in ratios and "goodput_wisp_over_centralized" in ratios
    assert math.isfinite(ratios["goodput_wisp_over_centralized"])


def test_quick_cli_prints_the_json_interface(tmp_path, capsys):
    from tools import simulate as cli

    cli.main(["--quick", "--json", "--systems", "wisp,centralized", "--slos", "8", "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["capacity"]) == {"wisp", "centralized"} and list(out["capacity"]["wisp"]) == ["8"]
    assert all(isinstance(v["8"], int) for v in out["capacity"].values())
    assert set(out["goodput"]) == {"wisp", "centralized"} and out["goodput"]["wisp"] > 0
    assert "capacity_wisp_over_centralized" in out["ratios"]
    assert (tmp_path / "capacity.png").stat().st_size > 0 and (tmp_path / "capacity_runs.csv").exists()


def test_cli_turns_drafting_ahead_on_and_records_it():
    from tools import simulate as cli

    assert cli.base_config(cli.parse(["--setup", "paper"])).draft_ahead is False  # the published sweeps run without it
    cfg = cli.base_config(cli.parse(["--draft-ahead", "--setup", "paper"]))
    assert cfg.draft_ahead is True and cli._describe(cfg)["draft_ahead"] is True


def test_median_interval_is_distribution_free_and_says_its_coverage():
    from tools.sim.stats import median_ci

    five = median_ci([30, 10, 50, 20, 40])
    assert (five.median, five.ci_low, five.ci_high) == (30, 10, 50) and five.coverage == pytest.approx(1 - 2 / 32)
    ten = median_ci(range(10))  # [x_(2), x_(9)]: 97.9%; [x_(3), x_(8)] would fall under 95%
    assert (ten.ci_low, ten.ci_high) == (1, 8) and ten.coverage >= 0.95


def test_seeded_sweep_reports_median_and_interval_rows():
    cfg = replace(SMALL, workload=replace(TINY, output=Lengths(32, 0.2, 16, 48)))
    table: list = []
    cap, _ = ex.capacity_experiment(cfg, ("wisp",), (8.0,), 0.9, tol=0.3, guess=4, seeds=3, table=table)
    (row,) = table
    seeds = [int(x) for x in row["per_seed"].split()]
    assert len(seeds) == 3 and row["ci_low"] == min(seeds) <= cap["wisp"]["8"] == row["median"] <= row["ci_high"]


def test_a_ttft_limit_makes_a_late_first_token_a_miss_whatever_the_rate_after_it():
    from tools.sim.metrics import RequestRecord

    def answered(first_after_s: float, limit: float | None = None) -> RequestRecord:
        rec = RequestRecord(0, "pi5", 0, 8.0, True, 10.0, 64, 17, ttft_limit_s=limit)
        rec.t_first, rec.t_last, rec.tokens = 10.0 + first_after_s, 10.0 + first_after_s + 1.0, 17  # 16 tok/s
        return rec

    assert answered(20.0).met  # the paper's SLO: the rate from the first token on
    assert answered(4.0, limit=5.0).met and not answered(20.0, limit=5.0).met
    cfg = replace(SMALL, max_ttft_s=0.0)  # no first token is instantaneous: nothing meets the SLO
    assert simulate(replace(cfg, system="wisp")).summary["attainment"] == 0.0


def test_heterogeneous_workload_gives_each_class_its_own_prompts():
    wl = ex.HETERO_WORKLOAD
    rng = np.random.default_rng(0)
    docs = [wl.prompt_tokens(0, k, rng, 2.0) for k in range(200)]
    chats = [wl.prompt_tokens(0, k, rng, 8.0) for k in range(200)]
    assert min(docs) >= ex.DOCUMENT_PROMPTS.lo and np.median(docs) > 1000
    assert np.median(chats) < 300
    assert sorted(rate for rate, _ in wl.slo_mix) == [2.0, 8.0]
    assert wl.with_slo(None) is wl


def test_hetero_experiment_reports_capacity_of_the_mix_and_each_class_per_load():
    cfg = replace(SMALL, workload=replace(TINY, output=Lengths(32, 0.2, 16, 48)))
    table, rows = ex.hetero_experiment(cfg, (4,), ("wisp", "wisp_fcfs"), seeds=2, tol=0.3, guess=4)
    got = {(r["system"], r["quantity"], r["devices"]) for r in table}
    for system in ("wisp", "wisp_fcfs"):
        assert (system, "capacity", "") in got
        assert {(system, q, 4) for q in ("goodput", "attainment", "attainment_8", "attainment_2")} <= got
    assert all(r["slo"] == "mix" for r in rows)


def test_a_fixed_closed_loop_on_one_shared_core_is_the_load_tests_system():
    """tools/validate.py's setup: each device sends exactly its requests, prompts replayed in the load test's
    order, and drafting on one shared core takes turns, so four devices draft slower than four cores would."""
    fixed = replace(SMALL, system="sled_fixed", devices=4, requests_per_device=2, warmup_s=0.0, window_s=0.0,
                    draft_ahead=False,
                    workload=replace(TINY, think_s=0.0, stagger_s=0.0, replayed_prompts=((30, 40), (50, 60), (70,))))
    own = simulate(fixed)
    shared = simulate(replace(fixed, shared_edge_cores=1))
    for run in (own, shared):
        _conserved(run)
        assert sorted((r.device, r.index) for r in run.records) == [(d, k) for d in range(4) for k in range(2)]
        assert all(r.measured for r in run.records)
        assert [r.prompt_tokens for r in sorted(run.records, key=lambda r: (r.device, r.index))] == \
            [30, 40, 50, 60, 70, 70, 30, 40]
    per_token = {name: sum(r.drafting_ms for r in run.records) / sum(r.drafted for r in run.records)
                 for name, run in (("own", own), ("shared", shared))}
    assert per_token["own"] == pytest.approx(DEVICES["vm-q4"].draft_ms, rel=0.1), "alone, a token takes its own time"
    assert per_token["shared"] > 1.5 * per_token["own"], "shared, the engine's timer also counts the turns waited"
    span = {name: max(r.t_last for r in run.records) for name, run in (("own", own), ("shared", shared))}
    assert span["shared"] > 1.3 * span["own"], "four devices on one core wait for their turns"


def test_the_validation_simulates_each_real_run_with_its_own_prompts():
    """tools/validate.py: one real run's prompts replayed device by device, a few seeds, then medians and
    errors per point as the summary reports them."""
    from types import SimpleNamespace

    from tools.validate import point, sim_runs

    detail = [{"device": d, "k": k, "prompt_tokens": 40 + 10 * (2 * d + k)} for d in range(2) for k in range(2)]
    row = {"mode": "wisp", "devices": 2, "requests_detail": detail, "throughput_tok_s": 20.0, "slo_attainment": 1.0,
           "tokens_per_round": 2.5, "ttft_p50_ms": 300.0}
    base = replace(ex.SETUPS["ours"], network="loopback", rtt_ms=21.0, shared_edge_cores=1, requests_per_device=2,
                   warmup_s=0.0, window_s=0.0, draft_ahead=False,
                   workload=Workload(prompt=Lengths(64, 0.0, 16, 512), output=Lengths(24, 0.0, 1, 64), think_s=0.0,
                                     stagger_s=0.0, slo_mix=((4.0, 1.0),)))
    thr, att = sim_runs(row, SimpleNamespace(seeds=2), base)
    assert len(thr) == len(att) == 2 and all(t > 0 for t in thr) and all(0.0 <= a <= 1.0 for a in att)
    p = point("wisp", 2, [row, {**row, "throughput_tok_s": 30.0}], [(thr, att), (thr, att)])
    assert p["real_throughput"] == 25.0 and p["real_runs"] == 2
    assert p["throughput_rel_error"] == pytest.approx(abs(p["sim_throughput"] - 25.0) / 25.0, abs=1e-3)


def test_the_simulated_wisp_server_knows_the_ttft_bound_its_runs_are_judged_by():
    from tools.sim.systems import SYSTEMS, make_scheduler

    est = TimeEstimator((5.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    assert make_scheduler(SYSTEMS["wisp"], est, None, 5.0).prefill_wait_s == 1.0  # as `serve --ttft-slo-s 5`
    assert make_scheduler(SYSTEMS["wisp"], est, 0.5, 5.0).prefill_wait_s == 0.5
    assert make_scheduler(SYSTEMS["wisp"], est).prefill_wait_s is None
    assert isinstance(make_scheduler(SYSTEMS["wisp_fcfs"], est, None, 5.0), FcfsScheduler)


def test_update_keeps_the_systems_not_rerun_in_their_places(tmp_path):
    from tools.sim.io import with_earlier_systems, write_csv

    path = write_csv(tmp_path / "capacity.csv", [
        {"system": "wisp", "slo": 4.0, "median": 70}, {"system": "wisp", "slo": 8.0, "median": 27},
        {"system": "centralized", "slo": 4.0, "median": 21}, {"system": "wisp_fcfs", "slo": 4.0, "median": 54}])
    rerun = [{"system": "wisp", "slo": 4.0, "median": 73}, {"system": "wisp_fcfs", "slo": 4.0, "median": 55}]
    merged = with_earlier_systems(path, rerun, ["wisp", "wisp_fcfs"])
    assert [(r["system"], r["median"]) for r in merged] == [("wisp", 73), ("centralized", 21), ("wisp_fcfs", 55)]
    assert isinstance(merged[1]["median"], int) and merged[1]["slo"] == 4.0
    assert with_earlier_systems(tmp_path / "none.csv", rerun, ["wisp"]) == rerun
