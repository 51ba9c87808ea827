"""One session's key/value cache, indexed by position so that rollback is free.

A forward pass writes the keys and values of its new tokens at ``length .. length + n``; the
verifier then sets ``length`` to the accepted prefix, and rejected positions are simply
overwritten by the next round (gpt-fast's trick). Capacity grows by doubling, or in whole blocks
of ``growth`` positions when a memory pool needs to know exactly what a round will allocate.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", capacity: int = 64, growth: int | None = None) -> None:
        self.growth = growth
        capacity = self.planned_capacity(capacity, 0)
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, kv_heads, capacity, head_dim]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions 0..length-1 hold valid keys/values

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.element_size() * self.k.nelement() * 2

    @property
    def bytes_per_position(self) -> int:
        return self.k.element_size() * self.k.shape[0] * self.k.shape[1] * self.k.shape[3] * 2

    def planned_capacity(self, total: int, current: int | None = None) -> int:
        """The capacity `reserve(total)` ends with."""
        current = self.capacity if current is None else current
        if total <= current:
            return current
        if self.growth:
            return -(-total // self.growth) * self.growth
        return max(total, 2 * current)

    def reserve(self, total: int) -> None:
        """Make room for `total` positions, keeping the valid prefix."""
        if total <= self.capacity:
            return
        new_capacity = self.planned_capacity(total)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], new_capacity, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` positions (keys beyond are overwritten later)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"cannot truncate cache of capacity {self.capacity} to {length}")
        self.length = length
