"""A compact Llama-family transformer (Llama, Qwen2, Qwen3) for ragged, cached verification.

The model maps a *ragged batch* (many sessions' new tokens packed into one flat sequence, each
session continuing its own paged KV cache) to logits. All projections and MLPs run as one matmul over
every packed token, and attention as one call per layer over every session, reading each one's keys
through its block table (`paged_attention`), so a batch of 16 sessions costs one forward, not 16.
Module names follow Hugging Face's so checkpoints load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wisp_cloud.model.block_pool import BlockPool
from wisp_cloud.model.config import ModelArgs
from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.paged_attention import PagedLayout, paged_attention, plan, to_device, write_kv

DEFAULT_BLOCK_TOKENS = 16  # vLLM's default: fine-grained prefix hits, short block tables


@dataclass
class RaggedBatch:
    """Where each session's tokens sit in the packed sequence and where its cache continues."""

    tokens: torch.Tensor  # [num_tokens] int64, sessions concatenated
    seq_lens: list[int]  # new tokens per session
    caches: list[KVCache]  # one per session; new tokens start at cache.length

    def __post_init__(self) -> None:
        assert len(self.seq_lens) == len(self.caches), "one cache per sequence"
        assert sum(self.seq_lens) == self.tokens.shape[0], "seq_lens must cover the packed tokens"
        assert all(n > 0 for n in self.seq_lens), "every sequence needs at least one token"
        self.starts = [c.length for c in self.caches]
        self.offsets = [0]
        for n in self.seq_lens:
            self.offsets.append(self.offsets[-1] + n)
        self.positions = torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.seq_lens)])

    @classmethod
    def single(cls, tokens: list[int], cache: KVCache) -> "RaggedBatch":
        return cls(torch.tensor(tokens, dtype=torch.long), [len(tokens)], [cache])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3.x frequency scaling when the config asks for it."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    scaling = args.rope_scaling
    if scaling:
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PagedLayout,
                pool: BlockPool, attend=paged_attention) -> torch.Tensor:
        t = x.shape[0]  # x: [num_tokens, dim]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [num_tokens, 1, head_dim]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = pool.k[self.layer_id], pool.v[self.layer_id]  # [blocks, block_size, kv_heads, head_dim]
        write_kv(k_cache, v_cache, k, v, layout)
        return self.o_proj(attend(q, k_cache, v_cache, layout))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, layout, pool, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, pool, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.attend = paged_attention  # `paged_attention.reference_attention`: the per-session reference
        self._pools: dict[int, BlockPool] = {}  # block size -> the pool of caches made by `new_cache`

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def block_pool(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_TOKENS, *,
                   growable: bool = False) -> BlockPool:
        """A pool of KV blocks for this model (the server's has a fixed number: its budget)."""
        a = self.args
        return BlockPool(a.n_layers, a.n_kv_heads, a.head_dim, num_blocks=num_blocks, block_size=block_size,
                         dtype=self.dtype, device=self.device, growable=growable)

    def new_cache(self, capacity: int = 64, growth: int | None = None) -> KVCache:
        """A cache outside any budget (tests, tools, `generate`), in blocks of `growth` tokens, from a pool
        of the model's own that grows when full."""
        block_size = growth or DEFAULT_BLOCK_TOKENS
        pool = self._pools.get(block_size)
        if pool is None or pool.k.device != self.device or pool.k.dtype != self.dtype:
            pool = self._pools[block_size] = self.block_pool(64, block_size, growable=True)
        return KVCache(pool, capacity)

    @property
    def kv_bytes_per_token(self) -> int:
        a = self.args
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for the packed tokens ([num_tokens, vocab]) or only for `logit_rows` ([rows, vocab]).

        On a GPU nothing here waits for the device: every index is built on the host and copied from
        pinned memory asynchronously; the caller's `.cpu()` of the logits is the one synchronisation.
        Shapes follow the batch (rows, chunk, blocks), so CUDA graphs would need padded shape buckets:
        not done, a server of ragged batches would capture one graph per bucket.

        Writes every new token's keys/values into its session's cache but does not advance
        ``cache.length``: the caller commits what it keeps (see ``commit``).
        """
        pool = batch.caches[0].pool
        assert all(c.pool is pool for c in batch.caches), "one forward reads one block pool"
        ids = batch.tokens.tolist()
        for cache, start, n, lo in zip(batch.caches, batch.starts, batch.seq_lens, batch.offsets):
            if start + n > self.args.max_seq_len:
                raise ValueError(f"sequence of {start + n} tokens exceeds max_seq_len {self.args.max_seq_len}")
            cache.prepare_write(start, ids[lo: lo + n])
        layout = plan(batch.starts, batch.seq_lens, [list(c.blocks) for c in batch.caches], pool.block_size,
                      self.args.n_heads // self.args.n_kv_heads, self.dtype, self.device)
        tokens = to_device(batch.tokens, self.device)
        positions = to_device(batch.positions, self.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [num_tokens, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        x = self.embed_tokens(tokens)  # [num_tokens, dim]
        for layer in self.layers:
            x = layer(x, cos, sin, layout, pool, self.attend)
        if logit_rows is not None:
            x = x.index_select(0, to_device(logit_rows, self.device))
        return self.lm_head(self.norm(x)).float()


def use_column_major_weights(model: Transformer) -> None:
    """Lay every linear weight out column-major (shape [out, in] kept, strides (1, out)), on CPU.

    ``F.linear(x, W)`` with ``W`` laid out column-major runs as a plain ``x @ Wt`` GEMM, which CPU
    BLAS does up to ~1.7x faster than the row-major ``x @ W.T`` for the few-row inputs of decoding
    and verification (1-32 tokens); values are bit-for-bit the same weights. Shapes, names and
    ``state_dict`` keys are unchanged (tensors there are simply non-contiguous).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
        if model.args.tie_embeddings:  # the tied head is the embedding: keep them one tensor
            model.embed_tokens.weight = model.lm_head.weight


def commit(batch: RaggedBatch, kept: list[int]) -> None:
    """Advance each session's cache by the number of its new tokens it keeps; blocks filled under the
    committed length join the prefix cache."""
    for cache, start, n, keep in zip(batch.caches, batch.starts, batch.seq_lens, kept):
        assert 0 <= keep <= n, f"cannot keep {keep} of {n} new tokens"
        cache.truncate(start + keep)
        cache.seal()
