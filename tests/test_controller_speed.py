"""The fast controller computes the same numbers as a straightforward float64 reference.

`distribution_stats` on each of its three paths (the package's compiled kernel, built at install when a C
compiler is present; numpy with llama.cpp's SIMD kernels; numpy alone) against softmax statistics computed
the obvious way in
float64, on random logits of several shapes and scales, on edge cases (ties, a gap past the cap, two
logits) and on real drafter logits; and the per-token MLP (standardisation and biases folded into the
weights) and the policy's own feature rows against the batch path `tools/train_predictor.py` evaluates
with, on the shipped weights' held-out traces.
Tolerances: top-1 and margin 1e-6 absolute (float32 rounding of the exponentials), entropy 2e-4
nats (a float32 sum of e * l taken against the maximum logit, ~20 on real rows: measured up to 1e-4),
logit gap 1e-4, logit std 1e-4 relative; the other measured errors are 10x smaller.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import numpy as np
import pytest

import shutil

from wisp_edge.controller.features import (MAX_LOGIT_GAP, DistributionStats, compiled_kernels, distribution_stats,
                                           ggml_softmax, top1_prob)
from wisp_edge.controller.predictor import PREDICTOR_DIR, RejectionPredictor, Scorer

TOL = dict(top1=1e-6, entropy=2e-4, margin=1e-6, gap=1e-4, std_rel=1e-4)


def reference(logits: np.ndarray) -> tuple[float, float, float, float, float]:
    """The five statistics the obvious way, in float64: softmax, -sum p log p, sorted top-2, np.std."""
    x = np.asarray(logits, dtype=np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    entropy = -float(np.sum(p[p > 0] * np.log(p[p > 0])))
    order = np.argsort(x)
    top1, top2 = p[order[-1]], p[order[-2]]
    gap = min(float(x[order[-1]] - x[order[-2]]), MAX_LOGIT_GAP)
    return float(top1), entropy, float(top1 - top2), gap, float(np.std(x))


def assert_close(got, want) -> None:
    top1, entropy, margin, gap, std = got
    assert abs(top1 - want[0]) <= TOL["top1"]
    assert abs(entropy - want[1]) <= TOL["entropy"]
    assert abs(margin - want[2]) <= TOL["margin"]
    assert abs(gap - want[3]) <= TOL["gap"]
    assert abs(std - want[4]) <= TOL["std_rel"] * max(want[4], 1e-3)


def random_rows(rng: np.random.Generator, vocab: int) -> list[np.ndarray]:
    """Flat, typical and peaked rows: normal logits at several scales, shifted far from 0, heavy-tailed."""
    rows = [rng.normal(0, scale, vocab) + shift for scale in (0.1, 1.0, 3.0, 8.0) for shift in (0.0, -40.0, 25.0)]
    rows.append(rng.standard_cauchy(vocab).clip(-60, 60))
    peaked = rng.normal(0, 2.0, vocab)
    peaked[rng.integers(vocab)] += 30.0
    rows.append(peaked)
    return [r.astype(np.float32) for r in rows]


@pytest.fixture(params=["compiled", "ggml", "numpy"])
def stats_of(request):
    """Each of `DistributionStats`'s paths, forced."""
    if request.param == "compiled" and compiled_kernels() is None:
        pytest.skip("the compiled kernels were not built (no C compiler at install)")
    if request.param == "ggml" and ggml_softmax() is None:
        pytest.skip("llama-cpp-python is not installed")
    options = {"compiled": {}, "ggml": dict(use_compiled=False), "numpy": dict(use_compiled=False, use_ggml=False)}
    cache: dict[int, DistributionStats] = {}
    return lambda logits: cache.setdefault(logits.shape[0], DistributionStats(logits.shape[0],
                                                                             **options[request.param]))(logits)


def test_the_compiled_kernels_are_built_where_a_compiler_is():
    """The build is optional, so a broken build would pass silently: where the install had a C compiler
    (every machine that builds llama-cpp-python), the kernels must be there."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the numpy paths are the product's")
    kernels = compiled_kernels()
    assert kernels is not None, "pip install -e . should have built wisp_edge/controller/_kernels.c"
    assert kernels.LANES in ("4", "8")


def test_the_compiled_mlp_scores_like_numpy():
    """The compiled MLP against the numpy one, on random rows through the shipped weights."""
    weights = PREDICTOR_DIR / "q4.npz"
    if compiled_kernels() is None or not weights.exists():
        pytest.skip("no compiled kernels or no shipped predictor")
    predictor = RejectionPredictor.load(weights)
    fast, slow = Scorer(predictor), Scorer(predictor, use_compiled=False)
    rng = np.random.default_rng(3)
    for _ in range(200):
        row = rng.normal(0, 2, 7).astype(np.float32)
        fast.set_row(*row.tolist())
        slow.set_row(*row.tolist())
        assert fast.score() == pytest.approx(slow.score(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("vocab", [2, 7, 1000, 49152])
def test_random_logits_match_the_reference(stats_of, vocab):
    rng = np.random.default_rng(vocab)
    for row in random_rows(rng, vocab):
        before = row.copy()
        assert_close(stats_of(row), reference(row))
        assert np.array_equal(row, before), "the caller's row is not modified"


def test_edge_cases_match_the_reference(stats_of):
    tie = np.array([1.0, 3.0, 3.0, -2.0], np.float32)  # two maxima: gap 0, margin 0
    assert stats_of(tie)[3] == 0.0 and stats_of(tie)[2] == pytest.approx(0.0, abs=1e-7)
    far = np.array([0.0, 80.0, -5.0], np.float32)  # the runner-up 80 below: gap capped, top-1 = 1
    assert stats_of(far)[3] == MAX_LOGIT_GAP and stats_of(far)[0] == pytest.approx(1.0)
    for row in (tie, far, np.zeros(5, np.float32), np.array([0.5, -0.5], np.float32)):
        assert_close(stats_of(row), reference(row))
    for row in (np.linspace(-3, 4, 64), np.linspace(-3, 4, 128, dtype=np.float32)[::2]):  # float64; strided
        assert_close(stats_of(row), reference(row))


def test_top1_prob_and_threads_agree_with_the_reference():
    rows = random_rows(np.random.default_rng(5), 49152)
    for row in rows:
        assert abs(top1_prob(row) - reference(row)[0]) <= TOL["top1"]
    with ThreadPoolExecutor(4) as pool:  # each thread has its own buffers
        got = list(pool.map(distribution_stats, rows * 4))
    for row, stats in zip(rows * 4, got):
        assert_close(stats, reference(row))


@pytest.fixture(scope="module")
def real_rows():
    """Next-token logits of the shipped 4-bit drafter along a short chat answer (skips without it)."""
    from wisp_edge.drafters import MODELS_DIR, load_drafter, resolve_drafter_path

    if not resolve_drafter_path("q4", MODELS_DIR).exists():
        pytest.skip("models/ not built: run `python tools/build_models.py`")
    drafter = load_drafter("q4", n_threads=1)
    drafter.reset(drafter.tokenize("<|im_start|>user\nName three rivers.<|im_end|>\n<|im_start|>assistant\n"))
    rows = []
    for _ in range(12):
        rows.append(drafter.logits())
        drafter.append(int(np.argmax(rows[-1])))
    drafter.close()
    return rows


def test_real_drafter_logits_match_the_reference(stats_of, real_rows):
    for row in real_rows:
        assert_close(stats_of(row), reference(row))


@pytest.mark.parametrize("name", ["q4", "student"])
def test_per_token_mlp_decides_like_the_batch_path_on_heldout_traces(name):
    """Held-out rows of the shipped traces: the folded per-token MLP gives the batch path's probability
    (1e-6) and the same stop decision on every row, so miss rate and recall are unchanged."""
    from tools.bench_controller import heldout

    data, weights = heldout(name), PREDICTOR_DIR / f"{name}.npz"
    if data is None or not weights.exists():
        pytest.skip("models/ not built")
    predictor, x = RejectionPredictor.load(weights), data[0]
    batch = predictor.p_reject_batch(x)
    single = np.array([predictor.p_reject(row) for row in x])
    assert len(x) > 500 and np.abs(single - batch).max() < 1e-6
    assert np.array_equal(single >= predictor.tau, batch >= predictor.tau)


@pytest.mark.parametrize("name", ["q4", "student"])
def test_policy_builds_the_rows_the_batch_path_reads(name):
    """`PredictorPolicy` writes each token's row into its scorer's buffer itself (no `BlockFeatures` row):
    on the held-out traces it stops exactly where the batch path over `BlockFeatures` rows says to."""
    from tools.bench_controller import heldout
    from wisp_edge.controller.predictor import PredictorPolicy

    data, weights = heldout(name), PREDICTOR_DIR / f"{name}.npz"
    if data is None or not weights.exists():
        pytest.skip("models/ not built")
    predictor, x = RejectionPredictor.load(weights), data[0]
    policy = PredictorPolicy(predictor, k_max=8)
    stops = [policy.stop_after_stats(int(row[5]), tuple(float(v) for v in row[:5])) for row in x]
    assert np.array_equal(np.array(stops), predictor.p_reject_batch(x) >= predictor.tau)


@pytest.mark.parametrize("name", ["q4", "student"])
def test_the_fused_compiled_rule_scores_like_the_numpy_rule(name, real_rows):
    """`PredictorPolicy.stop_after` through the one compiled call (`stop_score`) against the same policy forced
    onto numpy: the same feature row (BlockFeatures' order, running log top-1 included), scores within 1e-4
    and the same decisions, on real drafter rows and on random rows, over blocks of 8."""
    from wisp_edge.controller.predictor import PredictorPolicy

    weights = PREDICTOR_DIR / f"{name}.npz"
    if compiled_kernels() is None or not weights.exists():
        pytest.skip("no compiled kernels or no shipped predictor")
    predictor = RejectionPredictor.load(weights)
    fast, slow = PredictorPolicy(predictor, k_max=8), PredictorPolicy(predictor, k_max=8)
    assert fast._scorer.stop_score is not None
    slow._scorer = Scorer(predictor, use_compiled=False)
    rows = list(real_rows) + random_rows(np.random.default_rng(11), 49152)
    for i, row in enumerate(rows * 2):
        index = i % 8
        decision = fast.stop_after(index, row, None)
        fast_row = fast._scorer.x[:-1].copy()
        slow._stats = DistributionStats(row.shape[0], use_compiled=False, use_ggml=False)
        assert decision == slow.stop_after(index, row, None)
        np.testing.assert_allclose(fast_row, slow._scorer.x[:-1], rtol=1e-4, atol=2e-4)
        assert fast._scorer.score() == pytest.approx(slow._scorer.score(), abs=1e-4)
