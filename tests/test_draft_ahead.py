"""Drafting ahead while a block is verified: the answer is still the target's, greedy token for token and
sampled in distribution, whether the block drafted ahead is kept (the guess was right) or rolled back.

The verifier is the real in-process one with a short sleep before each verify, a round trip long enough
for the drafter to draft ahead every round."""

from __future__ import annotations

import time

import pytest

from test_engine_rounds import exact_target_distribution, fits
from tiny_models import TableDrafter, TorchDrafter, tiny_target
from wisp_cloud.generate import generate
from wisp_cloud.inprocess import InProcessVerifier
from wisp_cloud.verifier import Verifier
from wisp_edge.draft_ahead import AheadDrafter
from wisp_edge.engine import FixedLength, SpeculativeEngine
from wisp_edge.round_plan import RoundPlan
from wisp_edge.wire.protocol import VerifierUnavailable, VerifyReply
from wisp_edge.wire.sampling import SamplingParams


class FarVerifier(InProcessVerifier):
    """The in-process verifier behind a round trip of `rtt_s`."""

    def __init__(self, verifier: Verifier, rtt_s: float) -> None:
        super().__init__(verifier)
        self.rtt_s = rtt_s

    def verify(self, request):
        time.sleep(self.rtt_s)
        return super().verify(request)


def _engine(model, drafter, k: int, *, ahead: bool = True, rtt_s: float = 0.003) -> SpeculativeEngine:
    return SpeculativeEngine(drafter, FarVerifier(Verifier(model), rtt_s), FixedLength(k),
                             decode_while_prefilling=False, draft_ahead=ahead)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("max_new", [1, 2, 7, 20])
@pytest.mark.parametrize("kind", ["poor", "self"])
def test_greedy_with_drafting_ahead_equals_the_target(kind, max_new, k):
    model = tiny_target(vocab=9, seed=k)
    drafter = TableDrafter(9, seed=k) if kind == "poor" else TorchDrafter(model)
    eng = _engine(model, drafter, k, rtt_s=0.02 if kind == "self" else 0.003)
    got = [t.id for t in eng.generate([3, 1, 4], max_new_tokens=max_new)]
    assert got == generate(model, [3, 1, 4], max_new_tokens=max_new)
    if kind == "self" and max_new == 20:
        # Every guess is right, so nothing drafted ahead is rolled back. How many blocks were ready in time
        # depends on the machine's load (no token is started past the expected answer), so only bounds.
        drafted_rounds = sum(1 for r in eng.stats.rounds if r.drafted)
        assert 0 < eng.stats.ahead_ready <= drafted_rounds - 1
        assert eng.stats.ahead_wasted_ms == 0


def test_a_right_guess_saves_the_drafting_of_the_next_block():
    model = tiny_target(vocab=9, seed=1)
    with_ahead = _engine(model, TorchDrafter(model), 3, rtt_s=0.02)
    without = _engine(model, TorchDrafter(model), 3, ahead=False, rtt_s=0.02)
    a = [(t.id, t.from_draft, t.round) for t in with_ahead.generate([2, 7], max_new_tokens=24)]
    b = [(t.id, t.from_draft, t.round) for t in without.generate([2, 7], max_new_tokens=24)]
    assert a == b  # the same tokens in the same rounds
    assert without.stats.ahead_ready == 0 and with_ahead.stats.ahead_ready > 0


@pytest.mark.parametrize("kind", ["poor", "self"])
def test_sampled_with_drafting_ahead_follows_the_target(kind):
    """`poor`: most guesses and blocks are rejected and rolled back; `self`: many blocks drafted ahead are
    kept. Either way the sampled answers follow the target's exact distribution."""
    # Top-2 sampling keeps the support at 2^6 answers, so six tokens (room for blocks drafted ahead to be
    # sent, not only drafted) still give the chi-square enough samples per answer.
    vocab, prompt, length, runs = 4, [1, 2], 6, 1500
    model = tiny_target(vocab=vocab, seed=11, scale=2.0)
    params = SamplingParams(1.0, top_k=2)
    exact = exact_target_distribution(model, prompt, length, params)
    drafter = TableDrafter(vocab, seed=5) if kind == "poor" else TorchDrafter(model)
    eng = _engine(model, drafter, 1, rtt_s=0.001)
    counts = dict.fromkeys(exact, 0)
    kept = wasted = 0.0
    for run in range(runs):
        run_params = SamplingParams(params.temperature, params.top_k, seed=run)
        seq = tuple(t.id for t in eng.generate(prompt, max_new_tokens=length, params=run_params))
        assert exact[seq] > 0
        counts[seq] += 1
        kept += eng.stats.ahead_ready
        wasted += eng.stats.ahead_wasted_ms
    assert wasted > 0, "some blocks drafted ahead were rolled back"
    if kind == "self":
        assert kept > runs // 4, "blocks drafted ahead were kept and sent"
    assert fits(counts, exact, runs)


class CountingDrafting:
    """Stands in for `Drafting`: token i is i, drafted at once; the stop rule fires at block index `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.indices: list[int | None] = []
        self.stop_at = stop_at

    def next(self, index):
        self.indices.append(index)
        return len(self.indices) - 1, None, 0.01, index is not None and index == self.stop_at


def _slow_verify(request):
    time.sleep(0.3)
    return VerifyReply(accepted=2, token=0)


@pytest.mark.parametrize("stop_at, drafted", [(None, 4), (1, 3)])
def test_drafting_ahead_starts_with_the_guess_and_stops_where_the_plan_or_the_stop_rule_says(stop_at, drafted):
    plan = RoundPlan(max_new_tokens=50)
    rnd = plan.next_round(1, 3)  # at most the guess and a block of 3
    drafting = CountingDrafting(stop_at)
    ahead = AheadDrafter()
    try:
        reply, rtt_ms, block = ahead.verify(_slow_verify, None, drafting, plan, rnd)
    finally:
        ahead.close()
    assert reply.accepted == 2 and rtt_ms >= 300
    assert drafting.indices == [None, 0, 1, 2][:drafted]  # the guess, then the block from index 0
    assert block.tokens == list(range(drafted)) and block.stopped == (stop_at is not None)


def test_a_failed_verify_call_is_raised_after_drafting_ahead():
    def unreachable(request):
        time.sleep(0.05)
        raise VerifierUnavailable("down")

    plan = RoundPlan(max_new_tokens=50)
    ahead = AheadDrafter()
    try:
        with pytest.raises(VerifierUnavailable):
            ahead.verify(unreachable, None, CountingDrafting(), plan, plan.next_round(1, 2))
    finally:
        ahead.close()
