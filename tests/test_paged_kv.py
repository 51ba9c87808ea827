"""The paged KV cache: block tables into one preallocated pool, growth without copies, a budget counted in
blocks, eviction that returns blocks, and attention as one call per layer for a whole mixed batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_target

from wisp_cloud.kv_pool import KVPool
from wisp_cloud.model.block_pool import NULL_BLOCK, KVPoolExhausted
from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import RaggedBatch, commit
from wisp_cloud.verifier import Prefill, Verifier, Verify
from wisp_edge.wire.sampling import SamplingParams


def _fill(model, cache, tokens):
    batch = RaggedBatch.single(tokens, cache)
    model(batch)
    commit(batch, [len(tokens)])


def test_growth_appends_blocks_and_never_copies():
    model = tiny_target(vocab=9, seed=1)
    pool = model.block_pool(num_blocks=12, block_size=4)
    k_storage, v_storage = pool.k.data_ptr(), pool.v.data_ptr()
    cache = KVCache(pool)
    _fill(model, cache, [1, 2, 3])
    first = list(cache.blocks)
    written = pool.k[:, first[0], :3].clone()
    assert len(first) == 1 and cache.capacity == 4
    _fill(model, cache, [4, 5, 6, 7, 8, 1])  # 9 positions: three blocks
    assert cache.blocks[:1] == first and len(cache.blocks) == 3 and NULL_BLOCK not in cache.blocks
    assert pool.k.data_ptr() == k_storage and pool.v.data_ptr() == v_storage  # the pool was never reallocated
    assert torch.equal(pool.k[:, first[0], :3], written)  # earlier keys stayed where they were
    assert pool.used_blocks == 3


def test_budget_is_a_number_of_blocks_and_kv_bytes_match_the_model():
    model = tiny_target(vocab=9, seed=1)
    a = model.args
    per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4  # float32 keys and values
    pool = KVPool(model, budget_bytes=10 * 4 * per_token + 100, block_tokens=4)
    assert pool.blocks.num_blocks == 10 and pool.blocks.block_bytes == 4 * per_token
    # the tensors hold exactly the budget's blocks plus the null block, at the theoretical bytes per token
    assert (pool.blocks.k.nbytes + pool.blocks.v.nbytes) == (10 + 1) * 4 * per_token == 11 * pool.blocks.block_bytes
    cache = pool.new_cache("a")
    cache.reserve(40)
    assert pool.used_bytes == pool.budget_bytes - 100 and pool.free_bytes == 100
    with pytest.raises(KVPoolExhausted):
        pool.new_cache("b").reserve(1)


def test_eviction_gives_blocks_back():
    model = tiny_target(vocab=9, seed=1)
    pool = KVPool(model, budget_bytes=10 * 4 * model.kv_bytes_per_token, block_tokens=4)
    verifier = Verifier(model)
    sessions = {sid: verifier.open(sid, [i + 1] * 6 + [sid_i], SamplingParams(), cache=pool.new_cache(sid))
                for sid_i, (sid, i) in enumerate(zip("abc", range(3)))}
    verifier.prefill(list(sessions.values()))
    assert pool.blocks.used_blocks == 6  # 7 tokens each: two blocks of 4
    assert pool.evict_for(pool.free_bytes + 1, busy=lambda sid: sid == "a") == ["b"]
    assert pool.blocks.used_blocks == 4 and sessions["b"].cache.blocks == []
    pool.release("a")
    assert pool.blocks.used_blocks == 2


def test_one_attention_call_per_layer_for_a_mixed_batch(monkeypatch):
    model = tiny_target(vocab=13, seed=4)
    verifier = Verifier(model)
    running = [verifier.open(str(i), [1 + i, 2, 3, 4, 5][: 2 + i], SamplingParams()) for i in range(3)]
    verifier.prefill(running)
    fresh = verifier.open("new", list(range(1, 12)), SamplingParams())
    resumed = verifier.open("resumed", [7, 7, 8, 9, 2, 3, 1, 4, 5], SamplingParams())
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    verifier.run([Verify(running[0], running[0].position, [3, 4, 5]), Prefill(fresh),
                  Verify(running[1], running[1].position, []), Prefill(resumed, sample_first=False),
                  Verify(running[2], running[2].position, [1])])
    assert len(calls) == model.args.n_layers  # one call per layer, whatever the mix
