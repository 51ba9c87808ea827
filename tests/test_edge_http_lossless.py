"""Lossless end to end over HTTP: the real verifier on loopback, the real drafters on the edge.

Greedy: each drafter backend (llama.cpp 4-bit copy, onnxruntime student) yields exactly the
target's greedy tokens. Sampling: the first three tokens of many seeded runs of the ONNX student
(the drafter that disagrees with the target most, so rejections and residual resampling happen
often) follow the target's own distribution, computed exactly by enumeration; a chi-square test
compares them. The tiny-vocabulary tests in test_rejection_sampling.py show the same statistic
catches a broken residual rule; this one shows nothing on the wire or in the server bends it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tests.conftest import MODELS
from wisp_cloud.generate import generate
from wisp_cloud.model.transformer import RaggedBatch
from wisp_cloud.tokenizer import load_tokenizer
from wisp_edge.agent import EdgeAgent
from wisp_edge.wire.sampling import SamplingParams, probs_from_logits
from wisp_edge.settings import EdgeSettings

PROMPT = "My favourite colour is"
SAMPLED = SamplingParams(temperature=1.5, top_k=3)
SAMPLED_LENGTH, SAMPLED_RUNS = 3, 200


@pytest.fixture(scope="module")
def prompt_ids():
    return load_tokenizer(MODELS / "target").encode(PROMPT).ids


def _agent(server: str, drafter: str, **settings) -> EdgeAgent:
    """The drafter prefills before the first round, so even the first tokens go through drafting and
    rejection sampling however slow the machine is (with the overlap, they could all be cloud rounds)."""
    agent = EdgeAgent(EdgeSettings(server=server, drafter=drafter, max_wait_s=30, decode_while_prefilling=False,
                                   **settings))
    agent.connect()
    return agent


@pytest.mark.parametrize("drafter", ["q4", "student-onnx"])
def test_greedy_over_http_equals_the_target(verifier, target_model, prompt_ids, drafter):
    agent = _agent(verifier.url, drafter)
    try:
        got = [t.id for t in agent.generate(prompt_ids, max_new_tokens=32)]
        assert agent.last_stats.rounds and sum(r.drafted for r in agent.last_stats.rounds) > 0
    finally:
        agent.close()
    assert got == generate(target_model, prompt_ids, max_new_tokens=32, eos_ids=agent.eos_ids)


def test_greedy_over_a_slow_network_with_drafting_ahead_equals_the_target(verifier, target_model):
    """Over a 40 ms round trip the Q4_1 drafter drafts the next block while each one is verified; the blocks
    kept (its guess of the verifier's token was right) and those rolled back still give the target's tokens."""
    from wisp_edge.bench import delayed_backend

    settings = EdgeSettings(server=verifier.url, drafter="q4", max_wait_s=30, decode_while_prefilling=False,
                            policy="fixed", draft_length=4)
    agent = EdgeAgent(settings, backend=delayed_backend(settings, 40.0))
    try:
        prompt = agent.chat_ids([{"role": "user", "content": "Describe the water cycle in a few sentences."}])
        got = [t.id for t in agent.generate(prompt, max_new_tokens=48)]
        stats = agent.last_stats
    finally:
        agent.close()
    assert got == generate(target_model, prompt, max_new_tokens=48, eos_ids=agent.eos_ids)
    assert stats.ahead_ready > 0, "blocks drafted during verification were sent"


def _exact_distribution(model, prompt: list[int], length: int, params: SamplingParams) -> dict[tuple, float]:
    """P(first `length` new tokens) of the target alone, by enumerating the sampling support."""
    out: dict[tuple, float] = {}

    def walk(prefix: tuple, p: float) -> None:
        if len(prefix) == length:
            out[prefix] = p
            return
        seq = [*prompt, *prefix]
        with torch.inference_mode():
            batch = RaggedBatch.single(seq, model.new_cache(capacity=len(seq)))
            row = model(batch, logit_rows=torch.tensor([len(seq) - 1]))[0].float().numpy()  # [vocab]
        probs = probs_from_logits(row, params)
        for token in np.flatnonzero(probs):
            walk((*prefix, int(token)), p * float(probs[token]))

    walk((), 1.0)
    return out


def test_sampled_output_over_http_follows_the_target(verifier,
                                                    target_model, prompt_ids):
    exact = _exact_distribution(target_model, prompt_ids, SAMPLED_LENGTH, SAMPLED)
    agent = _agent(verifier.url, "student-onnx", policy="fixed", draft_length=3)
    counts = dict.fromkeys(exact, 0)
    rejected = 0
    try:
        for run in range(SAMPLED_RUNS):
            params = SamplingParams(SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p, seed=run)
            seq = tuple(t.id for t in agent.generate(prompt_ids, max_new_tokens=SAMPLED_LENGTH, params=params))
            assert seq in exact, f"run {run} produced {seq}, outside the target's sampling support"
            counts[seq] += 1
            rejected += sum(r.drafted - r.accepted for r in agent.last_stats.rounds)
    finally:
        agent.close()
    assert rejected > SAMPLED_RUNS // 10, "the drafter was rarely rejected: the test would not see a wrong residual"
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * SAMPLED_RUNS >= 5]
    rest = [c for c in cells if c not in big]
    observed = [counts[c] for c in big] + ([sum(counts[c] for c in rest)] if rest else [])
    expected = np.array([exact[c] for c in big] + ([sum(exact[c] for c in rest)] if rest else []))
    assert chisquare(observed, expected * SAMPLED_RUNS / expected.sum()).pvalue > 1e-4
