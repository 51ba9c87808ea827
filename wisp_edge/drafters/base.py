"""The `Drafter` interface every on-device draft model implements (llama.cpp, onnxruntime).

A drafter holds one token sequence: the committed prefix followed by the tokens drafted this
round. `logits()` evaluates whatever was appended since the last call and returns the
next-token logits; `truncate(n)` rolls back to the first n tokens after a rejection. Choosing a
token from the logits (and reporting q) belongs to the caller, so every backend samples from
exactly the distribution it reports.
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
        """Start a new sequence (a prompt); nothing is evaluated until `logits()`."""
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
