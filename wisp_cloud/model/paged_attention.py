"""Attention over a whole ragged batch in one call per layer, reading keys and values through block tables.

The batch (prefills, resumes, verify blocks, decode steps, mixed) is cut into *rows*: each row is up to
`chunk` consecutive query tokens of one session, and reads that session's blocks. Per layer: one
`index_copy_` writes the new keys/values into their slots, one gather pulls each row's blocks into a
padded [rows, kv_heads, keys, head_dim] tensor, and one `scaled_dot_product_attention` runs every row at
once under an additive mask (causal within the session, padding hidden). Everything positional is built
once per forward (`plan`) and shared by all layers.

Why this kernel (measured by `tools/bench_server.py`, its `attention_kernels` entry, against the same
gathered batch with scores, softmax and sum as plain ops, and against one SDPA per session): on CPU, SDPA
with a mask takes PyTorch's fused flash kernel for 4-D inputs and was the fastest of the three. Gathers
use `index_select`: advanced indexing (`k_cache[table]`) copies element by element on CPU, ~15x slower.
FlexAttention with a block mask was not taken: on CPU it needs `torch.compile` (eager it is a slow
reference), whose compile time and shape specialisation a server of ragged batches of every shape
cannot pay per batch. On CUDA the same gathered SDPA runs PyTorch's memory-efficient kernel, which
takes the additive mask; a varlen flash kernel reading the block tables would skip the gather, but no
GPU was available to measure one, so the portable path is the only one.

The chunk trades padding against gathering: a long prefill cut into rows of `chunk` queries pads decode
rows less, but every row re-gathers its session's keys. `choose_chunk` (`wisp_cloud/attention_rows.py`, which
the time estimator prices the layout with) minimises rows * (chunk + c).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wisp_cloud.attention_rows import choose_chunk
from wisp_cloud.model.block_pool import NULL_BLOCK


@dataclass
class PagedLayout:
    """Where a forward's new keys go and what each padded query row reads, for every layer."""

    slots: torch.Tensor  # [num_tokens] flat slot (block * block_size + offset) of each new token's K/V
    block_table: torch.Tensor  # [rows, max_blocks] the blocks each row reads (null block as padding)
    query_index: torch.Tensor  # [rows * chunk] the packed token in each padded query slot (0 for padding)
    out_index: torch.Tensor  # [num_tokens] each token's slot among rows * chunk
    mask: torch.Tensor  # [rows, 1, group * chunk, max_blocks * block_size] additive, 0 / -inf
    chunk: int
    # for the per-session reference path
    starts: list[int]
    seq_lens: list[int]
    tables: list[list[int]]


def plan(starts: list[int], seq_lens: list[int], tables: list[list[int]], block_size: int, group: int,
         dtype: torch.dtype, device: torch.device) -> PagedLayout:
    """The layout of one ragged forward: built on the host with numpy, moved to the device in one go each."""
    chunk = choose_chunk(seq_lens)
    offsets = np.concatenate([[0], np.cumsum(seq_lens)])
    rows = []  # (session, first query, count)
    for i, n in enumerate(seq_lens):
        rows.extend((i, lo, min(chunk, n - lo)) for lo in range(0, n, chunk))
    n_rows = len(rows)
    key_ends = [starts[i] + lo + cnt for i, lo, cnt in rows]
    max_blocks = max(-(-e // block_size) for e in key_ends)
    block_table = np.full((n_rows, max_blocks), NULL_BLOCK, dtype=np.int64)
    query_index = np.zeros((n_rows, chunk), dtype=np.int64)
    query_pos = np.zeros((n_rows, chunk), dtype=np.int64)  # padding queries see key 0 only: no empty row
    out_index = np.empty(int(offsets[-1]), dtype=np.int64)
    for r, ((i, lo, cnt), end) in enumerate(zip(rows, key_ends)):
        nb = -(-end // block_size)
        block_table[r, :nb] = tables[i][:nb]
        first = offsets[i] + lo
        query_index[r, :cnt] = np.arange(first, first + cnt)
        query_pos[r, :cnt] = np.arange(starts[i] + lo, starts[i] + lo + cnt)
        out_index[first: first + cnt] = np.arange(r * chunk, r * chunk + cnt)
    slots = np.concatenate([
        np.asarray(tables[i], dtype=np.int64)[(p := np.arange(s, s + n)) // block_size] * block_size + p % block_size
        for i, (s, n) in enumerate(zip(starts, seq_lens))])
    keys = np.arange(max_blocks * block_size)
    hidden = keys[None, None, :] > query_pos[:, :, None]  # [rows, chunk, keys]
    mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(torch.from_numpy(hidden), float("-inf"))
    # grouped-query layout: the `group` query heads sharing a kv head are stacked head-major
    mask = mask[:, None].expand(n_rows, group, chunk, mask.shape[-1]).reshape(n_rows, 1, group * chunk, -1)

    def to(a) -> torch.Tensor:
        return to_device(torch.from_numpy(a) if isinstance(a, np.ndarray) else a, device)

    return PagedLayout(to(slots), to(block_table), to(query_index.reshape(-1)), to(out_index), to(mask), chunk,
                       list(starts), list(seq_lens), tables)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, asynchronously: the host never waits."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             layout: PagedLayout) -> None:
    """Store the new tokens' keys/values in their slots (k_cache: [blocks, block_size, kv_heads, head_dim])."""
    kv, hd = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv, hd).index_copy_(0, layout.slots, k)
    v_cache.view(-1, kv, hd).index_copy_(0, layout.slots, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    layout: PagedLayout) -> torch.Tensor:
    """Attention of every packed query (q: [num_tokens, n_heads, head_dim]) in one SDPA call; returns
    [num_tokens, n_heads * head_dim]."""
    _, bs, kv, hd = k_cache.shape
    n_heads = q.shape[1]
    group = n_heads // kv
    rows, chunk = layout.block_table.shape[0], layout.chunk
    # index_select, not k_cache[table]: on CPU advanced indexing copies element-wise, ~15x slower here
    table = layout.block_table.view(-1)
    keys = k_cache.index_select(0, table).view(rows, -1, kv, hd).transpose(1, 2)  # [rows, kv, keys, hd]
    values = v_cache.index_select(0, table).view(rows, -1, kv, hd).transpose(1, 2)
    query = q.index_select(0, layout.query_index).view(rows, chunk, kv, group, hd)
    query = query.permute(0, 2, 3, 1, 4).reshape(rows, kv, group * chunk, hd)  # [rows, kv, group*chunk, hd]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=layout.mask)
    out = out.view(rows, kv, group, chunk, hd).permute(0, 3, 1, 2, 4).reshape(rows * chunk, n_heads * hd)
    return out.index_select(0, layout.out_index)


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        layout: PagedLayout) -> torch.Tensor:
    """The per-session path (one SDPA per session over its own blocks): what the tests compare against."""
    _, bs, kv, hd = k_cache.shape
    n_heads = q.shape[1]
    group = n_heads // kv
    outs, lo = [], 0
    for start, n, table in zip(layout.starts, layout.seq_lens, layout.tables):
        end = start + n
        blocks = torch.tensor(table[: -(-end // bs)], device=q.device)
        keys = k_cache[blocks].reshape(-1, kv, hd)[:end].transpose(0, 1)[None]  # [1, kv, end, hd]
        values = v_cache[blocks].reshape(-1, kv, hd)[:end].transpose(0, 1)[None]
        query = q[lo: lo + n].transpose(0, 1).reshape(1, kv, group * n, hd)
        hidden = torch.arange(end, device=q.device)[None, :] > torch.arange(start, end, device=q.device)[:, None]
        mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask.repeat(group, 1))
        outs.append(out.view(n_heads, n, hd).transpose(0, 1).reshape(n, n_heads * hd))
        lo += n
    return torch.cat(outs)
