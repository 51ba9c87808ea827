"""Sampled speculative decoding over HTTP follows the target's distribution: a chi-square test sized for power.

System: the edge engine with the student drafter run by llama.cpp (the shipped drafter that disagrees with the
target most: about 4 in 5 of its drafts are rejected, so the residual rule carries real weight) against the
verifier served over loopback HTTP from this process; temperature 0.7 and top-p 0.7 on the full 49,152-token
vocabulary, no top-k. A run is one seeded session of 4 new tokens after "The best fruit is": the server samples
the first at prefill; the second and third pass through rejection sampling (one round of 2 drafts, or a second
round of 1 after a rejection).

Statistic: the joint of the first three tokens, bucketed into the cells the target gives at least CELL_MASS
plus one "other" cell; their exact probabilities are computed from the target checkpoint by Hugging Face
transformers (no samples, none of the server's model code). Pearson's chi-square at ALPHA = 1e-3.

N: the smallest number of runs at which that test, with K - 1 degrees of freedom for K cells, has 80% power
against a deviation of Cohen's w = 0.2: under such a deviation the statistic is noncentral chi-square with
lambda = N w^2 (`runs_needed`, scipy). Here K = 7 (6 sequences + other), so N = 642; the test computes N from
K and fails if K drifts from what this docstring states. (The older 200-run HTTP test in
test_edge_http_lossless.py has 80% power only against w >= 0.45.)

Mutations, one at a time, each judged by the same statistic at the same alpha:
- acceptance: the verifier keeps every draft the target could emit (p > 0), ignoring min(1, p/q);
- residual: after a rejection the verifier resamples from p instead of norm(max(0, p - q));
- q's top-p truncation: the drafter samples from its top-p nucleus but reports its softmax before top-p as q
  (its likeliest tokens: the nucleus plus 64 more, to keep the wire light).
Computed from the shipped student's and the target's distributions, they bend the tested joint by w = 3.6,
0.46 and 0.19; the first two run on N/8 and N/2 runs (power > 0.999 even so), the third on 2N (power 0.994;
on N it would be only 0.73). A retrained drafter changes these effects: recompute them when it changes.
A drafter that skipped top-p in both places would still be lossless: rejection sampling is exact for any q
the drafter truly samples from; the bug is a q other than the one sampled.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time

import numpy as np
import pytest
import torch
from scipy.stats import chi2, chisquare, ncx2

import wisp_cloud.verification as verification
import wisp_edge.drafting as drafting
from tests.hf_target import hf_target, next_logits
from tests.inprocess_server import InProcessServer
from tests.results import record
from wisp_edge.agent import EdgeAgent
from wisp_edge.settings import EdgeSettings
from wisp_edge.wire.sampling import SamplingParams, probs_from_logits, sample, to_sparse

PROMPT = "The best fruit is"  # a raw continuation: a few fruits, each with a few likely next words
PARAMS = SamplingParams(temperature=0.7, top_p=0.7)
NEW_TOKENS, JOINT = 4, 3  # tokens per run; the leading ones whose joint distribution is tested
CELL_MASS = 0.015  # a sequence with at least this target probability is a cell of its own
ALPHA, POWER, EFFECT = 1e-3, 0.8, 0.2
EXPECTED_CELLS = 7  # K for PROMPT and PARAMS, as the docstring states
WORKERS = 16  # agents (each its own drafter) drawing samples at once, so the verifier batches their rounds
UNTRUNCATED_TOP_K = 64  # the broken q of the top-p mutant: the softmax before top-p, cut to a wire-friendly size


def runs_needed(cells: int, effect: float = EFFECT, alpha: float = ALPHA, power: float = POWER) -> int:
    """Smallest N with P(chi-square test rejects) >= power when the truth is `effect` (Cohen's w) away."""
    df = cells - 1
    critical = chi2.ppf(1 - alpha, df)
    n = 1
    while ncx2.sf(critical, df, n * effect * effect) < power:
        n += 1
    return n


def exact_cells(model, prompt: list[int]) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The target's sequences of JOINT tokens with probability >= CELL_MASS, and their exact probabilities
    (only prefixes at least that likely need a forward)."""
    level: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    for _ in range(JOINT):
        logits = next_logits(model, [prompt + list(prefix) for prefix, _ in level]).numpy()  # [prefixes, vocab]
        nxt = []
        for (prefix, mass), row in zip(level, logits):
            probs = probs_from_logits(row, PARAMS) * mass
            nxt += [((*prefix, int(t)), float(probs[t])) for t in np.flatnonzero(probs >= CELL_MASS)]
        level = nxt
    level.sort(key=lambda cell: -cell[1])
    return [c for c, _ in level], np.array([p for _, p in level])


@pytest.fixture(scope="module")
def server(profile_path):
    with InProcessServer(profile=profile_path, rate_limit_rps=0) as live:
        yield live


@pytest.fixture(scope="module")
def agents(server):
    made = []
    try:
        for _ in range(WORKERS):
            agent = EdgeAgent(EdgeSettings(server=server.url, drafter="student", max_wait_s=60, policy="fixed",
                                           draft_length=2, decode_while_prefilling=False))
            agent.connect()
            made.append(agent)
        yield made
    finally:
        for agent in made:
            agent.close()


@pytest.fixture(scope="module")
def prompt(agents):
    return agents[0].tokenize(PROMPT)


@pytest.fixture(scope="module")
def target(prompt):
    """(cells, their exact probabilities, N) for the prompt."""
    _, model = hf_target()
    cells, probs = exact_cells(model, prompt)
    return cells, probs, runs_needed(len(cells) + 1)


def draw(agents, prompt: list[int], seeds: range) -> tuple[list[tuple[int, ...]], int, int]:
    """The first JOINT tokens of one seeded run per seed, with the drafts sent and rejected in all."""
    results: list = []
    drafted = rejected = 0
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(agent: EdgeAgent, part: range) -> None:
        nonlocal drafted, rejected
        try:
            for seed in part:
                params = SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=seed)
                # Stop reading after JOINT tokens: the engine then closes the session without another round.
                answer = agent.generate(prompt, max_new_tokens=NEW_TOKENS, params=params)
                tokens = tuple(t.id for t in itertools.islice(answer, JOINT))
                answer.close()
                rounds = agent.last_stats.rounds
                with lock:
                    results.append(tokens)
                    drafted += sum(r.drafted for r in rounds)
                    rejected += sum(r.drafted - r.accepted for r in rounds)
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(a, seeds[i::len(agents)])) for i, a in enumerate(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, drafted, rejected


def p_value(samples: list[tuple[int, ...]], cells: list[tuple[int, ...]], probs: np.ndarray) -> float:
    index = {c: i for i, c in enumerate(cells)}
    observed = np.zeros(len(cells) + 1)
    for s in samples:
        observed[index.get(s, len(cells))] += 1
    expected = np.append(probs, 1.0 - probs.sum()) * len(samples)
    return float(chisquare(observed, expected).pvalue)


def test_sample_size_gives_the_stated_power(target):
    cells, probs, n = target
    assert len(cells) + 1 == EXPECTED_CELLS, f"{len(cells) + 1} cells now: update EXPECTED_CELLS and the docstring"
    assert min(probs) * n >= 5 and (1 - probs.sum()) * n >= 5, "a cell expects fewer than 5 runs"


def test_sampled_output_over_http_follows_the_target(agents, prompt, target):
    cells, probs, n = target
    t0 = time.perf_counter()
    samples, drafted, rejected = draw(agents, prompt, range(n))
    p = p_value(samples, cells, probs)
    print(f"N={n} runs, {len(cells) + 1} cells, {drafted} drafts, {rejected / drafted:.0%} rejected, "
          f"chi-square p={p:.3g}, {time.perf_counter() - t0:.1f} s")
    record("sampling_null", {"prompt": PROMPT, "params": str(PARAMS), "cells": len(cells) + 1, "runs": n,
                             "alpha": ALPHA, "power": POWER, "effect_w": EFFECT, "drafts": drafted,
                             "rejected": rejected, "p_value": p, "seconds": time.perf_counter() - t0})
    assert rejected > drafted // 5, "the drafter was rarely rejected: a wrong residual would hardly show"
    assert p > ALPHA


def _always_accept(logits, draft, q_rows, params, generator):
    """verify_sampled with the min(1, p/q) test dropped: a draft the target could emit (p > 0) is kept."""
    p_rows = verification.probs_from_logits(logits, params)
    for i, token in enumerate(draft):
        if p_rows[i][token] > 0:
            continue
        recovered = torch.multinomial(verification.residual_distribution(p_rows[i], q_rows[i]).float(), 1,
                                      generator=generator)
        return verification.Verdict(i, int(recovered), False)
    bonus = torch.multinomial(p_rows[-1].float(), 1, generator=generator)
    return verification.Verdict(len(draft), int(bonus), True)


def _patch_acceptance(monkeypatch):
    """Every module that imported verify_sampled gets the broken one."""
    original = verification.verify_sampled
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("wisp_cloud") and \
                getattr(module, "verify_sampled", None) is original:
            monkeypatch.setattr(module, "verify_sampled", _always_accept)


def _patch_residual(monkeypatch):
    monkeypatch.setattr(verification, "residual_distribution", lambda p, q: p)


def _patch_q_top_p(monkeypatch):
    def next_token(self, index):
        t0 = time.perf_counter()
        logits = self.drafter.logits()
        nucleus = probs_from_logits(logits, self.params)
        token = sample(nucleus, self.rng)
        self.drafter.append(token)
        # before top-p, cut to its likeliest tokens so that 49,152 probabilities a draft do not slow the test;
        # the cut keeps the whole nucleus (it can hold more than 64 tokens), so the sampled token is always in q
        keep = UNTRUNCATED_TOP_K + int(np.count_nonzero(nucleus))
        untruncated = probs_from_logits(logits, SamplingParams(self.params.temperature, keep))
        stop = token in self.eos_ids or (index is not None and self.policy.stop_after(index, logits, nucleus))
        return token, to_sparse(untruncated), (time.perf_counter() - t0) * 1000, stop

    monkeypatch.setattr(drafting.Drafting, "next", next_token)


# (mutation, runs as a multiple of N): power >= 0.99 against each mutation's deviation (see the module doc).
MUTANTS = [(_patch_acceptance, 1 / 8), (_patch_residual, 1 / 2), (_patch_q_top_p, 2)]


@pytest.mark.parametrize("mutate, scale", MUTANTS, ids=["acceptance", "residual", "q-top-p"])
def test_each_broken_rule_is_detected(agents, prompt, target, monkeypatch, mutate, scale):
    cells, probs, n = target
    mutate(monkeypatch)
    samples, _, _ = draw(agents, prompt, range(10**6, 10**6 + int(n * scale)))
    p = p_value(samples, cells, probs)
    print(f"{mutate.__name__}: {len(samples)} runs, chi-square p={p:.3g}")
    record(f"sampling_mutant{mutate.__name__.removeprefix('_patch')}", {"runs": len(samples), "p_value": p,
                                                                       "alpha": ALPHA})
    assert p < ALPHA
