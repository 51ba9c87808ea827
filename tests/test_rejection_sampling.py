"""Rejection sampling is lossless: speculative samples follow the target's distribution exactly.

A bigram target and a different bigram drafter on a 5-token vocabulary: the joint distribution of
the first three emitted tokens is known in closed form, and a chi-square test compares it with
many speculative runs. Breaking the residual rule on purpose must make the same test fail.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import wisp_cloud.verification as verification
from wisp_cloud.verification import dense_q, verify_greedy, verify_sampled
from wisp_edge.wire.sampling import SamplingParams, probs_from_logits, sample, to_sparse

VOCAB, START, LENGTH, RUNS = 5, 0, 3, 4000
RNG = np.random.default_rng(42)
TARGET_LOGITS = RNG.normal(0, 1.5, (VOCAB, VOCAB))
DRAFT_LOGITS = TARGET_LOGITS + RNG.normal(0, 1.2, (VOCAB, VOCAB))  # related but different

SETTINGS = [SamplingParams(1.0), SamplingParams(0.7, top_k=3), SamplingParams(1.3, top_p=0.8),
            SamplingParams(0.6, top_k=4, top_p=0.9)]


def exact_distribution(params):
    p = np.stack([probs_from_logits(row, params) for row in TARGET_LOGITS])
    cells = list(itertools.product(range(VOCAB), repeat=LENGTH))
    probs = []
    for seq in cells:
        prev, prob = START, 1.0
        for t in seq:
            prob, prev = prob * p[prev, t], t
        probs.append(prob)
    return cells, np.array(probs)


def speculative_runs(params, k, runs, seed):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(runs):
        out, state = [], START
        while len(out) < LENGTH:
            draft, q_rows, prev = [], [], state
            for _ in range(k):
                q = probs_from_logits(DRAFT_LOGITS[prev], params)
                prev = sample(q, rng)
                draft.append(prev)
                q_rows.append(dense_q(to_sparse(q), VOCAB))
            rows = torch.tensor(TARGET_LOGITS[[state, *draft]])  # row i judges draft[i]
            verdict = verify_sampled(rows, draft, q_rows, params, gen)
            out += [*draft[: verdict.accepted], verdict.token]
            state = out[-1]
        key = tuple(out[:LENGTH])
        counts[key] = counts.get(key, 0) + 1
    return counts


def p_value(params, k, runs=RUNS, seed=0):
    cells, expected = exact_distribution(params)
    counts = speculative_runs(params, k, runs, seed)
    assert set(counts) <= {c for c, e in zip(cells, expected) if e > 0}, "emitted a sequence the target never would"
    observed = np.array([counts.get(c, 0) for c in cells], dtype=float)
    mask = expected > 0
    # Merge cells with small expectation so the chi-square approximation holds.
    small = mask & (expected * runs < 5)
    obs = np.append(observed[mask & ~small], observed[small].sum())
    exp = np.append(expected[mask & ~small], expected[small].sum()) * runs
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_speculative_samples_follow_the_target(params):
    assert p_value(params, k=2) > 1e-4


def test_long_drafts_also_lossless():
    assert p_value(SamplingParams(1.0), k=6, runs=3000, seed=3) > 1e-4


def test_broken_residual_rule_is_detected(monkeypatch):
    # The classic bug: resampling from p instead of norm(max(0, p - q)) after a rejection.
    monkeypatch.setattr(verification, "residual_distribution", lambda p, q: p)
    assert p_value(SamplingParams(1.0), k=2) < 1e-6


def test_accepting_everything_is_detected(monkeypatch):
    monkeypatch.setattr(verification, "residual_distribution", lambda p, q: q / q.sum())
    assert p_value(SamplingParams(1.0), k=2) < 1e-6


def test_greedy_verdicts():
    logits = torch.full((4, 6), -5.0)
    for row, best in enumerate([3, 1, 4, 2]):
        logits[row, best] = 5.0
    assert verify_greedy(logits, [3, 1, 4]) == verification.Verdict(3, 2, True)
    assert verify_greedy(logits, [3, 0, 4]) == verification.Verdict(1, 1, False)
    assert verify_greedy(logits[:1], []) == verification.Verdict(0, 3, True)


def test_draft_outside_its_own_q_is_refused():
    q = dense_q(([1, 2], [0.5, 0.5]), 6)
    with pytest.raises(verification.InvalidDraftError):
        verify_sampled(torch.zeros(2, 6), [4], [q], SamplingParams(1.0), torch.Generator().manual_seed(0))
