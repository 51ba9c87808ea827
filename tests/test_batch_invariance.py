"""Batch invariance of the paged forward: each session's logits inside one mixed ragged batch equal its logits
when it runs alone, from scratch, in a pool of its own.

The batch mixes what a server batch holds: a verify block, a prefill that starts from prefix-cache hits, a
block that crosses a KV block boundary, a decode step that opens a new block, a resume after an eviction
(hitting the blocks the evicted session left) and a long prefill cut into several attention rows.
Tolerance: atol 1e-5 on float32 logits of magnitude ~1-10 (the batched and the lone forward sum in different
orders; a wrong key, position or mask moves logits by far more than that)."""

from __future__ import annotations

import torch
from tiny_models import tiny_target

from wisp_cloud.kv_pool import KVPool
from wisp_cloud.model import paged_attention
from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import RaggedBatch, commit

ATOL = 1e-5
BLOCK = 4


def _fill(model, cache, tokens):
    batch = RaggedBatch.single(tokens, cache)
    logits = model(batch)
    commit(batch, [len(tokens)])
    return logits


def _alone(model, history, new):
    """The new tokens' logits for a session with `history` cached, computed from nothing."""
    cache = KVCache(model.block_pool(num_blocks=32, block_size=BLOCK))
    if history:
        _fill(model, cache, history)
    return model(RaggedBatch.single(new, cache))


def _mixed_batch(model):
    vocab = model.args.vocab_size
    rand = torch.Generator().manual_seed(11)

    def tokens(n):
        return [int(t) for t in torch.randint(vocab, (n,), generator=rand)]

    pool = KVPool(model, budget_bytes=64 * BLOCK * model.kv_bytes_per_token, block_tokens=BLOCK)
    shared = tokens(10)
    verify = pool.new_cache("verify")
    _fill(model, verify, shared)  # publishes two blocks
    hit = pool.new_cache("hit")
    prompt = shared[:8] + tokens(3)
    assert hit.reuse_prefix(prompt, keep_last=True) == 8
    crossing = pool.new_cache("crossing")
    _fill(model, crossing, tokens(7))  # the new block of 3 crosses position 8
    opening = pool.new_cache("opening")
    _fill(model, opening, tokens(8))  # the decode step opens a third block
    evicted = pool.new_cache("evicted")
    context = tokens(9)
    _fill(model, evicted, context)
    assert pool.evict_for(pool.free_bytes + 1, busy=lambda sid: sid != "evicted") == ["evicted"]
    resumed = pool.new_cache("resumed")
    assert resumed.reuse_prefix(context, keep_last=False) == 8  # the evicted session's blocks, still cached
    long = pool.new_cache("long")
    work = [(verify, tokens(5)), (hit, prompt[8:]), (crossing, tokens(3)), (opening, tokens(1)),
            (resumed, context[8:]), (long, tokens(21))]
    caches, news = zip(*work)
    batch = RaggedBatch(torch.tensor([t for new in news for t in new]), [len(n) for n in news], list(caches))
    histories = [list(c.token_ids[: c.length]) for c in caches]
    return batch, histories, news


def test_each_session_in_a_mixed_batch_gets_its_logits_alone():
    model = tiny_target(vocab=23, seed=8)
    batch, histories, news = _mixed_batch(model)
    assert paged_attention.choose_chunk(batch.seq_lens) < max(batch.seq_lens)  # the long prefill spans rows
    logits = model(batch)
    for i, (history, new) in enumerate(zip(histories, news)):
        lo, hi = batch.offsets[i], batch.offsets[i + 1]
        assert torch.allclose(logits[lo:hi], _alone(model, history, new), atol=ATOL, rtol=0), f"session {i}"


def test_the_one_call_path_equals_the_per_session_reference():
    model = tiny_target(vocab=23, seed=9)
    batch, _, _ = _mixed_batch(model)
    paged = model(batch)
    model.attend = paged_attention.reference_attention
    reference = model(batch)
    assert torch.allclose(paged, reference, atol=ATOL, rtol=0)
