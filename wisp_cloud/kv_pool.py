"""Per-session KV caches (torch tensors) under one memory budget, accounted by the `KVLedger` rules.

The pool makes each session's cache, growing in whole blocks so what a round will allocate is known
before it runs; all the bookkeeping (blocks held, least-recently-used order, whom to evict: never a
session that is queued or being verified) is the ledger's, which the simulator uses as well. An evicted
session loses its KV and its record; its edge resends the committed tokens and the session is
re-prefilled. Memory stays bounded by the budget whatever the number of sessions.
"""

from __future__ import annotations

from wisp_cloud.kv_ledger import KVLedger
from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import Transformer


class KVPool(KVLedger):
    def __init__(self, model: Transformer, budget_bytes: int, *, block_tokens: int = 64) -> None:
        super().__init__(int(budget_bytes), model.kv_bytes_per_token, block_tokens)
        self.model = model

    def new_cache(self, session_id: str) -> KVCache:
        """An empty cache (no memory yet) registered as most recently used."""
        cache = self.model.new_cache(capacity=0, growth=self.block_tokens)
        self.add(session_id, cache)
        return cache
