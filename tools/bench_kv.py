"""The paged-KV measurements of `tools/bench_server.py`: the machine's own limits (GEMM throughput at the
batch's shapes, memory read bandwidth) and each forward's roofline bound, attention calls per layer,
prefix-cache prefill speed-up, and KV bytes per cached token against the model's theoretical value."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import RaggedBatch, Transformer
from wisp_cloud.verifier import Verifier
from wisp_edge.wire.sampling import SamplingParams


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _linears(model: Transformer) -> list[nn.Linear]:
    layer = model.layers[0]
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def gemm_gflops(model: Transformer, rows: int, reps: int = 5) -> float:
    """fp32 GEMM throughput of one layer's projections plus the LM head, as the model runs them, on `rows` rows."""
    x = {n: torch.randn(rows, n, dtype=model.dtype, device=model.device) for n in (model.args.dim, model.args.ffn_dim)}
    shapes = [*_linears(model), model.lm_head]
    flops = sum(2 * rows * lin.weight.shape[0] * lin.weight.shape[1] for lin in shapes)

    def run() -> None:
        for lin in shapes:
            F.linear(x[lin.weight.shape[1]], lin.weight)

    return flops / _median_ms(run, reps) / 1e6


def read_bandwidth_gb_s(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Memory read bandwidth: a reduction over a buffer far larger than any cache."""
    buf = torch.ones(nbytes // 4)
    return nbytes / _median_ms(lambda: buf.sum(), reps) / 1e6


def forward_cost(model: Transformer, new_tokens: list[int], cached: list[int], logit_rows: int) -> tuple[float, int]:
    """(FLOPs, weight bytes) of one ragged forward: projections and MLPs on every token, attention over each
    token's context, the LM head on the rows read."""
    a = model.args
    per_token = sum(lin.weight.numel() for lin in _linears(model)) * a.n_layers
    flops = 2 * per_token * sum(new_tokens) + 2 * a.vocab_size * a.dim * logit_rows
    for n, c in zip(new_tokens, cached):
        contexts = sum(c + j + 1 for j in range(n))
        flops += 4 * a.n_layers * a.n_heads * a.head_dim * contexts
    weight_bytes = (per_token + model.lm_head.weight.numel()) * model.lm_head.weight.element_size()
    return float(flops), weight_bytes


def roofline_ms(flops: float, weight_bytes: int, gflops: float, gb_s: float) -> float:
    return max(weight_bytes / gb_s / 1e6, flops / gflops / 1e6)


def attention_calls_per_layer(model: Transformer, caches: list[KVCache], k: int) -> float:
    """Scaled-dot-product-attention calls in one batched forward over `caches`, per layer."""
    calls = 0
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        model(RaggedBatch(torch.zeros(len(caches) * k, dtype=torch.long), [k] * len(caches), caches))
    finally:
        F.scaled_dot_product_attention = real
    return calls / model.args.n_layers


def prefix_section(model: Transformer, prompt_tokens: int, reps: int, seed: int) -> dict:
    """Prefill of a `prompt_tokens` prompt the prefix cache has never seen vs the same prompt again (a second
    session), each rep on a fresh prompt; plus the logits of the hit against the miss."""
    pool = model.block_pool(num_blocks=(2 * prompt_tokens // 16 + 2) * (reps + 1), block_size=16)
    verifier = Verifier(model)
    gen = torch.Generator().manual_seed(seed)
    firsts, seconds = [], []
    for _ in range(reps + 1):
        prompt = [int(t) for t in torch.randint(model.args.vocab_size, (prompt_tokens,), generator=gen)]
        times, answers = [], []
        for _ in range(2):
            s = verifier.open("bench", prompt, SamplingParams(), cache=KVCache(pool))
            t0 = time.perf_counter()
            verifier.prefill([s])
            times.append((time.perf_counter() - t0) * 1000.0)
            answers.append(s.tokens[-1])
            s.cache.free()
        assert answers[0] == answers[1], "a prefix-cache hit changed the first token"
        firsts.append(times[0])
        seconds.append(times[1])
    first, second = statistics.median(firsts[1:]), statistics.median(seconds[1:])  # rep 0 warms up
    return {"prompt_tokens": prompt_tokens, "first_ms": round(first, 2), "second_ms": round(second, 2),
            "speedup": round(first / second, 2), "hit_tokens": (prompt_tokens - 1) // 16 * 16, "reps": reps}


def kv_bytes_section(model: Transformer, lengths: list[int], seed: int) -> dict:
    """KV memory per cached token: the pool's tensors per slot, and what sessions prefilled with `lengths`
    tokens hold per token (whole blocks, so the last one is partly empty), against the theoretical
    2 x layers x kv_heads x head_dim x element size."""
    verifier, gen = Verifier(model), torch.Generator().manual_seed(seed)
    pool = model.block_pool(num_blocks=sum(lengths) // 16 + len(lengths), block_size=16)
    caches = []
    for n in lengths:
        s = verifier.open("kv", [int(t) for t in torch.randint(model.args.vocab_size, (n,), generator=gen)],
                          SamplingParams(), cache=KVCache(pool))
        verifier.prefill([s])
        caches.append(s.cache)
    a = model.args
    theoretical = 2 * a.n_layers * a.n_kv_heads * a.head_dim * torch.finfo(model.dtype).bits // 8
    per_slot = (pool.k.nbytes + pool.v.nbytes) / ((pool.num_blocks + 1) * pool.block_size)
    held = sum(c.capacity for c in caches) * pool.bytes_per_token / sum(c.length for c in caches)
    return {"theoretical_bytes_per_token": theoretical, "pool_bytes_per_slot": per_slot,
            "held_bytes_per_cached_token": round(held, 1), "block_tokens": pool.block_size,
            "slot_over_theoretical_pct": round(100 * (per_slot / theoretical - 1), 2),
            "held_over_theoretical_pct": round(100 * (held / theoretical - 1), 2)}


def gathered_math_attention(q, k_cache, v_cache, layout):
    """The candidate kernel `paged_attention` was chosen against: the same gathered, padded batch, but scores,
    softmax and weighted sum as three plain ops instead of the fused SDPA kernel."""
    _, bs, kv, hd = k_cache.shape
    n_heads = q.shape[1]
    group = n_heads // kv
    rows, chunk = layout.block_table.shape[0], layout.chunk
    table = layout.block_table.view(-1)
    keys = k_cache.index_select(0, table).view(rows, -1, kv, hd).transpose(1, 2)
    values = v_cache.index_select(0, table).view(rows, -1, kv, hd).transpose(1, 2)
    query = q.index_select(0, layout.query_index).view(rows, chunk, kv, group, hd)
    query = query.permute(0, 2, 3, 1, 4).reshape(rows, kv, group * chunk, hd)
    scores = torch.softmax(query @ keys.transpose(-1, -2) * hd ** -0.5 + layout.mask, dim=-1)
    out = (scores @ values).view(rows, kv, group, chunk, hd).permute(0, 3, 1, 2, 4).reshape(rows * chunk, -1)
    return out.index_select(0, layout.out_index)


def kernel_comparison(model: Transformer, caches: list[KVCache], k: int, reps: int, seed: int) -> dict:
    """Median ms of one batched forward with each attention kernel, alternating per rep."""
    from wisp_cloud.model.paged_attention import paged_attention, reference_attention

    n = len(caches)
    tokens = torch.randint(model.args.vocab_size, (n * k,), generator=torch.Generator().manual_seed(seed))
    rows = torch.arange(n * k)
    kernels = {"gathered_sdpa": paged_attention, "gathered_math": gathered_math_attention,
               "per_session_sdpa": reference_attention}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    try:
        for rep in range(reps + 1):
            for name, attend in kernels.items():
                model.attend = attend
                t0 = time.perf_counter()
                model(RaggedBatch(tokens, [k] * n, caches), logit_rows=rows)
                if rep:
                    times[name].append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.attend = paged_attention
    return {"sessions": n, "block_tokens": k, **{f"{name}_ms": round(statistics.median(t), 2)
                                                 for name, t in times.items()}}
