"""The round plan alone, on numbers: draft budgets, cloud rounds while the drafter prefills, keeping or rolling
back a block drafted ahead, and no token drafted ahead that would end after the answer is expected."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from wisp_edge.round_plan import Round, RoundPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.sim.edge import ahead_started  # noqa: E402


def test_the_budget_is_the_policy_bound_cut_to_the_tokens_left():
    plan = RoundPlan(max_new_tokens=10)
    assert plan.next_round(1, 4) == Round(1, 4, False, 0, 5)
    assert plan.next_round(6, 4).budget == 3  # 4 left: 3 drafts + the target's token
    assert plan.next_round(9, 4).budget == 0  # one token left: the target's alone
    assert [plan.next_round(1, 4).number for _ in range(2)] == [4, 5]


def test_the_budget_never_exceeds_the_longest_block_the_server_takes():
    """SessionStarted.max_draft: a fixed -k above it would otherwise be refused (422) every round."""
    plan = RoundPlan(max_new_tokens=100, server_max_draft=32)
    rnd = plan.next_round(1, 40)
    assert rnd.budget == 32 and rnd.ahead_limit == 33
    assert RoundPlan(max_new_tokens=100).next_round(1, 40).budget == 40  # no bound announced: the policy's


@pytest.mark.parametrize("seed", range(5))
def test_rounds_never_overshoot_the_answer(seed):
    rng = np.random.default_rng(seed)
    plan, new_tokens = RoundPlan(max_new_tokens=int(rng.integers(2, 40))), 1
    while not plan.finished(new_tokens):
        rnd = plan.next_round(new_tokens, int(rng.integers(0, 9)) if rng.random() < 0.8 else None)
        drafted = int(rng.integers(0, rnd.budget + 1))  # a stop rule may end the block early
        new_tokens += int(rng.integers(0, drafted + 1)) + 1
    assert new_tokens == plan.max_new_tokens


def test_a_cloud_round_while_the_drafter_prefills_drafts_nothing():
    plan = RoundPlan(max_new_tokens=10)
    rnd = plan.next_round(1, None, ahead=3)
    assert rnd.cloud and rnd.budget == 0 and rnd.reuse == 0 and rnd.number == 1
    assert not plan.drafts_ahead(1, rnd, 0), "the prefilling drafter is not free to draft ahead"
    assert not plan.next_round(2, 4).cloud


def test_a_block_drafted_ahead_is_cut_to_the_next_budget():
    plan = RoundPlan(max_new_tokens=20)
    assert plan.next_round(1, 4, ahead=6).reuse == 4
    assert plan.next_round(1, 4, ahead=2).reuse == 2
    assert plan.next_round(18, 4, ahead=3).reuse == 1  # two tokens left: one draft
    assert plan.next_round(19, 4, ahead=3).reuse == 0


def test_drafting_ahead_only_when_another_round_follows():
    plan = RoundPlan(max_new_tokens=10)
    rnd = plan.next_round(1, 4)
    assert plan.drafts_ahead(1, rnd, 4)  # 1 + 4 + 1 = 6 < 10
    assert plan.drafts_ahead(5, rnd, 3)  # 9 < 10
    assert not plan.drafts_ahead(6, rnd, 3)  # the round ends the answer


@pytest.mark.parametrize("drafted, accepted, guess_right, kept", [
    (4, 4, True, True),  # the whole block and the guessed token: the next block is already drafted
    (4, 4, False, False),  # the verifier's token is not the guess
    (4, 3, True, False),  # a draft was rejected: what follows it is drafted from a wrong prefix
    (0, 0, True, True),  # an empty block whose guess is the verifier's token
])
def test_keep_the_block_drafted_ahead_or_roll_it_back(drafted, accepted, guess_right, kept):
    assert RoundPlan.keep_ahead(drafted, accepted, guess_right) is kept


def test_no_token_is_started_past_the_expected_answer():
    plan = RoundPlan(max_new_tokens=50)
    rnd = plan.next_round(1, 4)
    assert rnd.ahead_limit == 5  # the guess and a full block
    # The first round trip: nothing known yet, so only the limit holds.
    assert plan.may_start_ahead(rnd, 4, 10_000.0, 30.0) and not plan.may_start_ahead(rnd, 5, 0.0, 30.0)
    plan.observe(rtt_ms=100.0, verify_ms=20.0, queue_ms=5.0, drafting_ms=[20.0, 40.0])
    assert (plan.call_ms, plan.net_ms, plan.token_ms) == (100.0, 75.0, 30.0)
    assert plan.may_start_ahead(rnd, 0, 0.0, None)  # the last round's speed: 30 ms ends by 100 ms
    assert plan.may_start_ahead(rnd, 2, 70.0, None)  # ends exactly when the answer is expected
    assert not plan.may_start_ahead(rnd, 2, 71.0, None)
    assert not plan.may_start_ahead(rnd, 1, 50.0, 60.0)  # the token just drafted ahead was slower
    plan.observe(rtt_ms=300.0, verify_ms=20.0, queue_ms=5.0, drafting_ms=[])  # a cloud round keeps the speed
    assert plan.token_ms == 30.0 and plan.may_start_ahead(rnd, 3, 200.0, None)
    assert not plan.may_start_ahead(rnd, 5, 0.0, None)


def test_the_simulator_starts_what_the_plan_allows():
    """tools/sim/edge.py drafts ahead on simulated time with the same decision: tokens start while the call is
    out, at most the limit, and (once a round trip is known) none that would end after the expected answer."""
    plan = RoundPlan(max_new_tokens=50)
    rnd = plan.next_round(1, 8)
    assert ahead_started(plan, rnd, rtt_ms=100.0, token_ms=30.0) == 4  # starts at 0, 30, 60, 90 ms
    assert ahead_started(plan, rnd, rtt_ms=10_000.0, token_ms=30.0) == 9  # the limit
    plan.observe(rtt_ms=100.0, verify_ms=0.0, queue_ms=0.0, drafting_ms=[30.0])
    assert ahead_started(plan, rnd, rtt_ms=100.0, token_ms=30.0) == 3  # the fourth would end at 120 ms
    assert ahead_started(plan, rnd, rtt_ms=50.0, token_ms=30.0) == 2  # the answer came early
