"""Automatic prefix caching: full KV blocks keyed by their tokens and everything before them are reused by any
later prefill (a new session, a resume after an eviction, a centralized request) instead of recomputed.

A hit must not change the numbers: the logits computed on top of cached blocks equal the logits of the
same prompt computed from scratch (allclose, atol 1e-5: the shapes of the two forwards differ, so float32
sums may be ordered differently; on this model they agree to ~1e-6)."""

from __future__ import annotations

import re

import httpx
import torch
from tiny_models import tiny_target

from tests.live_server import LiveServer, tiny_checkpoint
from wisp_cloud.generate import generate
from wisp_cloud.kv_pool import KVPool
from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import RaggedBatch, commit
from wisp_cloud.verifier import Prefill, Verifier, Verify
from wisp_edge.wire.sampling import SamplingParams

ATOL = 1e-5


def _fill(model, cache, tokens):
    batch = RaggedBatch.single(tokens, cache)
    logits = model(batch)
    commit(batch, [len(tokens)])
    return logits


def test_logits_on_a_hit_equal_logits_without_it():
    model = tiny_target(vocab=13, seed=3)
    pool = model.block_pool(num_blocks=32, block_size=4)
    prompt = [int(t) for t in torch.randint(13, (18,), generator=torch.Generator().manual_seed(0))]
    first = KVCache(pool)
    _fill(model, first, prompt)  # publishes its 4 full blocks
    other = prompt[:14] + [5, 6, 7]  # shares 3 full blocks (12 tokens) with the first prompt
    second = KVCache(pool)
    hit = second.reuse_prefix(other, keep_last=True)
    assert hit == 12 and second.blocks == first.blocks[:3]  # the same blocks, not recomputed copies
    assert (pool.queries_tokens, pool.hits_tokens) == (len(other), 12)
    with_hit = _fill(model, second, other[hit:])
    without = _fill(model, KVCache(model.block_pool(num_blocks=32, block_size=4)), other)[hit:]
    assert torch.allclose(with_hit, without, atol=ATOL, rtol=0)
    # the shared blocks were not written by the second forward: the first session still reads its own keys
    assert torch.allclose(_fill(model, first, [9]), _fill(model, KVCache(model.block_pool(32, 4)), prompt + [9])[-1:],
                          atol=ATOL, rtol=0)


def test_a_whole_prompt_hit_still_computes_the_last_token_and_a_write_into_a_shared_block_copies_it():
    model = tiny_target(vocab=13, seed=3)
    pool = model.block_pool(num_blocks=32, block_size=4)
    prompt = list(range(1, 9))  # exactly two blocks
    a = KVCache(pool)
    _fill(model, a, prompt)
    b = KVCache(pool)
    assert b.reuse_prefix(prompt, keep_last=True) == 4  # the last token's logits are needed
    c = KVCache(pool)
    assert c.reuse_prefix(prompt, keep_last=False) == 8 and c.blocks == a.blocks  # a resume may take all
    c.truncate(6)
    _fill(model, c, [11, 12])  # overwrites positions 6-7 of a shared block: c gets a private copy
    assert c.blocks[1] != a.blocks[1] and c.blocks[0] == a.blocks[0]
    alone = _fill(model, KVCache(model.block_pool(32, 4)), prompt)
    assert torch.allclose(_fill(model, a, [3]), _fill(model, KVCache(model.block_pool(32, 4)), prompt + [3])[-1:],
                          atol=ATOL, rtol=0), "the other session's block must be untouched"
    assert alone.shape[0] == 8


def test_freed_blocks_stay_reusable_until_overwritten():
    model = tiny_target(vocab=13, seed=5)
    per_block = 4 * model.kv_bytes_per_token
    pool = KVPool(model, budget_bytes=8 * per_block, block_tokens=4)  # 8 blocks
    verifier = Verifier(model)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # two full blocks and one token
    first = verifier.open("a", prompt, SamplingParams(), cache=pool.new_cache("a"))
    verifier.prefill([first])
    pool.release("a")  # closed: its blocks are free, but keep their keys
    assert pool.blocks.used_blocks == 0 and pool.blocks.cached_blocks == 2
    second = verifier.open("b", prompt, SamplingParams(), cache=pool.new_cache("b"))
    hits = pool.blocks.hits_tokens
    verifier.prefill([second])
    assert pool.blocks.hits_tokens - hits == 8 and second.tokens == first.tokens
    pool.release("b")
    # other prompts take every block, least recently freed first: the cached ones go last, but they go
    others = [verifier.open(s, [7 + i] * 15, SamplingParams(), cache=pool.new_cache(s)) for i, s in enumerate("cd")]
    verifier.prefill(others)
    for s in "cd":
        pool.release(s)
    third = verifier.open("e", prompt, SamplingParams(), cache=pool.new_cache("e"))
    hits = pool.blocks.hits_tokens
    verifier.prefill([third])
    assert pool.blocks.hits_tokens == hits and third.tokens == first.tokens  # overwritten: a miss, same answer


def test_a_resume_after_eviction_hits_the_cache_and_continues_exactly():
    model = tiny_target(vocab=11, seed=7)
    pool = KVPool(model, budget_bytes=64 * 4 * model.kv_bytes_per_token, block_tokens=4)
    verifier = Verifier(model)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3]
    ref = generate(model, prompt, max_new_tokens=8)
    session = verifier.open("a", prompt, SamplingParams(), cache=pool.new_cache("a"))
    verifier.prefill([session])
    for _ in range(3):
        verifier.run([Verify(session, session.position, [])])
    assert pool.evict_for(pool.budget_bytes, busy=lambda sid: False) == ["a"]
    resumed = verifier.open("a2", list(session.tokens), SamplingParams(), cache=pool.new_cache("a2"))
    hits = pool.blocks.hits_tokens
    verifier.run([Prefill(resumed, sample_first=False)])
    assert pool.blocks.hits_tokens - hits == 16  # 17 committed tokens: four full blocks
    assert resumed.cache.length == len(resumed.tokens) - 1
    for _ in range(4):
        verifier.run([Verify(resumed, resumed.position, [])])
    assert resumed.tokens[len(prompt):] == ref


def _counter(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_prometheus_counts_prefix_cache_queries_and_hits(tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "tiny", max_seq_len=256)
    with LiveServer("--model", str(model_dir), "--threads", "1", "--log-level", "warning",
                    log_path=tmp_path / "server.log") as live, httpx.Client(base_url=live.url, timeout=60) as http:
        prompt = list(range(100, 140))  # 40 tokens: two full blocks of 16
        for _ in range(2):
            assert http.post("/v1/sessions", json={"prompt_ids": prompt}).status_code == 201
        text = http.get("/metrics").text
    assert _counter(text, "wisp_prefix_cache_queries_total") == 80
    assert _counter(text, "wisp_prefix_cache_hits_total") == 32  # the second prefill reused two blocks
