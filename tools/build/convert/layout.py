"""Tensor-name and Q/K-layout mapping between Hugging Face Llama checkpoints and GGUF.

llama.cpp stores the query/key projections with rotary pairs interleaved, while Hugging Face
uses the rotate-half layout; both converters (GGUF -> HF at set-up, HF -> GGUF for the student)
go through the two functions here so the permutation is written once.
"""

from __future__ import annotations

import re

import numpy as np

# GGUF name pattern -> Hugging Face name pattern; `{i}` is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def gguf_to_hf_name(name: str) -> str:
    """Map a GGUF tensor name to its Hugging Face Llama name (KeyError if unknown)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _GGUF_LAYER.match(name)
    if not match or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"unsupported GGUF tensor {name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def hf_to_gguf_name(name: str) -> str:
    """Map a Hugging Face Llama tensor name to its GGUF name (KeyError if unknown)."""
    for gguf_name, hf_name in _GLOBAL_NAMES.items():
        if name == hf_name:
            return gguf_name
    match = _HF_LAYER.match(name)
    inverse = {hf: gg for gg, hf in _LAYER_NAMES.items()}
    if not match or match.group(2) not in inverse:
        raise KeyError(f"unsupported Hugging Face tensor {name!r}")
    return f"blk.{match.group(1)}.{inverse[match.group(2)]}.weight"


def permute_to_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half Q/K rows -> llama.cpp interleaved rows.  w: [rows, cols]"""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_to_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp interleaved Q/K rows -> HF rotate-half rows (inverse of the above).  w: [rows, cols]"""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
