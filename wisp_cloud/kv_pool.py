"""The server's KV memory: one paged `BlockPool` sized to the byte budget, accounted by the `KVLedger` rules.

The budget is a number of blocks, preallocated once; each session's cache is a block table into it, so
growth never copies and eviction returns blocks. All the bookkeeping (blocks held, least-recently-used
order, whom to evict: never a session that is queued or being verified) is the ledger's, which the
simulator uses as well. An evicted session loses its record and its blocks, but the blocks keep their
prefix-cache keys until reused: its edge resends the committed tokens, and the re-prefill finds most of
them cached. Memory stays bounded by the budget whatever the number of sessions.
"""

from __future__ import annotations

from collections.abc import Hashable

from wisp_cloud.kv_ledger import KVLedger
from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import Transformer


class KVPool(KVLedger):
    def __init__(self, model: Transformer, budget_bytes: int, *, block_tokens: int = 16) -> None:
        super().__init__(int(budget_bytes), model.kv_bytes_per_token, block_tokens)
        num_blocks = int(budget_bytes) // (block_tokens * model.kv_bytes_per_token)
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {block_tokens} tokens")
        self.blocks = model.block_pool(num_blocks, block_tokens)
        self.model = model

    @property
    def used_bytes(self) -> int:
        """Blocks in use, each counted once however many sessions share it through the prefix cache."""
        return self.blocks.used_blocks * self.blocks.block_bytes

    def new_cache(self, session_id: str) -> KVCache:
        """An empty cache (no blocks yet) registered as most recently used."""
        cache = KVCache(self.blocks)
        self.add(session_id, cache)
        return cache

    def release(self, session_id: Hashable) -> bool:
        """Forget a session's cache and give its blocks back (they stay in the prefix cache until reused)."""
        cache = self._holders.get(session_id)
        if cache is not None:
            cache.free()
        return super().release(session_id)
