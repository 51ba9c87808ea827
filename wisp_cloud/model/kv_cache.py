"""One session's key/value cache: a block table into a shared `BlockPool`, indexed by position.

A forward writes the keys and values of its new tokens at ``length .. length + n``; the verifier then
sets ``length`` to the accepted prefix, and rejected positions are simply overwritten by the next round
(gpt-fast's trick). Growing allocates whole blocks and never copies: only the block table grows.

The cache remembers the tokens it holds, so each block that fills up under a committed length is
published to the pool's prefix cache (`seal`), and a new session whose prompt starts the same way takes
those blocks instead of recomputing them (`reuse_prefix`). Blocks another session also holds are never
written: a write into one gets a private copy first.
"""

from __future__ import annotations

from wisp_cloud.model.block_pool import BlockPool, block_key


class KVCache:
    def __init__(self, pool: BlockPool, capacity: int = 0) -> None:
        self.pool = pool
        self.blocks: list[int] = []  # the block table: position p lives in blocks[p // block_size]
        self.length = 0  # positions 0..length-1 hold valid keys/values
        self.token_ids: list[int | None] = []  # the token written at each position (None: unknown)
        self.keys: list[bytes] = []  # prefix-cache keys of the leading blocks already published
        self.reserve(capacity)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    @property
    def bytes_per_position(self) -> int:
        return self.pool.bytes_per_token

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_position

    def planned_capacity(self, total: int, current: int | None = None) -> int:
        """The capacity `reserve(total)` ends with (whole blocks)."""
        current = self.capacity if current is None else current
        if total <= current:
            return current
        return -(-total // self.block_size) * self.block_size

    def reserve(self, total: int) -> None:
        """Make room for `total` positions: new blocks at the end of the table, nothing copied."""
        missing = -(-total // self.block_size) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(self.pool.allocate(missing))

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` positions (keys beyond are overwritten later)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"cannot truncate cache of capacity {self.capacity} to {length}")
        self.length = length
        del self.token_ids[length:]

    def prepare_write(self, start: int, tokens: list[int]) -> None:
        """Before a forward writes `tokens` at `start..`: room for them, and every block they touch private
        (a shared block is copied, a published one unpublished: its content is about to change)."""
        end = start + len(tokens)
        self.reserve(end)
        first, last = start // self.block_size, (end - 1) // self.block_size
        refs = self.pool._refs
        for i in range(first, min(last + 1, len(self.keys))):
            if refs[self.blocks[i]] > 1:
                self.blocks[i] = self.pool.copy_on_write(self.blocks[i])
            else:
                self.pool.unregister(self.blocks[i])
        for i in range(len(self.keys), last + 1):  # a block adopted without a key is shared all the same
            if refs[self.blocks[i]] > 1:
                self.blocks[i] = self.pool.copy_on_write(self.blocks[i])
        del self.keys[first:]
        if start > len(self.token_ids):
            self.token_ids.extend([None] * (start - len(self.token_ids)))
        self.token_ids[start:] = tokens

    def seal(self) -> None:
        """Publish each full block under the committed length that is not published yet."""
        bs = self.block_size
        while (len(self.keys) + 1) * bs <= self.length:
            i = len(self.keys)
            tokens = self.token_ids[i * bs: (i + 1) * bs]
            if len(tokens) < bs or None in tokens:
                return
            key = block_key(self.keys[-1] if self.keys else b"", tokens)  # type: ignore[arg-type]
            self.pool.register(self.blocks[i], key)
            self.keys.append(key)

    def reuse_prefix(self, tokens: list[int], *, keep_last: bool) -> int:
        """Start an empty cache from the pool's cached blocks for the leading full blocks of `tokens`; returns
        how many positions it now holds. `keep_last`: leave at least the last token to be computed (its
        logits are needed)."""
        assert not self.blocks and self.length == 0, "reuse a prefix only in an empty cache"
        usable = len(tokens) - (1 if keep_last else 0)
        blocks, keys = self.pool.match(tokens, usable // self.block_size)
        self.blocks, self.keys = blocks, keys
        self.length = len(blocks) * self.block_size
        self.token_ids = list(tokens[: self.length])
        return self.length

    def reset(self) -> None:
        """Give every block back (they stay in the prefix cache until reused) and hold nothing."""
        blocks, self.blocks = self.blocks, []
        self.length, self.token_ids, self.keys = 0, [], []
        if blocks:
            self.pool.free(blocks)

    free = reset

    def __del__(self) -> None:
        # Caches made outside the server's pool (tests, tools, generate) are simply dropped: give their
        # blocks back then. Reference counting runs this where the last reference goes, never inside
        # the pool's own methods.
        try:
            self.reset()
        except Exception:  # interpreter shutdown
            pass
