"""The llama.cpp drafter: any GGUF model run by llama-cpp-python, drafting one token at a time.

Only the last position's logits are kept (``logits_all=False``), read straight from the context
with ``llama_get_logits_ith(ctx, -1)``; sampling is done by the caller in numpy, never by
``Llama.sample()`` (whose default top-k/top-p/min-p would silently change q). Rollback sets
``Llama.n_tokens``: llama.cpp then overwrites the stale KV entries on the next eval, which gives
bit-identical results to a fresh run. A reset keeps the KV of the prefix it shares with what was
evaluated and removes the positions after it (``llama_memory_seq_rm``), so a chat's next turn
prefills only its new tokens. With `state_cache` > 0 the caches of that many other conversations are
kept (``llama_state_seq_get_data``, only sequence 0's KV) and loaded back when their chat goes on.

llama.cpp allocates (and clears) the KV cache of the whole context up front, so the drafter starts with
a context for a chat's first turns (`INITIAL_CTX`, a quarter of the 4,096 default's KV memory) and swaps
in a larger one, up to `n_ctx`, when a sequence outgrows it: same model (tokenizing from other threads
stays safe), the cache carried over by the same sequence-state copy.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from wisp_edge.drafters.base import PrefillCounters
from wisp_edge.drafters.saved_states import Saved, SavedStates

DRAFTER_BUILD_HINT = "python tools/build_models.py"
INITIAL_CTX = 1024


class LlamaCppDrafter:
    def __init__(self, model_path: str | Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 f32_kv: bool = False, name: str | None = None, state_cache: int = 0) -> None:
        model_path = Path(model_path)
        if not model_path.exists():
            raise FileNotFoundError(f"drafter model not found: {model_path}; build the shipped models with "
                                    f"`{DRAFTER_BUILD_HINT}`")
        import llama_cpp

        self._lib = llama_cpp
        kwargs = {}
        if f32_kv:  # float32 KV cache: logits then match a float32 torch reference to ~1e-6
            kwargs.update(type_k=0, type_v=0)
        self._max_ctx = n_ctx
        initial = min(n_ctx, INITIAL_CTX)
        self._llm = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=initial, n_batch=min(512, initial), logits_all=False,
            n_threads=n_threads or max(1, min(4, os.cpu_count() or 1)), verbose=False, **kwargs)
        self.name = name or model_path.stem
        self.model_path = model_path
        self._tokens: list[int] = []
        self.counters = PrefillCounters()
        self.saved = SavedStates(state_cache)

    def _fit(self, length: int) -> None:
        """Swap in a larger context (at least double, at most n_ctx) when `length` tokens outgrow this one,
        carrying the cache over. Internals of llama-cpp-python 0.3 (`_ctx`, `_model`, `context_params`)."""
        llm = self._llm
        if length <= llm.n_ctx() or llm.n_ctx() >= self.n_ctx:  # fits, or too long for any context (logits raises)
            return
        cache = Saved(llm.input_ids[:llm.n_tokens].tolist(), self._snapshot())
        size = min(self.n_ctx, max(length, 2 * llm.n_ctx()))
        llm._ctx.close()  # first, so that the two caches are never held at once
        llm.context_params.n_ctx = size
        llm._ctx = self._lib._internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
        llm._n_ctx, llm.input_ids, llm.n_tokens = size, np.zeros(size, dtype=np.intc), 0
        if cache.state is not None:
            self._load(cache)

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
        """The longest sequence the drafter takes (its context grows to it on demand)."""
        return max(self._max_ctx, self._llm.n_ctx())

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def reset(self, tokens: list[int]) -> None:
        self._tokens = [int(t) for t in tokens]
        self._fit(len(self._tokens))
        llm = self._llm
        evaluated = llm.input_ids[:llm.n_tokens].tolist()
        keep = self.counters.reusable(evaluated, self._tokens)
        saved = self.saved.switch(evaluated, self._tokens, keep, self.counters.reusable, self._snapshot)
        if saved is not None:
            keep = self._load(saved)
        memory = self._lib.llama_get_memory(llm.ctx)
        if not self._lib.llama_memory_seq_rm(memory, 0, keep, -1):  # a model whose cache cannot be cut
            self._lib.llama_memory_clear(memory, True)
            keep = 0
        llm.n_tokens = keep
        self.counters.reset(keep)

    def _snapshot(self) -> ctypes.Array | None:
        """A copy of sequence 0's cache, or None if llama.cpp could not write it."""
        size = self._lib.llama_state_seq_get_size(self._llm.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        return buf if size and self._lib.llama_state_seq_get_data(self._llm.ctx, buf, size, 0) == size else None

    def _load(self, saved: Saved) -> int:
        """Replace the cache with a saved one; the positions the reset keeps (0 if llama.cpp refused it)."""
        n = len(saved.tokens)
        if not self._lib.llama_state_seq_set_data(self._llm.ctx, saved.state, len(saved.state), 0):
            self._lib.llama_memory_clear(self._lib.llama_get_memory(self._llm.ctx), True)
            self._llm.n_tokens = 0
            return 0
        self._llm.input_ids[:n] = saved.tokens
        self._llm.n_tokens = n
        return self.counters.reusable(saved.tokens, self._tokens)

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
        self._fit(len(self._tokens))
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
