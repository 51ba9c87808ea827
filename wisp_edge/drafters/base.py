"""The `Drafter` interface every on-device draft model implements (llama.cpp, onnxruntime).

A drafter holds one token sequence: the committed prefix followed by the tokens drafted this
round. `logits()` evaluates whatever was appended since the last call and returns the
next-token logits; `truncate(n)` rolls back to the first n tokens after a rejection. Choosing a
token from the logits (and reporting q) belongs to the caller, so every backend samples from
exactly the distribution it reports.

`reset(tokens)` keeps the cache of the longest prefix the drafter has already evaluated (a chat
client resends the whole conversation each turn), so only the new suffix is prefilled; backends
count both in a `PrefillCounters` (`counters`), which the edge exports to Prometheus.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Drafter(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def tokens(self) -> list[int]:
        """The current sequence: committed tokens plus this round's drafts."""
        ...

    def reset(self, tokens: list[int]) -> None:
        """Start a new sequence (a prompt), keeping the cache of its already evaluated prefix; nothing is
        evaluated until `logits()`."""
        ...

    def append(self, token: int) -> None:
        """Extend the sequence by one token (a draft or a committed token)."""
        ...

    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens; later evaluation overwrites the rest of the cache."""
        ...

    def logits(self) -> np.ndarray:
        """Next-token logits after the whole current sequence.  -> [vocab] float32"""
        ...

    def token_pieces(self) -> list[bytes]:
        """The raw bytes of every token id, for the vocabulary fingerprint and mismatch messages."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Text to ids the way the target's tokenizer does (no BOS added; special tokens parsed)."""
        ...

    def detokenize(self, ids: list[int]) -> str: ...


def common_prefix_len(a: list[int] | np.ndarray, b: list[int] | np.ndarray) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if differ.size else n


class PrefillCounters:
    """Tokens resets kept from the cache, and tokens the first evaluation after each reset prefilled.

    `reuse_prefix = False` makes every reset start from an empty cache, as before prefix reuse: the
    multi-turn benchmark's baseline (tools/bench_multiturn.py).
    """

    def __init__(self) -> None:
        self.prefill_tokens = 0
        self.prefix_reused_tokens = 0
        self.reuse_prefix = True
        self._pending = False

    def reusable(self, evaluated: list[int] | np.ndarray, tokens: list[int], *, logits_held: bool = False) -> int:
        """Cache positions a reset to `tokens` may keep: the prefix shared with `evaluated` (the cache's
        tokens), less its last token when the logits after it are not held, since the next draft reads
        them (that token is then evaluated again)."""
        if not self.reuse_prefix:
            return 0
        n = common_prefix_len(evaluated, tokens)
        if n == len(tokens) and not (logits_held and n == len(evaluated)):
            n = max(n - 1, 0)
        return n

    def reset(self, kept: int) -> None:
        self.prefix_reused_tokens += kept
        self._pending = True

    def evaluated(self, n: int) -> None:
        """Called by every evaluation with the tokens it ran: the first after a reset is the prefill."""
        if self._pending:
            self.prefill_tokens += n
            self._pending = False
