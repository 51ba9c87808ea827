"""The real load test's measuring loop, small: two devices per mode against one verifier on loopback.

Each mode must finish every request with the tokens asked for, report a TTFT below the request's
whole time, and (speculative modes) count verify rounds; a round trip of emulated network must
show up in the time to first token.
"""

from __future__ import annotations

import argparse

import pytest

from tools.load_test import run
from wisp_edge.agent import EdgeAgent
from wisp_edge.bench import QUESTIONS
from wisp_edge.settings import EdgeSettings


@pytest.fixture(scope="module")
def setup(verifier):
    agent = EdgeAgent(EdgeSettings(server=verifier.url))
    info = agent.connect()
    prompts = [agent.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    agent.close()
    return info, prompts


@pytest.mark.parametrize("mode", ["wisp", "sled", "centralized"])
def test_every_request_finishes_and_is_measured(verifier, setup, mode):
    info, prompts = setup
    args = argparse.Namespace(drafter="q4", slo=1.0, requests=1, tokens=10, rtt=30.0)
    row = run(verifier.url, mode, 2, args, prompts, info)
    assert row["mode"] == mode and row["devices"] == 2 and row["requests"] == 2
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"] < row["wall_s"] * 1000
    assert row["ttft_p50_ms"] >= 30  # the emulated round trip is paid before the first token
    assert 0 < row["goodput_tok_s"] <= row["throughput_tok_s"]
    if mode == "centralized":
        assert row["tokens_per_round"] is None
    else:
        assert row["tokens_per_round"] >= 1 and row["wasted_ms_per_token"] >= 0
