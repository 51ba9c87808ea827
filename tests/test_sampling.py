"""The sampling semantics are defined once (numpy) and mirrored in torch: they must agree exactly."""

import numpy as np
import pytest
import torch

from wisp_cloud.sampling import probs_from_logits as torch_probs
from wisp_edge.wire.sampling import SamplingParams, probs_from_logits, sample, to_sparse

SETTINGS = [SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(1.3, top_p=0.8),
            SamplingParams(0.5, top_k=20, top_p=0.9), SamplingParams(2.0, top_k=1), SamplingParams(0.9, top_p=0.05)]


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_numpy_and_torch_agree(params):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (16, 300)).astype(np.float32)
    logits[3, :10] = logits[3, 0]  # ties at the top: broken by lower id on both sides
    ours = torch_probs(torch.from_numpy(logits), params).numpy()
    for row, expected in zip(logits, ours):
        got = probs_from_logits(row, params)
        np.testing.assert_array_equal(got > 0, expected > 0)
        np.testing.assert_allclose(got, expected, atol=1e-9)
        assert got.sum() == pytest.approx(1.0)


def test_truncation_semantics_by_hand():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    np.testing.assert_allclose(probs_from_logits(logits, SamplingParams(1.0, top_k=2)), [5 / 7, 2 / 7, 0, 0, 0])
    # top-p 0.7: 0.5 < 0.7 so keep the second; 0.5 + 0.2 >= 0.7 so stop there.
    np.testing.assert_allclose(probs_from_logits(logits, SamplingParams(1.0, top_p=0.7)), [5 / 7, 2 / 7, 0, 0, 0])
    np.testing.assert_allclose(probs_from_logits(logits, SamplingParams(1.0, top_p=0.71)),
                               [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    greedy = probs_from_logits(np.array([1.0, 3.0, 3.0]), SamplingParams())
    np.testing.assert_array_equal(greedy, [0, 1, 0])


def test_sample_follows_probs_and_never_picks_zero():
    probs = np.array([0.0, 0.25, 0.0, 0.75, 0.0])
    rng = np.random.default_rng(1)
    draws = np.array([sample(probs, rng) for _ in range(4000)])
    assert set(np.unique(draws)) == {1, 3}
    assert abs((draws == 3).mean() - 0.75) < 0.03
    assert to_sparse(probs) == ([1, 3], [0.25, 0.75])


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(temperature=float("nan"))])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
