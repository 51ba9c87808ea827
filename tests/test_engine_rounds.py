"""The round loop on tiny real models: exact round patterns, budgets, EOS, and lossless sampling end to end."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tiny_models import SlowPrefillDrafter, TableDrafter, TorchDrafter, tiny_target
from wisp_cloud.generate import generate
from wisp_cloud.inprocess import InProcessVerifier
from wisp_cloud.model.transformer import RaggedBatch, commit
from wisp_cloud.verifier import StalePositionError, Verifier
import wisp_edge.engine as engine_module
from wisp_edge.engine import FixedLength, SpeculativeEngine
from wisp_edge.wire.protocol import SessionStart, VerifyBlock, VerifyRequest
from wisp_edge.wire.sampling import SamplingParams, probs_from_logits


def engine(model, drafter, k, eos=(), overlap=False):
    """An engine whose drafter prefills before the first round, so round patterns do not depend on the
    machine's load; `overlap=True` lets the verifier decode while the drafter prefills."""
    return SpeculativeEngine(drafter, InProcessVerifier(Verifier(model)), FixedLength(k), eos_ids=eos,
                             decode_while_prefilling=overlap)


def test_model_drafting_for_itself_accepts_every_draft():
    model = tiny_target(vocab=11, seed=3)
    eng = engine(model, TorchDrafter(model), k=2)
    tokens = list(eng.generate([1, 2, 3], max_new_tokens=10))
    # First token from prefill, then rounds of two accepted drafts + one bonus token.
    assert [t.from_draft for t in tokens] == [False, True, True, False, True, True, False, True, True, False]
    assert [t.round for t in tokens] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(r.drafted == r.accepted == 2 for r in eng.stats.rounds)
    assert [t.id for t in tokens] == generate(model, [1, 2, 3], max_new_tokens=10)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("max_new", [1, 2, 7, 20])
def test_greedy_equals_target_with_a_poor_drafter(k, max_new):
    model = tiny_target(vocab=9, seed=k)
    eng = engine(model, TableDrafter(9, seed=k), k)
    got = [t.id for t in eng.generate([4, 1], max_new_tokens=max_new)]
    assert got == generate(model, [4, 1], max_new_tokens=max_new)
    assert len(got) == max_new  # never overshoots the budget


def test_generation_stops_at_eos_included():
    model = tiny_target(vocab=9, seed=5)
    reference = generate(model, [4, 1], max_new_tokens=30)
    eos = reference[5]
    cut = reference.index(eos) + 1
    for k in (1, 3, 8):
        got = [t.id for t in engine(model, TorchDrafter(model), k, eos=(eos,)).generate([4, 1], max_new_tokens=30)]
        assert got == reference[:cut]


def test_ragged_verify_batch_equals_one_at_a_time():
    model = tiny_target(vocab=9, seed=7)
    prompts, drafts = [[1], [2, 3, 4, 5], [6, 7]], [[1, 2, 3], [], [4, 4, 4, 4, 4, 4]]
    verifier = Verifier(model)
    sessions = [verifier.open(f"s{i}", p, SamplingParams()) for i, p in enumerate(prompts)]
    verifier.prefill(sessions)
    batched = verifier.verify([(s, s.position, d, None) for s, d in zip(sessions, drafts)])
    for prompt, draft, session, verdict in zip(prompts, drafts, sessions, batched):
        solo = Verifier(model)
        twin = solo.open("twin", prompt, SamplingParams())
        solo.prefill([twin])
        assert solo.verify([(twin, twin.position, draft, None)]) == [verdict]
        assert twin.tokens == session.tokens
        assert twin.cache.length == session.cache.length == len(session.tokens) - 1


def test_stale_position_is_refused_and_changes_nothing():
    model = tiny_target(vocab=9, seed=2)
    backend = InProcessVerifier(Verifier(model))
    started = backend.start_session(SessionStart([1, 2, 3]))
    with pytest.raises(StalePositionError) as err:
        backend.verify(VerifyRequest(started.session_id, VerifyBlock(position=2, draft_ids=[1], round_id=0)))
    assert err.value.committed == 4
    block = VerifyBlock(position=4, draft_ids=[], round_id=0)
    assert backend.verify(VerifyRequest(started.session_id, block)).accepted == 0


def exact_target_distribution(model, prompt, length, params):
    """P(first `length` new tokens) of the target alone, by enumeration."""
    vocab = model.args.vocab_size
    probs = {}
    for seq in itertools.product(range(vocab), repeat=length):
        cache = model.new_cache()
        batch = RaggedBatch.single([*prompt, *seq[:-1]], cache)
        logits = model(batch)[len(prompt) - 1:]  # rows predicting seq[0..]
        commit(batch, [len(prompt) + length - 1])
        p = 1.0
        for row, token in zip(logits, seq):
            p *= probs_from_logits(row.numpy(), params)[token]
        probs[seq] = p
    return probs


def fits(counts: dict, exact: dict, runs: int) -> bool:
    """Chi-square of observed sequence counts against the exact distribution (rare cells pooled)."""
    cells = [c for c in exact if exact[c] * runs >= 5]
    rest = [c for c in exact if 0 < exact[c] * runs < 5]
    observed = [counts[c] for c in cells] + ([sum(counts[c] for c in rest)] if rest else [])
    expected = [exact[c] * runs for c in cells] + ([sum(exact[c] for c in rest) * runs] if rest else [])
    expected = np.array(expected) * sum(observed) / sum(expected)
    return chisquare(observed, expected).pvalue > 1e-4


@pytest.mark.parametrize("params", [SamplingParams(1.0, seed=0), SamplingParams(0.8, top_k=3, top_p=0.9, seed=0)],
                         ids=["t1", "t0.8-k3-p0.9"])
def test_sampled_engine_output_follows_the_target(params):
    vocab, prompt, length, runs = 4, [1, 2], 3, 1500
    model = tiny_target(vocab=vocab, seed=11, scale=2.0)
    exact = exact_target_distribution(model, prompt, length, params)
    eng = engine(model, TableDrafter(vocab, seed=5), k=3)
    counts = dict.fromkeys(exact, 0)
    for run in range(runs):
        run_params = SamplingParams(params.temperature, params.top_k, params.top_p, seed=run)
        seq = tuple(t.id for t in eng.generate(prompt, max_new_tokens=length, params=run_params))
        assert exact[seq] > 0
        counts[seq] += 1
    assert fits(counts, exact, runs)


def test_cloud_rounds_while_the_drafter_prefills_keep_the_target_distribution(monkeypatch):
    """While a slow drafter prefills, the verifier decodes alone (empty drafts); then the drafter catches up
    on those tokens and drafts. Sampled answers still follow the target's exact distribution."""
    monkeypatch.setattr(engine_module, "SHORT_PREFILL_S", 0.0)
    vocab, prompt, length, runs = 4, [1, 2], 4, 800
    params = SamplingParams(1.0, seed=0)
    model = tiny_target(vocab=vocab, seed=11, scale=2.0)
    exact = exact_target_distribution(model, prompt, length, params)
    drafter = SlowPrefillDrafter(vocab, seed=5)
    eng = engine(model, drafter, k=3, overlap=True)
    counts = dict.fromkeys(exact, 0)
    cloud = drafted = 0
    for run in range(runs):
        drafter.prefill_s = (run % 3) * 0.0015  # none, about one cloud round, several
        seq = tuple(t.id for t in eng.generate(prompt, max_new_tokens=length, params=SamplingParams(1.0, seed=run)))
        assert exact[seq] > 0
        counts[seq] += 1
        cloud += eng.stats.cloud_rounds
        drafted += sum(r.drafted for r in eng.stats.rounds)
    assert cloud > 0 and drafted > 0, "both paths ran"
    assert fits(counts, exact, runs)
