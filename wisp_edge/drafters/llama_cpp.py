"""The llama.cpp drafter: any GGUF model run by llama-cpp-python, drafting one token at a time.

Only the last position's logits are kept (``logits_all=False``), read straight from the context
with ``llama_get_logits_ith(ctx, -1)``; sampling is done by the caller in numpy, never by
``Llama.sample()`` (whose default top-k/top-p/min-p would silently change q). Rollback sets
``Llama.n_tokens``: llama.cpp then overwrites the stale KV entries on the next eval, which gives
bit-identical results to a fresh run. A reset keeps the KV of the prefix it shares with what was
evaluated and removes the positions after it (``llama_memory_seq_rm``), so a chat's next turn
prefills only its new tokens.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from wisp_edge.drafters.base import PrefillCounters

DRAFTER_BUILD_HINT = "python tools/build_models.py"


class LlamaCppDrafter:
    def __init__(self, model_path: str | Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 f32_kv: bool = False, name: str | None = None) -> None:
        model_path = Path(model_path)
        if not model_path.exists():
            raise FileNotFoundError(f"drafter model not found: {model_path}; build the shipped models with "
                                    f"`{DRAFTER_BUILD_HINT}`")
        import llama_cpp

        self._lib = llama_cpp
        kwargs = {}
        if f32_kv:  # float32 KV cache: logits then match a float32 torch reference to ~1e-6
            kwargs.update(type_k=0, type_v=0)
        self._llm = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=False,
            n_threads=n_threads or max(1, min(4, os.cpu_count() or 1)), verbose=False, **kwargs)
        self.name = name or model_path.stem
        self.model_path = model_path
        self._tokens: list[int] = []
        self.counters = PrefillCounters()

    @property
    def vocab_size(self) -> int:
        return self._llm.n_vocab()

    def offline_info(self) -> dict:
        """What the agent needs when no verifier can tell it: EOS and the chat template in the GGUF."""
        template = self._llm.metadata.get("tokenizer.chat_template")
        return {"eos_token_ids": [int(self._llm.token_eos())], "chat_template": template,
                "bos_token": self.detokenize([int(self._llm.token_bos())]) if template else None,
                "eos_token": self.detokenize([int(self._llm.token_eos())]) if template else None}

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def reset(self, tokens: list[int]) -> None:
        self._tokens = [int(t) for t in tokens]
        llm = self._llm
        keep = self.counters.reusable(llm.input_ids[:llm.n_tokens], self._tokens)
        memory = self._lib.llama_get_memory(llm.ctx)
        if not self._lib.llama_memory_seq_rm(memory, 0, keep, -1):  # a model whose cache cannot be cut
            self._lib.llama_memory_clear(memory, True)
            keep = 0
        llm.n_tokens = keep
        self.counters.reset(keep)

    def append(self, token: int) -> None:
        self._tokens.append(int(token))

    def truncate(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot truncate a sequence of {len(self._tokens)} tokens to {length}")
        del self._tokens[length:]
        self._llm.n_tokens = min(self._llm.n_tokens, length)

    def logits(self) -> np.ndarray:
        if not self._tokens:
            raise ValueError("the drafter has no tokens: call reset() with a non-empty prompt first")
        if len(self._tokens) > self.n_ctx:
            raise ValueError(f"sequence of {len(self._tokens)} tokens exceeds the drafter's context {self.n_ctx}")
        evaluated = self._llm.n_tokens
        if evaluated == len(self._tokens):  # nothing new: re-evaluate the last token to get its logits
            evaluated -= 1
            self._llm.n_tokens = evaluated
        self._llm.eval(self._tokens[evaluated:])
        self.counters.evaluated(len(self._tokens) - evaluated)
        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).astype(np.float32, copy=True)

    def token_pieces(self) -> list[bytes]:
        vocab = self._lib.llama_model_get_vocab(self._llm.model)
        out = []
        for i in range(self.vocab_size):
            text = self._lib.llama_vocab_get_text(vocab, i)
            out.append(text if isinstance(text, bytes) else bytes(text or b""))
        return out

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: list[int]) -> str:
        # Piece by piece with a buffer sized to the piece: Llama.detokenize's fixed 32-byte buffer
        # silently drops longer pieces (long whitespace runs, code indentation).
        vocab = self._lib.llama_model_get_vocab(self._llm.model)
        out = bytearray()
        for token in ids:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self._lib.llama_token_to_piece(vocab, int(token), buf, size, 0, True)
                if n >= 0:
                    out += buf.raw[:n]
                    break
                size = -n  # a negative result is the size the piece needs
        return out.decode("utf-8", errors="replace")

    def close(self) -> None:
        self._llm.close()
