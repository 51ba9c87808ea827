"""Small real models for tests that need a vocabulary of a handful of tokens.

`tiny_target` is the compact transformer with random weights; `TableDrafter` is a bigram
drafter implementing the `Drafter` protocol in numpy; `TorchDrafter` lets a torch model draft
for itself (the round pattern is then known exactly).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from wisp_cloud.model.config import ModelArgs
from wisp_cloud.model.transformer import RaggedBatch, Transformer, commit


def tiny_target(vocab: int = 6, seed: int = 0, scale: float = 3.0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32,
                     max_seq_len=256, eos_token_ids=[])
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        model.lm_head.weight.mul_(scale)  # peaky enough that truncation (top-k/top-p) matters
    return model.eval()


class TableDrafter:
    """Next-token logits depend on the last token only (a bigram table)."""

    def __init__(self, vocab: int, seed: int = 1) -> None:
        self.table = np.random.default_rng(seed).normal(0, 1.5, (vocab, vocab)).astype(np.float32)
        self.name = "table"
        self._tokens: list[int] = []

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def reset(self, tokens):
        self._tokens = list(tokens)

    def append(self, token):
        self._tokens.append(int(token))

    def truncate(self, length):
        del self._tokens[length:]

    def logits(self):
        return self.table[self._tokens[-1]].copy()

    def token_pieces(self):
        return [f"t{i}".encode() for i in range(self.vocab_size)]

    def tokenize(self, text):
        return [int(x) for x in text.split()]

    def detokenize(self, ids):
        return " ".join(map(str, ids))


class SlowPrefillDrafter(TableDrafter):
    """A bigram drafter that takes `prefill_s` to evaluate a freshly reset sequence, as a small board
    takes seconds to prefill a long prompt (the engine then lets the verifier decode meanwhile)."""

    def __init__(self, vocab: int, seed: int = 1, prefill_s: float = 0.05) -> None:
        super().__init__(vocab, seed)
        self.prefill_s = prefill_s
        self._fresh = False

    def reset(self, tokens):
        super().reset(tokens)
        self._fresh = True

    def logits(self):
        if self._fresh:
            time.sleep(self.prefill_s)
            self._fresh = False
        return super().logits()


class TorchDrafter(TableDrafter):
    """The torch model drafting for itself, re-run from scratch each call (tiny models only)."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.name, self._tokens = model, "self", []

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    def logits(self):
        cache = self.model.new_cache()
        batch = RaggedBatch.single(self._tokens, cache)
        out = self.model(batch, logit_rows=torch.tensor([len(self._tokens) - 1]))[0]
        commit(batch, [len(self._tokens)])
        return out.numpy()
