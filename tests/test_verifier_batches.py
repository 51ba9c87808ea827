"""One ragged forward carrying every kind of target work at once: prefills, resumes (cache only),
speculative verify blocks and plain decode steps of different sessions, over caches that grow in
blocks. Each session's result must equal what it gets when run alone, and a batch of resumes alone
(no logits read) must still fill the caches."""

from __future__ import annotations

import pytest
from tiny_models import tiny_target

from wisp_cloud.generate import generate
from wisp_cloud.kv_pool import KVPool
from wisp_cloud.verifier import Prefill, Verifier, Verify
from wisp_edge.wire.sampling import SamplingParams


def _greedy(model, prompt, n):
    return generate(model, prompt, max_new_tokens=n)


def test_mixed_batch_equals_each_session_alone():
    model = tiny_target(vocab=13, seed=4)
    verifier = Verifier(model)
    prompts = [[1, 5, 7], [2, 3, 4, 5, 6, 7, 8], [9], [3, 3, 3, 3]]
    refs = [_greedy(model, p, 6) for p in prompts]
    # Sessions 0 and 1 are already running; 2 is new; 3 resumes from tokens the edge holds.
    s0 = verifier.open("a", prompts[0], SamplingParams())
    s1 = verifier.open("b", prompts[1], SamplingParams())
    verifier.prefill([s0, s1])
    s2 = verifier.open("c", prompts[2], SamplingParams())
    s3 = verifier.open("d", prompts[3] + refs[3][:2], SamplingParams())
    draft0 = refs[0][1:4]  # all correct: 3 accepted + bonus
    draft1 = [refs[1][1], (refs[1][2] + 1) % 13]  # first right, second wrong
    out = verifier.run([Verify(s0, s0.position, draft0), Prefill(s2), Verify(s1, s1.position, draft1),
                        Prefill(s3, sample_first=False)])
    assert out[0].accepted == 3 and out[0].token == refs[0][4]
    assert out[1] == refs[2][0]
    assert out[2].accepted == 1 and out[2].token == refs[1][2]
    assert out[3] is None and s3.cache.length == len(s3.tokens) - 1
    # A decode step (empty draft) for every session continues each exactly as the target alone would.
    steps = verifier.run([Verify(s, s.position, []) for s in (s0, s1, s2, s3)])
    assert [v.accepted for v in steps] == [0, 0, 0, 0]
    assert s0.tokens[len(prompts[0]):] == refs[0][:6]
    assert s1.tokens[len(prompts[1]):] == refs[1][:4]
    assert s2.tokens[len(prompts[2]):] == refs[2][:2]
    assert s3.tokens[len(prompts[3]):] == refs[3][:3]


def test_a_batch_of_resumes_alone_fills_the_caches():
    model = tiny_target(vocab=9, seed=1)
    verifier = Verifier(model)
    ref = _greedy(model, [1, 2, 3], 5)
    sessions = [verifier.open(str(i), [1, 2, 3] + ref[:i + 1], SamplingParams()) for i in range(3)]
    assert verifier.run([Prefill(s, sample_first=False) for s in sessions]) == [None, None, None]
    for i, s in enumerate(sessions):
        assert s.cache.length == len(s.tokens) - 1
        (step,) = verifier.run([Verify(s, s.position, [])])
        assert step.token == ref[i + 1]


def test_pool_caches_grow_in_blocks_and_eviction_spares_busy_sessions():
    model = tiny_target(vocab=9, seed=1)
    per_token = model.kv_bytes_per_token
    pool = KVPool(model, budget_bytes=10 * 4 * per_token, block_tokens=4)  # 10 blocks of 4 tokens
    verifier = Verifier(model)
    caches = {sid: pool.new_cache(sid) for sid in "abc"}
    assert pool.used_bytes == 0
    assert pool.growth_bytes(caches["a"], 9) == 12 * per_token  # 3 blocks
    sessions = {sid: verifier.open(sid, list(range(9)), SamplingParams(), cache=caches[sid]) for sid in "abc"}
    verifier.prefill(list(sessions.values()))
    assert all(c.capacity == 12 for c in caches.values()) and pool.used_bytes == 36 * per_token
    pool.touch("a")  # b is now least recently used, then c, then a
    evicted = pool.evict_for(8 * per_token, busy=lambda sid: sid == "b")
    assert evicted == ["c"] and "c" not in pool and pool.free_bytes == 16 * per_token
    assert pool.evictions == 1
    with pytest.raises(ValueError):
        pool.new_cache("a")


def test_kv_bytes_per_token_matches_the_allocated_tensors():
    model = tiny_target(vocab=9, seed=1)
    cache = model.new_cache(capacity=7, growth=4)
    assert cache.capacity == 8
    assert cache.nbytes == 8 * model.kv_bytes_per_token == 8 * cache.bytes_per_position
    cache.reserve(9)
    assert cache.capacity == 12
    a = model.args
    assert model.kv_bytes_per_token == 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4  # float32 keys and values



def test_a_resumed_sampled_session_draws_what_the_lost_one_would_have():
    """After a restart the edge re-sends its round to a session resumed from its committed tokens:
    the verdict must be the one the lost session would have given (same seed, same position)."""
    vocab = 11
    model = tiny_target(vocab=vocab, seed=2, scale=1.0)
    verifier = Verifier(model)
    uniform = (list(range(vocab)), [1.0 / vocab] * vocab)  # a poor drafter: rejections and resampling
    draft = [4, 7, 1]
    for seed in range(8):
        params = SamplingParams(temperature=1.0, seed=seed)
        lost = verifier.open("lost", [1, 2, 3], params)
        verifier.prefill([lost])  # samples the first token, which the edge keeps
        resumed = verifier.open("resumed", list(lost.tokens), params)
        verifier.run([Prefill(resumed, sample_first=False)])
        v_lost, v_resumed = verifier.verify([(lost, lost.position, draft, [uniform] * 3),
                                             (resumed, resumed.position, draft, [uniform] * 3)])
        assert v_lost == v_resumed, f"seed {seed}"
