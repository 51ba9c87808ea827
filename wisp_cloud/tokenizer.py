"""The target's text conventions, read from its checkpoint: the token table (tokenizer.json, for the
vocabulary check and text decoding) and the chat template (which the edge renders with too)."""

from __future__ import annotations

import json
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


def chat_template_of(target_dir: Path) -> tuple[str, str, str]:
    """(jinja template, bos token, eos token) of a checkpoint; the edge renders chats with the same three."""
    config_path = target_dir / "tokenizer_config.json"
    special = json.loads(config_path.read_text()) if config_path.exists() else {}
    template_path = target_dir / "chat_template.jinja"
    template = template_path.read_text() if template_path.exists() else special.get("chat_template")
    if not template:
        raise ValueError(f"{target_dir} has no chat template (chat_template.jinja or tokenizer_config.json)")
    return template, special.get("bos_token") or "", special.get("eos_token") or ""
