"""The onnxruntime drafter: an ONNX decoder with an explicit KV cache (``tools/export_onnx.py``).

For devices where llama.cpp is not an option. Edge-only dependencies: onnxruntime, tokenizers and
numpy, never torch. The drafter keeps the cache itself as two numpy arrays and feeds only the
tokens appended since the last evaluation; rollback is a slice of the cache, so a rejected draft
costs nothing to undo, and a reset keeps the cache of the prefix it shares with what was evaluated.
Tokenization uses the target's own ``tokenizer.json`` through the ``tokenizers`` library, which is
by construction identical to the target's tokenization.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wisp_edge.drafters.base import PrefillCounters
from wisp_edge.drafters.llama_cpp import DRAFTER_BUILD_HINT

ONNX_FORMAT = "wisp-llama-kv-v1"  # written by tools/build/convert/hf_to_onnx.py


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}; build the shipped models with `{DRAFTER_BUILD_HINT}`")


class OnnxDrafter:
    def __init__(self, model_path: str | Path, *, tokenizer_path: str | Path | None = None,
                 n_threads: int | None = None, n_ctx: int | None = None, n_batch: int = 256,
                 name: str | None = None) -> None:
        """model_path: the .onnx file; tokenizer_path defaults to tokenizer.json beside it.

        n_threads sets onnxruntime's intra-op threads (default: up to 4 cores); n_ctx defaults to
        the model's max_seq_len; prompts longer than n_batch are evaluated in n_batch chunks to
        bound the attention scratch memory ([heads, n, past_len + n] floats per layer).
        """
        model_path = Path(model_path)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path else model_path.with_name("tokenizer.json")
        _require(model_path, "drafter model")
        _require(tokenizer_path, "drafter tokenizer")
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        self.n_threads = n_threads or max(1, min(4, os.cpu_count() or 1))
        options.intra_op_num_threads = self.n_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        meta = self._session.get_modelmeta().custom_metadata_map
        if meta.get("wisp.format") != ONNX_FORMAT:
            raise ValueError(f"{model_path} is not a WISP KV-cache decoder (wisp.format "
                             f"{meta.get('wisp.format')!r}, expected {ONNX_FORMAT!r}); re-export it with "
                             f"tools/export_onnx.py")
        inputs = {i.name: i for i in self._session.get_inputs()}
        n_layers, n_kv_heads, _, head_dim = inputs["past_keys"].shape  # [layers, kv_heads, past_len, head_dim]
        self._vocab_size = int(self._session.get_outputs()[0].shape[-1])
        self._n_ctx = int(n_ctx or meta.get("wisp.max_seq_len", 4096))
        self._n_batch = max(1, int(n_batch))
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._empty = np.zeros((n_layers, n_kv_heads, 0, head_dim), dtype=np.float32)
        self.name = name or model_path.stem
        self.model_path = model_path
        self._tokens: list[int] = []
        self._keys = self._values = self._empty  # [n_layers, n_kv_heads, evaluated, head_dim]
        self._last: np.ndarray | None = None  # [vocab] logits after all `evaluated` tokens
        self.counters = PrefillCounters()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def _evaluated(self) -> int:
        return self._keys.shape[2]

    def _cut_cache(self, length: int) -> None:
        if length < self._evaluated:
            # contiguous copies: onnxruntime wants dense inputs, and the old arrays can be freed
            self._keys = np.ascontiguousarray(self._keys[:, :, :length])
            self._values = np.ascontiguousarray(self._values[:, :, :length])
            self._last = None

    def reset(self, tokens: list[int]) -> None:
        tokens = [int(t) for t in tokens]
        keep = self.counters.reusable(self._tokens[:self._evaluated], tokens, logits_held=self._last is not None)
        self._tokens = tokens
        self._cut_cache(keep)
        self.counters.reset(keep)

    def append(self, token: int) -> None:
        self._tokens.append(int(token))

    def truncate(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot truncate a sequence of {len(self._tokens)} tokens to {length}")
        del self._tokens[length:]
        self._cut_cache(length)

    def logits(self) -> np.ndarray:
        if not self._tokens:
            raise ValueError("the drafter has no tokens: call reset() with a non-empty prompt first")
        if len(self._tokens) > self._n_ctx:
            raise ValueError(f"sequence of {len(self._tokens)} tokens exceeds the drafter's context {self._n_ctx}")
        if self._evaluated == len(self._tokens) and self._last is not None:
            self.counters.evaluated(0)
            return self._last.copy()
        if self._evaluated == len(self._tokens):  # rolled back onto a boundary: recompute the last token
            self._cut_cache(len(self._tokens) - 1)
        self.counters.evaluated(len(self._tokens) - self._evaluated)
        while self._evaluated < len(self._tokens):
            start = self._evaluated
            ids = np.array([self._tokens[start:start + self._n_batch]], dtype=np.int64)  # [1, n]
            logits, self._keys, self._values = self._session.run(
                None, {"input_ids": ids, "past_keys": self._keys, "past_values": self._values})
            self._last = np.array(logits[0, -1], dtype=np.float32)  # logits: [1, 1 or n, vocab]
        return self._last.copy()

    def token_pieces(self) -> list[bytes]:
        """Token strings as tokenizer.json stores them (byte-level, e.g. 'Ġthe'), like llama.cpp's table."""
        return [(self._tokenizer.id_to_token(i) or "").encode("utf-8") for i in range(self._vocab_size)]

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def close(self) -> None:
        self._session = None
