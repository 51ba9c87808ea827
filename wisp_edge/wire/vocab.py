"""Vocabulary identity: token ids cross the wire, so drafter and target must share one token table.

The fingerprint is a sha256 over the length-prefixed token strings in id order; both sides
compute it from their own table (llama.cpp's token texts on the edge, tokenizer.json on the
server), and a mismatch is refused with the first differing token named.
"""

from __future__ import annotations

import hashlib


class VocabMismatchError(ValueError):
    """Drafter and target tokenize differently; speculative decoding between them would be garbage."""


def _as_text(piece: bytes | str) -> str:
    return piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else piece


def fingerprint(pieces: list[bytes] | list[str]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        data = _as_text(piece).encode("utf-8")
        digest.update(len(data).to_bytes(4, "little"))
        digest.update(data)
    return f"{len(pieces)}:{digest.hexdigest()[:32]}"


def check_same_vocab(drafter: list[bytes] | list[str], target: list[bytes] | list[str], *,
                     drafter_name: str = "drafter", target_name: str = "target") -> None:
    """Raise VocabMismatchError naming both sizes and the first differing token."""
    if len(drafter) == len(target) and fingerprint(drafter) == fingerprint(target):
        return
    first = next((i for i, (a, b) in enumerate(zip(drafter, target)) if _as_text(a) != _as_text(b)),
                 min(len(drafter), len(target)))
    left = _as_text(drafter[first]) if first < len(drafter) else "<none>"
    right = _as_text(target[first]) if first < len(target) else "<none>"
    raise VocabMismatchError(
        f"vocabulary mismatch: {drafter_name} has {len(drafter)} tokens, {target_name} has {len(target)}; "
        f"first difference at id {first}: {left!r} vs {right!r}")
