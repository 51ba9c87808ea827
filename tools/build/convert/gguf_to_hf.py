"""Turn a Llama-architecture GGUF (e.g. the shipped SmolLM2 Q4_1) into a float32 Hugging Face checkpoint.

The dequantization is our own (``gguf.quants.dequantize`` per tensor, then the Q/K layout undone),
because transformers refuses to ``save_pretrained`` a model it loaded from GGUF. The tokenizer is
converted by transformers' GGUF tokenizer support, which builds a fast ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config_from_gguf(reader) -> dict:
    """A Hugging Face LlamaConfig dict from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    n_vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    hidden = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(n_vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def dequantized_state_dict(reader, config: dict) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy arrays under Hugging Face names, Q/K back in rotate-half layout."""
    from gguf.quants import dequantize

    from tools.build.convert.layout import gguf_to_hf_name, permute_to_rotate_half

    state = {}
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        # GGUF shapes are reversed (ne0 first); dequantize returns numpy order [rows, cols].
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(tensor.shape)]) if w.ndim != len(tensor.shape) else w
        if name.endswith("q_proj.weight"):
            w = permute_to_rotate_half(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = permute_to_rotate_half(w, config["num_key_value_heads"])
        state[name] = np.ascontiguousarray(w)
    return state


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors (float32), tokenizer files and generation_config.json."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    config = llama_config_from_gguf(reader)
    state = dequantized_state_dict(reader, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _save_tokenizer(gguf_path, out_dir, _field(reader, "tokenizer.ggml.pre"))


# llama.cpp pre-tokenizer names whose regex splits every digit off before byte-level BPE.
_DIGIT_SPLITTING_PRE = {"smollm"}


def _save_tokenizer(gguf_path: Path, out_dir: Path, pre: str | None = None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    if pre in _DIGIT_SPLITTING_PRE:
        split_digits(out_dir / "tokenizer.json")


def split_digits(tokenizer_json: Path) -> None:
    """Put the individual-digit split in front of the byte-level pre-tokenizer.

    transformers' GGUF tokenizer conversion keeps only ByteLevel, but llama.cpp's "smollm"
    pre-tokenizer (like the original SmolLM2 tokenizer) first splits each digit off, so
    "  5" would be two tokens in one and three in the other. Idempotent.
    """
    data = json.loads(tokenizer_json.read_text())
    pre = data["pre_tokenizer"]
    if pre.get("type") == "Sequence" and any(p.get("type") == "Digits" for p in pre["pretokenizers"]):
        return
    data["pre_tokenizer"] = {"type": "Sequence",
                             "pretokenizers": [{"type": "Digits", "individual_digits": True}, pre]}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
