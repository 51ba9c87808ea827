"""The target's token table, read from its tokenizer.json (for the vocabulary check and text decoding)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return Tokenizer.from_file(str(path))


def target_token_pieces(model_dir: str | Path, vocab_size: int) -> list[str]:
    """Token strings in id order; ids the tokenizer does not define (padded vocabularies) map to ''."""
    tokenizer = load_tokenizer(model_dir)
    return [tokenizer.id_to_token(i) or "" for i in range(vocab_size)]
