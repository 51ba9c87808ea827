"""Paged KV memory: fixed-size blocks of keys and values, shared by every session, with a prefix cache.

One preallocated K and one V tensor hold every layer's blocks (``k[layer]``: [num_blocks, block_size,
kv_heads, head_dim], vLLM's layout), so a session's cache is only a list of block ids (its block table)
and growing it never copies anything. Block 0 is a null block, never handed out: padded block tables
point there.

Automatic prefix caching (vLLM's rule): a full block is keyed by a hash of its tokens and of every token
before it (the parent block's key), so equal prefixes map to equal keys whatever the session. A freed
block keeps its key and stays findable until it is handed out again, least recently freed first; a hit
takes the block back with a reference count, so shared blocks are never written (see `KVCache`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

NULL_BLOCK = 0


class KVPoolExhausted(RuntimeError):
    """No free block is left; the server's ledger evicts before a batch runs, so this means a bug there."""


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: its tokens and (through `parent`) all tokens before them."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 growable: bool = False) -> None:
        """`num_blocks` usable blocks (the null block comes on top). A `growable` pool (the model's own, for
        caches outside the server's budget) doubles its tensors when full; the server's never grows."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("a block pool needs at least one block of at least one token")
        self.block_size, self.growable = block_size, growable
        shape = (n_layers, num_blocks + 1, block_size, n_kv_heads, head_dim)
        # On CPU torch.empty: pages are only committed when first written, so a large budget costs nothing
        # until used, and a block is zeroed when first handed out (padding must never read NaN garbage).
        # A GPU commits its memory at once anyway: zero it all now, so no allocation indexes the device.
        lazy = torch.device(device).type == "cpu"
        make = torch.empty if lazy else torch.zeros
        self.k = make(shape, dtype=dtype, device=device)  # [layers, blocks, block_size, kv_heads, head_dim]
        self.v = make(shape, dtype=dtype, device=device)
        self.k[:, NULL_BLOCK] = 0
        self.v[:, NULL_BLOCK] = 0
        self._fresh = set(range(1, num_blocks + 1)) if lazy else set()  # never written: zero before first use
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks + 1))  # oldest first
        self._refs = [0] * (num_blocks + 1)
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._lock = threading.RLock()  # the forward thread allocates while the event loop evicts
        self.queries_tokens = 0  # prefix-cache lookups, in tokens (vLLM's counting)
        self.hits_tokens = 0

    # --- sizes -----------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1] - 1

    @property
    def bytes_per_token(self) -> int:
        k = self.k
        return 2 * k.element_size() * k.shape[0] * k.shape[3] * k.shape[4]

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def cached_blocks(self) -> int:
        return len(self._block_of)

    # --- allocation ------------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """`n` blocks for writing (reference count 1), least recently freed first; their old keys are dropped."""
        with self._lock:
            if n > len(self._free):
                if not self.growable:
                    raise KVPoolExhausted(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
                self._grow(n)
            blocks = []
            for _ in range(n):
                block, _ = self._free.popitem(last=False)
                self._forget_key(block)
                self._refs[block] = 1
                blocks.append(block)
            fresh = [b for b in blocks if b in self._fresh]
            if fresh:
                self._fresh.difference_update(fresh)
                self.k[:, fresh] = 0
                self.v[:, fresh] = 0
            return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds is free but keeps its key until reused."""
        with self._lock:
            for block in blocks:
                self._refs[block] -= 1
                assert self._refs[block] >= 0, f"block {block} freed twice"
                if self._refs[block] == 0:
                    self._free[block] = None

    def copy_on_write(self, block: int) -> int:
        """A private copy of a shared block (every layer), for a session about to overwrite part of it."""
        with self._lock:
            (copy,) = self.allocate(1)
            self.k[:, copy] = self.k[:, block]
            self.v[:, copy] = self.v[:, block]
            self.free([block])
            return copy

    def _grow(self, needed: int) -> None:
        old = self.num_blocks
        new = max(2 * old, old + needed)
        for name in ("k", "v"):
            t = getattr(self, name)
            grown = torch.empty((t.shape[0], new + 1, *t.shape[2:]), dtype=t.dtype, device=t.device)
            grown[:, : old + 1] = t
            setattr(self, name, grown)
        self._refs.extend([0] * (new - old))
        if self.k.device.type == "cpu":
            self._fresh.update(range(old + 1, new + 1))
        else:
            self.k[:, old + 1:] = 0
            self.v[:, old + 1:] = 0
        for b in range(old + 1, new + 1):
            self._free[b] = None

    # --- prefix cache ----------------------------------------------------------------------------------

    def register(self, block: int, key: bytes) -> None:
        """Make a full, written block findable by its key (a block already under that key wins)."""
        with self._lock:
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def unregister(self, block: int) -> None:
        """The block is about to be overwritten: it no longer holds what its key says."""
        with self._lock:
            self._forget_key(block)

    def match(self, tokens: list[int], max_blocks: int) -> tuple[list[int], list[bytes]]:
        """The longest run of cached full blocks that starts `tokens` (at most `max_blocks`), taken with a
        reference each, and their keys. Counts the lookup (all of `tokens`) and the hit."""
        bs = self.block_size
        blocks, keys, parent = [], [], b""
        with self._lock:
            for i in range(min(max_blocks, len(tokens) // bs)):
                key = block_key(parent, tokens[i * bs: (i + 1) * bs])
                block = self._block_of.get(key)
                if block is None:
                    break
                if self._refs[block] == 0:
                    del self._free[block]
                self._refs[block] += 1
                blocks.append(block)
                keys.append(key)
                parent = key
            self.queries_tokens += len(tokens)
            self.hits_tokens += len(blocks) * bs
        return blocks, keys

    def _forget_key(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
