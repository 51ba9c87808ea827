"""How a ragged batch is cut into attention rows: shared by the forward and the time estimator.

The paged attention (`model/paged_attention.py`) runs the whole batch in one call per layer: each request's
new tokens are cut into rows of `chunk` queries, every row gathers its session's keys, and all rows are
padded to the longest row's keys. The forward's attention cost therefore depends on the batch as a whole
(its longest context and its chunk), not on each request alone, and the estimator prices it with the
same layout (`padded_layout`). Pure: plain numbers, no torch.
"""

from __future__ import annotations

from typing import Sequence

GATHER_COST_QUERIES = 16  # the cost of gathering one row's keys, in padded query rows (rough, measured)


def choose_chunk(seq_lens: Sequence[int]) -> int:
    """Queries per row: the power of two (or the longest sequence) that minimises rows * (chunk + gather)."""
    longest = max(seq_lens)
    candidates = {longest} | {1 << i for i in range(longest.bit_length()) if (1 << i) < longest}

    def cost(chunk: int) -> int:
        return sum(-(-n // chunk) for n in seq_lens) * (chunk + GATHER_COST_QUERIES)

    return min(sorted(candidates, reverse=True), key=cost)


class LayoutTally:
    """The layout of a batch being formed, one request at a time: for every power-of-two chunk the rows it
    would take, so adding a request (or pricing one before adding it) costs O(log longest block), and the
    answer is exactly `choose_chunk`'s (same candidates, same tie-break: the larger chunk)."""

    POWERS = 16  # chunks 1 .. 2^15, far beyond any block or prompt

    def __init__(self) -> None:
        self.requests = 0
        self.longest = 0  # the longest block (new tokens)
        self.keys = 0  # the longest context
        # extra_at[i]: sum over requests of ceil(n / 2^i) - 1, so rows at chunk 2^i = requests + extra_at[i]
        # (a request of n <= 2^i tokens is one row: decode steps and short blocks touch nothing here)
        self.extra_at = [0] * self.POWERS

    def add(self, new_tokens: int, total_len: int) -> None:
        if new_tokens <= 0:
            return
        self.requests += 1
        self.longest, self.keys = max(self.longest, new_tokens), max(self.keys, total_len)
        for i in range(min((new_tokens - 1).bit_length(), self.POWERS)):
            self.extra_at[i] += (-(-new_tokens >> i)) - 1  # ceil(n / 2^i) - 1

    def layout(self, new_tokens: int = 0, total_len: int = 0) -> tuple[int, int, int]:
        """(rows, chunk, keys) of the batch, with one more request of `new_tokens` / `total_len` when given."""
        requests, longest, keys = self.requests, self.longest, self.keys
        if new_tokens > 0:
            requests, longest, keys = requests + 1, max(longest, new_tokens), max(keys, total_len)
        if requests == 0:
            return 0, 0, 0
        best = (requests * (longest + GATHER_COST_QUERIES), longest, requests)  # chunk = the longest: a row each
        for i in reversed(range(min(longest.bit_length(), self.POWERS))):  # larger chunks first
            chunk = 1 << i
            if chunk >= longest:
                continue
            rows = requests + self.extra_at[i] + ((-(-new_tokens >> i)) - 1 if new_tokens > 0 else 0)
            cost = rows * (chunk + GATHER_COST_QUERIES)
            if cost < best[0]:  # strictly: a tie keeps the larger chunk, as choose_chunk
                best = (cost, chunk, rows)
        _, chunk, rows = best
        return rows, chunk, keys


def padded_layout(new_tokens: Sequence[int], cached_tokens: Sequence[int]) -> tuple[int, int, int]:
    """(rows, chunk, keys) of one forward: rows of `chunk` query slots, each padded to `keys` keys (the
    longest row's context). Requests with no new token (none in a forward) add no row."""
    tally = LayoutTally()
    for n, c in zip(new_tokens, cached_tokens):
        tally.add(n, n + c)
    return tally.layout()
