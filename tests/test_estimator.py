"""The verification time estimator on synthetic profiles with known coefficients: pure numpy/scipy, seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wisp_cloud.estimator import (
    FEATURE_NAMES,
    FORMAT,
    Margin,
    TimeEstimator,
    VerifyCost,
    batch_features,
    make_metadata,
    split,
)
from wisp_cloud.attention_rows import LayoutTally, padded_layout
from wisp_cloud.scheduler import VerifyJob

TRUE = (4.0, 0.03, 1e-5, 3e-4, 0.05, 0.4, 2e-7, 2e-4, 0.3)  # ms: launch, per new token, per new token x length,
# per cached token, per row of logits, per request, per padded score, per gathered key, per small-batch token


def random_batch(rng: np.random.Generator) -> list[VerifyCost]:
    """A mix of warm blocks (few new tokens, long cache) and cold prompts (many new tokens, little cache)."""
    if rng.random() < 0.15:  # one or two decode steps: batches below the small-batch term's 8 tokens
        return [VerifyCost(1, int(rng.integers(50, 4000))) for _ in range(int(rng.integers(1, 3)))]
    batch = []
    for _ in range(int(rng.integers(1, 33))):
        if rng.random() < 0.8:
            batch.append(VerifyCost(int(rng.integers(1, 10)), int(rng.integers(50, 4000))))
        else:
            batch.append(VerifyCost(int(rng.integers(32, 2048)), int(rng.integers(0, 256)), 1))  # a prefill
    return batch


def synthetic(n: int, coefficients=TRUE, noise=0.02, seed=0) -> list[tuple[list[VerifyCost], float]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        batch = random_batch(rng)
        clean = float(np.dot(coefficients, batch_features(batch)))
        samples.append((batch, clean * (1 + noise * rng.standard_normal())))
    return samples


def test_verify_cost_derives_length_and_rows_and_rejects_nonsense():
    assert VerifyCost(5, 100).total_len == 105
    assert VerifyCost(5, 100).rows == 5 and VerifyCost(50, 0, 1).rows == 1 and VerifyCost(50, 0, 0).rows == 0
    with pytest.raises(ValueError):
        VerifyCost(-1, 0)
    with pytest.raises(ValueError):
        VerifyCost(3, 0, 4)  # more rows of logits than tokens run


def test_features_by_hand():
    batch = [VerifyCost(2, 10), VerifyCost(100, 0, 1)]
    # layout: chunk 100 (rows * (chunk + 16) = 232, less than 240 at 64 or 32), one row each, 100 keys
    assert batch_features(batch) == (1.0, 102.0, 2 * 12 + 100 * 100, 10.0, 3.0, 2.0, 2 * 100 * 100, 2 * 100, 8.0)
    assert padded_layout([3, 1000], [500, 24]) == (9, 128, 1024)  # 1 + 8 rows of 128: 1,296 against 1,360 at 256


def test_the_estimator_prices_the_layout_the_forward_builds():
    """`attention_rows.padded_layout` against `paged_attention.plan` on random ragged batches: same rows,
    same chunk, and the plan's keys are the layout's rounded up to whole KV blocks."""
    import torch

    from wisp_cloud.model.paged_attention import plan

    rng = np.random.default_rng(7)
    for _ in range(40):
        news = [int(rng.choice([1, 4, 9, 40, 300])) for _ in range(int(rng.integers(1, 12)))]
        cached = [int(rng.integers(0, 700)) for _ in news]
        tables = [list(range(-(-(c + n) // 16))) for c, n in zip(cached, news)]
        layout = plan(cached, news, tables, 16, 1, torch.float32, torch.device("cpu"))
        rows, chunk, keys = padded_layout(news, cached)
        assert (rows, chunk) == (layout.block_table.shape[0], layout.chunk)
        assert layout.mask.shape[-1] == -(-keys // 16) * 16


def test_predict_is_the_model():
    est = TimeEstimator(TRUE)
    batch = [VerifyCost(3, 500), VerifyCost(1000, 24, 1)]
    own = 4.0 + 0.03 * 1003 + 1e-5 * (3 * 503 + 1000 * 1024) + 3e-4 * 524 + 0.05 * 4 + 0.4 * 2
    layout = 2e-7 * 9 * 128 * 1024 + 2e-4 * 9 * 1024 + 0.3 * 8  # 9 rows of 128 queries over 1,024 keys
    assert est.predict(batch) == pytest.approx(own + layout)
    # the intercept, each member's own cost, and the batch's layout terms
    assert est.predict(batch) == pytest.approx(est.c0 + sum(est.request_cost_ms(r) for r in batch) + layout)
    assert est.predict_one(batch[0]) == pytest.approx(est.predict([batch[0]]))
    assert est.predict([]) == 0.0


def test_one_more_draft_token_costs_its_token_row_and_attention_terms_by_hand():
    est = TimeEstimator(TRUE)
    # a 4-token block over 500 cached: the fifth token adds c1, c4 and c2 * ((5 * 505) - (4 * 504))
    assert est.marginal_token_ms(VerifyCost(4, 500)) == pytest.approx(0.03 + 0.05 + 1e-5 * (5 * 505 - 4 * 504))
    assert est.marginal_token_ms(VerifyCost(4, 4000)) > est.marginal_token_ms(VerifyCost(4, 500))


def test_a_batch_priced_member_by_member_costs_what_it_costs_whole():
    """What an incremental batch builder adds up (the intercept, each member's own cost, the layout kept in a
    `LayoutTally`) equals the prediction for the whole batch, whatever the order."""
    est = TimeEstimator(TRUE)
    rng = np.random.default_rng(3)
    for _ in range(200):
        batch = random_batch(rng)
        tally, own = LayoutTally(), est.c0
        for r in batch:
            own += est.request_cost_ms(r)
            tally.add(r.new_tokens, r.total_len)
        assert est.predict_raw(batch) == pytest.approx(own + est.layout_ms(*tally.layout(),
                                                                           sum(r.new_tokens for r in batch)))


def test_fit_recovers_coefficients_and_holds_out_well():
    samples = synthetic(200)
    est = TimeEstimator(metadata=make_metadata("synthetic", "cpu", "float32"))
    report = est.fit_holdout(samples, holdout_fraction=0.3, seed=1)
    assert report.n == 60
    assert report.r2 > 0.99
    assert report.mape_pct < 5.0
    mean_ms = np.mean([ms for _, ms in samples])
    assert report.mae_ms < 0.03 * mean_ms  # noise is 2% of each time
    for got, want, name in zip(est.coefficients, TRUE, FEATURE_NAMES):
        if name == "per_padded_score_ms":
            continue  # with a prompt in the batch, its rows x chunk x keys is nearly its n x L: 2% noise decides
        # rows of logits and requests are partly collinear (a warm request's rows come with the request)
        loose = ("per_logit_row_ms", "per_request_ms", "per_gathered_key_ms", "per_small_batch_token_ms")
        assert got == pytest.approx(want, rel=0.25 if name in loose else 0.1), name
    assert est.metadata["holdout"]["r2"] == report.r2 and est.metadata["fit"]["n"] == 140


@pytest.mark.parametrize("relative", [True, False])
def test_fit_is_exact_without_noise(relative):
    est = TimeEstimator(relative=relative)
    report = est.fit(synthetic(50, noise=0.0))
    assert report.r2 == pytest.approx(1.0) and report.mape_pct < 1e-6
    np.testing.assert_allclose(est.coefficients, TRUE, rtol=1e-6)


def test_relative_fit_beats_absolute_under_proportional_noise():
    # Noise proportional to the time: absolute residuals let the big prefills drown the intercept.
    errors = {True: [], False: []}
    for seed in range(4):
        fit_part, holdout = split(synthetic(200, noise=0.03, seed=seed), 0.3, seed=0)
        for relative in errors:
            est = TimeEstimator(relative=relative)
            est.fit(fit_part)
            errors[relative].append(est.evaluate(holdout).mape_pct)
    assert np.mean(errors[True]) < np.mean(errors[False])


def test_coefficients_stay_non_negative_when_data_pulls_one_negative():
    # Times that fall with the cached prefix: unconstrained least squares would price cached tokens below zero.
    pulling = (6.0, 0.03, 2e-6, -4e-4, 0.01, 0.2, 0.0, 0.0, 0.0)
    samples = [(b, max(ms, 0.5)) for b, ms in synthetic(120, coefficients=pulling, noise=0.01, seed=3)]
    X = np.array([batch_features(b) for b, _ in samples])
    y = np.array([ms for _, ms in samples])
    unconstrained = np.linalg.lstsq(X, y, rcond=None)[0]
    assert unconstrained[3] < 0  # the test means something: the data does push c3 negative
    est = TimeEstimator()
    est.fit(samples)
    assert all(c >= 0 for c in est.coefficients)
    assert est.c3 == 0.0  # clamped at the bound, not merely small
    assert all(est.predict(b) > 0 for b, _ in samples)


def test_margin_scales_and_adds_but_accuracy_ignores_it():
    samples = synthetic(60, noise=0.0)
    est = TimeEstimator(TRUE)
    batch = samples[0][0]
    raw = est.predict_raw(batch)
    version = est.version
    est.margin = Margin(scale=1.1, extra_ms=2.0)
    assert est.version > version  # cached costs elsewhere must be redone
    assert est.predict(batch) == pytest.approx(raw * 1.1 + 2.0)
    assert est.predict_one(batch[0]) == pytest.approx(est.predict_raw([batch[0]]) * 1.1 + 2.0)
    assert est.evaluate(samples).mape_pct < 1e-9  # the margin is a deliberate bias, not a fit error
    with pytest.raises(ValueError):
        Margin(scale=0.0)
    with pytest.raises(ValueError):
        Margin(extra_ms=-1.0)


def test_split_is_seeded_disjoint_and_complete():
    samples = synthetic(20)
    fit_a, hold_a = split(samples, 0.25, seed=7)
    fit_b, hold_b = split(samples, 0.25, seed=7)
    assert [id(s) for s in hold_a] == [id(s) for s in hold_b]
    assert len(hold_a) == 5 and len(fit_a) == 15
    assert {id(s) for s in fit_a} | {id(s) for s in hold_a} == {id(s) for s in samples}
    assert not {id(s) for s in fit_a} & {id(s) for s in hold_a}
    assert len(split(samples[:2], 0.01)[1]) == 1  # a holdout asked for is never empty
    assert split(samples, 0.0)[1] == []
    with pytest.raises(ValueError):
        split(samples, 1.0)


def test_too_few_samples_refuse_to_fit():
    with pytest.raises(ValueError):
        TimeEstimator().fit(synthetic(3))


def test_save_load_round_trip(tmp_path):
    est = TimeEstimator(margin=Margin(1.05, 0.5), metadata=make_metadata("SmolLM2-135M", "cpu", "float32"))
    est.fit_holdout(synthetic(80), 0.25)
    path = tmp_path / "profile.json"
    est.save(path)
    loaded = TimeEstimator.load(path)
    assert loaded.coefficients == est.coefficients
    assert loaded.margin == est.margin
    assert loaded.metadata == est.metadata
    assert loaded.metadata["model"] == "SmolLM2-135M" and loaded.metadata["dtype"] == "float32"
    assert set(loaded.metadata["holdout"]) == {"n", "r2", "mae_ms", "mape_pct"}
    assert len(loaded.profile) == len(est.profile) and loaded.profile[0] == (est.profile[0][0], est.profile[0][1])
    batch = synthetic(1, seed=9)[0][0]
    assert loaded.predict(batch) == est.predict(batch)
    path.write_text(path.read_text().replace(FORMAT, "something-else"))
    with pytest.raises(ValueError):
        TimeEstimator.load(path)


def test_a_profile_of_the_older_format_loads_without_logit_rows(tmp_path):
    """Profiles written before the logit-row term (four coefficients, [n, C] requests) still load, with
    per_logit_row_ms = 0 and every request's rows = n, so they predict what they always did; `read_format`
    tells the server to re-measure its default profile."""
    old = {"format": "wisp-estimator/1", "margin": {"scale": 1.0, "extra_ms": 0.0}, "metadata": {},
           "window": 10, "refit_every": 5, "min_refit_samples": 4, "relative": True,
           "coefficients": dict(zip(FEATURE_NAMES[:4], TRUE[:4])), "profile": [[[[3, 40], [9, 0]], 12.5]]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    est = TimeEstimator.load(path)
    assert est.coefficients == (*TRUE[:4], *(0.0,) * (len(FEATURE_NAMES) - 4))
    assert est.read_format == "wisp-estimator/1"
    assert est.profile[0][0] == [VerifyCost(3, 40), VerifyCost(9, 0)]
    assert est.predict([VerifyCost(3, 40)]) == pytest.approx(4.0 + 0.03 * 3 + 1e-5 * 3 * 43 + 3e-4 * 40)
    est.save(path)
    assert TimeEstimator.load(path).read_format == FORMAT  # saved again: the current format


def test_each_job_kind_reads_its_own_logit_rows():
    """A verify block or a decode step reads every row, a prefill its last, a resume none: the estimator
    prices a verify token above a prompt token by the output projection."""
    def job(kind, n):
        return VerifyJob(job_id=kind, session_id="s", new_tokens=n, cached_tokens=7, draft_len=0, arrival=0.0,
                         kind=kind)

    assert [job(k, 6).cost.rows for k in ("verify", "decode", "prefill", "resume")] == [6, 6, 1, 0]
    est = TimeEstimator(TRUE)
    assert est.request_cost_ms(job("verify", 6).cost) - est.request_cost_ms(job("prefill", 6).cost) == \
        pytest.approx(5 * TRUE[4])


def test_online_refit_tracks_drift_in_a_bounded_window():
    profile = synthetic(40, seed=0)
    est = TimeEstimator(window=300, refit_every=50)
    est.fit(profile)
    slower = tuple(c * 1.5 for c in TRUE)  # the accelerator got slower (thermal throttling, a neighbour)
    live = synthetic(400, coefficients=slower, seed=5)
    before = est.evaluate(live[-100:]).mape_pct
    refits = [est.observe(batch, ms) for batch, ms in live[:300]]
    assert sum(refits) == 6 and refits[49] and not refits[48]
    assert len(est.recent) == 300
    for batch, ms in live[300:]:
        est.observe(batch, ms)
    assert len(est.recent) == 300  # bounded
    after = est.evaluate(live[-100:]).mape_pct
    assert after < before / 3
    assert "online" in est.metadata


def test_observe_ignores_useless_measurements():
    est = TimeEstimator(TRUE, refit_every=1)
    assert not est.observe([], 5.0)
    assert not est.observe([VerifyCost(1, 1)], float("nan"))
    assert not est.observe([VerifyCost(1, 1)], 0.0)
    assert len(est.recent) == 0


def test_policies_import_without_torch():
    """Policy is pure: the simulator and a torch-free install can load the estimator and the scheduler."""
    import subprocess
    import sys

    code = "import sys, wisp_cloud.estimator, wisp_cloud.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backlog_is_each_jobs_marginal_cost_plus_one_intercept_per_batch():
    est = TimeEstimator((50.0, 2.0, 0.0, 0.1, 0.0))
    assert est.backlog_ms([], 100) == 0.0
    jobs = [VerifyCost(60, 100), VerifyCost(60, 0)]  # 120 tokens: two batches of at most 100
    raw = (2.0 * 60 + 0.1 * 100) + 2.0 * 60 + 2 * 50.0
    assert est.backlog_ms(jobs, 100) == pytest.approx(est.with_margin(raw))
    assert est.backlog_ms(jobs, 200) == pytest.approx(est.with_margin(raw - 50.0))
