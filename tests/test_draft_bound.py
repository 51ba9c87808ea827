"""The adaptive draft-length bound: long drafts when the round trip dominates, short ones when drafting
is slow or acceptance poor, capped by the server's suggestion, and following a changing network."""

from __future__ import annotations

import pytest

from wisp_edge.controller.bounds import DraftBound, Ewma, expected_committed
from wisp_edge.controller.policy import Controller, make_policy
from wisp_edge.engine import FixedLength
from wisp_edge.wire.protocol import VerifyReply


def test_expected_committed_by_hand():
    assert expected_committed(0.5, 0) == 1.0
    assert expected_committed(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_committed(1.0, 5) == 6.0


def bound(alpha, draft_ms, network_ms, server_ms=10.0, k_max=16):
    return DraftBound(k_max=k_max, alpha=Ewma(alpha), draft_ms=Ewma(draft_ms), network_ms=Ewma(network_ms),
                      server_ms=Ewma(server_ms))


def test_a_long_round_trip_makes_longer_drafts_pay():
    near, far = bound(0.8, 10, 5).best_k(), bound(0.8, 10, 200).best_k()
    assert far > near >= 1


def test_poor_acceptance_or_slow_drafting_shortens_the_draft():
    assert bound(0.3, 10, 50).best_k() < bound(0.9, 10, 50).best_k()
    assert bound(0.8, 80, 50).best_k() < bound(0.8, 5, 50).best_k()


def test_best_k_is_the_argmax_of_tokens_per_time():
    b = bound(0.7, 12, 40)
    k = b.best_k()
    rate = lambda k: expected_committed(0.7, k) / (k * 12 + 40 + 10)  # noqa: E731
    assert all(rate(k) >= rate(j) for j in range(1, 17))


def test_the_server_suggestion_caps_the_bound_and_observations_move_it():
    b = bound(0.95, 5, 300)
    assert b.best_k() == 16
    result = VerifyReply(accepted=2, token=7, verify_ms=20, queue_ms=5, suggested_max_draft=3)
    b.observe(3, 2, drafting_ms=[5, 5, 5], rtt_ms=325, queue_ms=5, verify_ms=20, suggested=3)
    assert b.best_k() <= 3
    # The network gets fast: a few rounds later the estimate follows.
    for _ in range(15):
        b.observe(3, 3, drafting_ms=[5, 5, 5], rtt_ms=30, queue_ms=5, verify_ms=20, suggested=None)
    assert b.network_ms.value < 20 and b.suggested is None
    controller = Controller(FixedLength(4), b)
    controller.observe(3, 1, result, 40.0, [5.0, 5.0, 5.0])
    assert b.suggested == 3 and controller.max_draft() <= 3


def test_a_long_round_trip_makes_doubtful_tokens_worth_drafting():
    near, far = bound(0.8, 10, 5).min_worthwhile_acceptance(), bound(0.8, 10, 300).min_worthwhile_acceptance()
    assert 0.0 < far < near <= 1.0
    # By hand for k fixed at 1 (k_max=1): c = (10 + 40 + 10) / (1 + 0.5) = 40 ms a token; 10 / (0.5 * 40).
    assert bound(0.5, 10, 40, k_max=1).min_worthwhile_acceptance() == pytest.approx(0.5)


def test_the_controller_hands_the_worthwhile_acceptance_to_its_stop_rule():
    from wisp_edge.controller.predictor import ConfidencePolicy

    rule = ConfidencePolicy(threshold=0.5, k_max=16)
    doubtful = (0.3, 0.0, 0.0, 0.0, 0.0)  # top-1 probability 0.3
    assert rule.stop_after_stats(0, doubtful)
    far = Controller(rule, bound(0.9, 5, 400))
    far.max_draft()
    assert rule.min_worthwhile < 0.3 and not far.stop_after_stats(0, doubtful)
    near = Controller(rule, bound(0.9, 20, 2, server_ms=2))
    near.max_draft()
    assert rule.min_worthwhile >= 0.5 and near.stop_after_stats(0, doubtful)


def test_verification_per_token_shortens_the_draft_and_raises_the_worthwhile_acceptance():
    """On a CPU verifier one more draft token costs about its drafting time again to verify; a bound that
    prices drafting alone drafts too long (the bench's +100 ms row lost to SLED's threshold that way)."""
    free, priced = bound(0.55, 1.5, 100, server_ms=50), bound(0.55, 1.5, 100, server_ms=50)
    priced.token_verify_ms = Ewma(1.5)
    assert priced.best_k() < free.best_k()
    assert priced.min_worthwhile_acceptance() > free.min_worthwhile_acceptance()
    # By hand, k fixed at 1: c = (1.5 + 1.5 + 40 + 10) / 1.5; (1.5 + 1.5) / (0.5 * c).
    one = bound(0.5, 1.5, 40, k_max=1)
    one.token_verify_ms = Ewma(1.5)
    assert one.min_worthwhile_acceptance() == pytest.approx(3.0 / (0.5 * 53.0 / 1.5))


def test_the_server_word_on_verification_per_token_is_learned_and_kept_out_of_the_fixed_cost():
    b = bound(0.8, 2, 20, server_ms=0.0)
    for _ in range(40):  # 4 tokens at 1.5 ms each on top of a 30 ms batch
        b.observe(4, 3, drafting_ms=[2] * 4, rtt_ms=56, queue_ms=0, verify_ms=36, suggested=None, token_verify_ms=1.5)
    assert b.token_verify_ms.value == pytest.approx(1.5)
    assert b.server_ms.value == pytest.approx(30.0, abs=0.1)
    # A server that does not say leaves the learned price as it was.
    b.observe(4, 3, drafting_ms=[2] * 4, rtt_ms=56, queue_ms=0, verify_ms=36, suggested=None, token_verify_ms=None)
    assert b.token_verify_ms.value == pytest.approx(1.5)


def test_policies_by_name(q4_pair):
    assert isinstance(make_policy("fixed", q4_pair.drafter, draft_length=5), FixedLength)
    assert make_policy("sled", q4_pair.drafter).max_draft() == 8
    assert isinstance(make_policy("wisp", q4_pair.drafter), Controller)
    with pytest.raises(ValueError):
        make_policy("magic", q4_pair.drafter)
