"""KV bookkeeping, pure: whole blocks per session under one byte budget, least recently used first.

Caches grow in whole blocks, so what a round will allocate is known before it runs (`growth_bytes`);
queued work reserves those bytes until it runs, so a newcomer cannot be promised them. Idle sessions are
evicted least recently used first to make room; who is out of reach (busy, recently active) is the
caller's predicate. A holder is anything with a `capacity` in positions: the torch pool registers its
KVCache objects, the simulator a stand-in, so both account for memory by the same rules.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any


class KVLedger:
    def __init__(self, budget_bytes: float, bytes_per_token: int, block_tokens: int) -> None:
        if budget_bytes <= 0 or block_tokens <= 0:
            raise ValueError("the KV budget and block size must be positive")
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.block_tokens = block_tokens
        self._holders: OrderedDict[Hashable, Any] = OrderedDict()  # least recently used first
        self._reserved: dict[Hashable, int] = {}  # queued job -> bytes it will allocate
        self.evictions = 0

    def __contains__(self, session_id: Hashable) -> bool:
        return session_id in self._holders

    def __len__(self) -> int:
        return len(self._holders)

    @property
    def used_bytes(self) -> int:
        return sum(h.capacity for h in self._holders.values()) * self.bytes_per_token

    @property
    def free_bytes(self) -> float:
        return self.budget_bytes - self.used_bytes

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    @property
    def capacity_tokens(self) -> int:
        return int(self.budget_bytes // self.bytes_per_token)

    def planned_capacity(self, capacity: int, total_tokens: int) -> int:
        """The capacity, in whole blocks, a holder of `capacity` positions needs for `total_tokens`."""
        if total_tokens <= capacity:
            return capacity
        return -(-total_tokens // self.block_tokens) * self.block_tokens

    def blocks_bytes(self, tokens: int) -> int:
        """Bytes a cache of `tokens` positions occupies (whole blocks)."""
        return self.planned_capacity(0, tokens) * self.bytes_per_token

    def growth_bytes(self, holder: Any, total_tokens: int) -> int:
        """Extra bytes `holder` allocates to hold `total_tokens` positions."""
        return (self.planned_capacity(holder.capacity, total_tokens) - holder.capacity) * self.bytes_per_token

    def add(self, session_id: Hashable, holder: Any) -> None:
        """Register a session's cache as the most recently used."""
        if session_id in self._holders:
            raise ValueError(f"session {session_id} already has a cache")
        self._holders[session_id] = holder

    def touch(self, session_id: Hashable) -> None:
        if session_id in self._holders:
            self._holders.move_to_end(session_id)

    def release(self, session_id: Hashable) -> bool:
        """Forget a session's cache (closed or evicted); False if it had none."""
        return self._holders.pop(session_id, None) is not None

    def lru(self) -> Iterator[Hashable]:
        """Session ids, least recently used first (a snapshot, safe to release while iterating)."""
        return iter(list(self._holders))

    def reserve(self, job_id: Hashable, nbytes: int) -> None:
        self._reserved[job_id] = nbytes

    def unreserve(self, job_id: Hashable) -> None:
        self._reserved.pop(job_id, None)

    def evictable_bytes(self, busy: Callable[[Hashable], bool]) -> int:
        """Bytes held by sessions out of use (`busy`: the ones out of reach)."""
        return sum(h.capacity for sid, h in self._holders.items() if not busy(sid)) * self.bytes_per_token

    def evict_for(self, needed_bytes: float, busy: Callable[[Hashable], bool]) -> list[Hashable]:
        """Evict sessions out of use, least recently used first, until `needed_bytes` are free; returns who went."""
        evicted = []
        for session_id in self.lru():
            if self.free_bytes >= needed_bytes:
                break
            if busy(session_id):
                continue
            self.release(session_id)
            self.evictions += 1
            evicted.append(session_id)
        return evicted
