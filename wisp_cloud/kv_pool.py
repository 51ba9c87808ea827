"""Per-session KV caches under one memory budget, with least-recently-used eviction of idle sessions.

Caches grow in whole blocks, so the bytes a round will allocate are known before it runs: the
scheduler is told what is free, and the service evicts idle sessions (never one that is queued or
being verified) to make room. An evicted session loses its KV and its record; its edge resends
the committed tokens and the session is re-prefilled. Memory stays bounded by the budget whatever
the number of sessions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import Transformer


class KVPool:
    def __init__(self, model: Transformer, budget_bytes: int, *, block_tokens: int = 64) -> None:
        if budget_bytes <= 0 or block_tokens <= 0:
            raise ValueError("the KV budget and block size must be positive")
        self.model = model
        self.budget_bytes = int(budget_bytes)
        self.block_tokens = block_tokens
        self.bytes_per_token = model.kv_bytes_per_token
        self._caches: OrderedDict[str, KVCache] = OrderedDict()  # least recently used first
        self.evictions = 0

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._caches

    def __len__(self) -> int:
        return len(self._caches)

    @property
    def used_bytes(self) -> int:
        return sum(c.capacity for c in self._caches.values()) * self.bytes_per_token

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @property
    def capacity_tokens(self) -> int:
        return self.budget_bytes // self.bytes_per_token

    def blocks_bytes(self, tokens: int) -> int:
        """Bytes a cache of `tokens` positions occupies (whole blocks)."""
        return -(-tokens // self.block_tokens) * self.block_tokens * self.bytes_per_token

    def new_cache(self, session_id: str) -> KVCache:
        """An empty cache (no memory yet) registered as most recently used."""
        if session_id in self._caches:
            raise ValueError(f"session {session_id} already has a cache")
        cache = self.model.new_cache(capacity=0, growth=self.block_tokens)
        self._caches[session_id] = cache
        return cache

    def growth_bytes(self, cache: KVCache, total_tokens: int) -> int:
        """Extra bytes `cache` needs to hold `total_tokens` positions."""
        return (cache.planned_capacity(total_tokens) - cache.capacity) * self.bytes_per_token

    def touch(self, session_id: str) -> None:
        if session_id in self._caches:
            self._caches.move_to_end(session_id)

    def release(self, session_id: str) -> bool:
        """Free a session's cache (closed or evicted); False if it had none."""
        return self._caches.pop(session_id, None) is not None

    def lru(self) -> Iterator[str]:
        """Session ids, least recently used first (a snapshot, safe to release while iterating)."""
        return iter(list(self._caches))

    def evictable_bytes(self, busy: Callable[[str], bool]) -> int:
        return sum(c.capacity for sid, c in self._caches.items() if not busy(sid)) * self.bytes_per_token

    def evict_for(self, needed_bytes: int, busy: Callable[[str], bool]) -> list[str]:
        """Evict idle sessions, least recently used first, until `needed_bytes` are free; returns who went."""
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
