"""The shipped target as Hugging Face transformers loads it: the reference that shares no code with the server.

Loaded once per test session (both lossless test modules use it).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tests.conftest import MODELS


@lru_cache(maxsize=1)
def hf_target():
    """(tokenizer with left padding, float32 model in eval mode) for models/target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODELS / "target", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(MODELS / "target", dtype=torch.float32).eval()
    return tokenizer, model


def chat_ids(tokenizer, chat: list[dict]) -> list[int]:
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def next_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """Next-token logits after each sequence, one unpadded forward each.  -> [len(seqs), vocab] float32"""
    with torch.inference_mode():
        return torch.stack([model(torch.tensor([s])).logits[0, -1].float() for s in seqs])
