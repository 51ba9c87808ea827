"""Turn a Llama-family Hugging Face checkpoint (e.g. the distilled student) into a GGUF for llama.cpp.

The edge runs drafters through llama.cpp, the cloud verifies with the HF weights; the two only
cooperate if the GGUF computes the same function *and* tokenizes exactly like the target. So:

* weights are written as f32, f16 or q8_0 (norms and other 1-D tensors always f32; only 2-D
  weights whose rows split into whole 32-value blocks are quantized, any other falls back to f16);
* Q/K rows go from HF's rotate-half layout to llama.cpp's interleaved one (``layout.py``);
* the tokenizer metadata is copied from a reference GGUF when its token table, merges *and*
  pre-tokenizer agree with the checkpoint's ``tokenizer.json``, and is built from tokenizer.json
  otherwise (byte-level BPE only). The pre-tokenizer is the trap: the target's tokenizer.json has
  no Digits step, i.e. llama.cpp's "gpt-2", while the shipped SmolLM2 GGUF says "smollm" (digits
  split off first), and the two tokenize e.g. "  5" or "\n\n7" differently. The tests check that
  llama.cpp tokenizes the converted file exactly like the target's tokenizer.json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from wisp_edge.wire.paths import SHIPPED_DRAFTERS, models_dir

DEFAULT_VOCAB_GGUF = models_dir() / SHIPPED_DRAFTERS["q4"]
OUT_TYPES = ("f32", "f16", "q8_0")
_SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # both are general.architecture "llama" in llama.cpp


def _gguf():
    import gguf

    return gguf


# --------------------------------------------------------------------------- weights


def _iter_hf_tensors(model_dir: Path):
    """(name, float32 array) for every stored tensor; via torch so bf16 checkpoints load too."""
    import torch
    from safetensors import safe_open

    from wisp_cloud.model.loader import _checkpoint_files

    for path in _checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(torch.float32).numpy()


def _encode_tensor(w: np.ndarray, out_type: str):
    """-> (data, raw_dtype or None). w: float32 [rows, cols] or [n]"""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType
    if w.ndim != 2 or out_type == "f32":
        return np.ascontiguousarray(w, dtype=np.float32), None
    if out_type == "f16":
        return np.ascontiguousarray(w, dtype=np.float16), None
    block = gguf.GGML_QUANT_SIZES[qtype.Q8_0][0]
    if w.shape[-1] % block:  # a row that does not split into whole blocks stays f16
        return np.ascontiguousarray(w, dtype=np.float16), None
    return gguf.quants.quantize(np.ascontiguousarray(w), qtype.Q8_0), qtype.Q8_0  # uint8 [rows, bytes/row]


def _add_weights(writer, model_dir: Path, args, out_type: str) -> dict:
    """Add every tensor under its GGUF name; returns counts for the report."""
    from tools.build.convert.layout import hf_to_gguf_name, permute_to_interleaved

    counts = {"tensors": 0, "quantized": 0}
    seen = set()
    for name, w in _iter_hf_tensors(model_dir):
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and args.tie_embeddings:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        gguf_name = hf_to_gguf_name(name)  # KeyError names any tensor a llama GGUF cannot hold
        if name.endswith("self_attn.q_proj.weight"):
            w = permute_to_interleaved(w, args.n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = permute_to_interleaved(w, args.n_kv_heads)
        data, raw_dtype = _encode_tensor(w, out_type)
        if raw_dtype is None:
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
            counts["quantized"] += 1
        counts["tensors"] += 1
        seen.add(gguf_name)
    if "token_embd.weight" not in seen:
        raise ValueError(f"{model_dir} has no model.embed_tokens.weight")
    if not args.tie_embeddings and "output.weight" not in seen:
        raise ValueError(f"{model_dir}: tie_word_embeddings is false but lm_head.weight is missing")
    return counts


# --------------------------------------------------------------------------- hyper-parameters


def _check_supported(args, config: dict) -> None:
    if args.model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(f"only Llama-architecture checkpoints convert to GGUF here, got model_type "
                         f"{args.model_type!r} (supported: {', '.join(_SUPPORTED_MODEL_TYPES)})")
    if args.attention_bias or config.get("mlp_bias"):
        raise ValueError("attention/MLP biases are not part of the llama GGUF layout")
    if args.rope_scaling:
        raise NotImplementedError("rope scaling (llama3 rope_freqs) is not supported by this converter")
    if config.get("sliding_window"):
        raise ValueError("sliding-window attention is not expressible in a llama GGUF")


def _add_hparams(writer, args, name: str, out_type: str) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    writer.add_file_type(int(file_type))
    if out_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --------------------------------------------------------------------------- tokenizer


def _token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def hf_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings, llama.cpp token types and merges from tokenizer.json, in id order.

    Ids the tokenizer does not define (embedding rows padded past the vocabulary) become
    ``[PAD<id>]`` tokens of type UNUSED, since llama.cpp needs one token per embedding row.
    """
    gguf = _gguf()
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers can be built from tokenizer.json, got "
                         f"{model.get('type')!r}; pass --vocab-from a GGUF with the same vocabulary")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for text, idx in model["vocab"].items():
        if idx < vocab_size:
            tokens[idx] = text
    for added in data.get("added_tokens", []):
        idx = added["id"]
        if idx >= vocab_size:
            raise ValueError(f"added token {added['content']!r} has id {idx} >= vocab_size {vocab_size}")
        tokens[idx] = added["content"]
        types[idx] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    for idx, text in enumerate(tokens):
        if text is None:
            tokens[idx] = f"[PAD{idx}]"
            types[idx] = int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name for the pre-tokenizer tokenizer.json describes (the regex that splits words)."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    byte_level_regex = bool(parts) and parts[-1].get("type") == "ByteLevel" and parts[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_level_regex:
        return "gpt-2"  # tokenizers' ByteLevel regex is GPT-2's
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level_regex:
        return "smollm"  # single digits first, then GPT-2's regex
    raise ValueError(f"cannot map pre-tokenizer {kinds} to a llama.cpp pre-tokenizer; pass --pre NAME "
                     f"or --vocab-from a GGUF with the same vocabulary")


def _bos_added(data: dict, tok_config: dict) -> bool:
    if "add_bos_token" in tok_config:
        return bool(tok_config["add_bos_token"])
    post = data.get("post_processor") or {}
    single = post.get("single") or []
    return bool(single) and "SpecialToken" in single[0]


def _add_vocab_from_hf(writer, model_dir: Path, config: dict, vocab_size: int, pre: str | None) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.exists() else {}
    # llama.cpp's "gpt2" tokenizer is byte-level BPE with a regex split and no normalizer: refuse
    # anything else rather than write a GGUF that silently tokenizes differently from the target.
    if data["model"].get("byte_fallback") or data.get("normalizer") or "ByteLevel" not in json.dumps(
            data.get("pre_tokenizer")):
        raise ValueError(f"{model_dir / 'tokenizer.json'} is not a plain byte-level BPE tokenizer (normalizer, "
                         f"byte fallback or no ByteLevel pre-tokenizer); pass --vocab-from a matching GGUF")
    tokens, types, merges = hf_vocab(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {text: i for i, text in enumerate(tokens)}
    for key, config_key, add in (("bos_token", "bos_token_id", writer.add_bos_token_id),
                                 ("eos_token", "eos_token_id", writer.add_eos_token_id),
                                 ("unk_token", None, writer.add_unk_token_id),
                                 ("pad_token", "pad_token_id", writer.add_pad_token_id)):
        text = _token_content(tok_config.get(key))
        idx = ids.get(text) if text is not None else None
        if idx is None and config_key is not None:
            value = config.get(config_key)
            idx = value[0] if isinstance(value, list) and value else value
        if isinstance(idx, int):
            add(idx)
    writer.add_add_bos_token(_bos_added(data, tok_config))
    writer.add_add_space_prefix(bool((data.get("pre_tokenizer") or {}).get("add_prefix_space", False)))
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else tok_config.get("chat_template")
    if template:
        writer.add_chat_template(template)


def _field_value(field):
    """A GGUF metadata value, with string arrays kept as raw bytes so nothing is re-encoded."""
    gguf = _gguf()
    if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data]
    return field.contents()


def reference_tokenizer_fields(reference: Path) -> dict:
    """Every ``tokenizer.*`` key of a GGUF as key -> (value, value type, array item type).

    Parsing a GGUF's ~100k token/merge strings takes seconds, so the result is cached per file
    version and serves both the vocabulary comparison and the copy (treat it as read-only).
    """
    stat = Path(reference).stat()
    return _cached_tokenizer_fields(str(Path(reference).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer_fields(reference: str, mtime_ns: int, size: int) -> dict:
    reader = _gguf().GGUFReader(reference)
    return {key: (_field_value(field), field.types[0], field.types[1] if len(field.types) > 1 else None)
            for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def _same_vocab(fields: dict, model_dir: Path, vocab_size: int) -> bool:
    if "tokenizer.ggml.tokens" not in fields or fields.get("tokenizer.ggml.model", (None,))[0] != "gpt2":
        return False
    tokens, _, merges = hf_vocab(model_dir, vocab_size)
    ref_tokens = [t.decode("utf-8") for t in fields["tokenizer.ggml.tokens"][0]]
    ref_merges = [m.decode("utf-8") for m in fields.get("tokenizer.ggml.merges", ([],))[0]]
    return ref_tokens == tokens and ref_merges == merges


def reference_vocab_matches(reference: Path, model_dir: Path, vocab_size: int) -> bool:
    """True when the reference GGUF's token table and merges equal the checkpoint's tokenizer.json."""
    return _same_vocab(reference_tokenizer_fields(reference), Path(model_dir), vocab_size)


# --------------------------------------------------------------------------- entry point


def _hf_pre_name(model_dir: Path) -> str | None:
    """llama.cpp pre-tokenizer name for tokenizer.json, or None when it has no known equivalent."""
    try:
        return _pre_tokenizer_name(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")))
    except ValueError:
        return None


def _choose_vocab(model_dir: Path, vocab_size: int, vocab_from, pre: str | None):
    """-> (reference path or None, its tokenizer fields or None, warnings).

    The token table and merges must match for a reference to be usable at all; its pre-tokenizer
    must also be the one tokenizer.json describes, since a different word-splitting regex changes
    the ids llama.cpp produces (the shipped SmolLM2 GGUF says "smollm", i.e. digits split first,
    while a tokenizer.json without a Digits step is plain "gpt-2": they disagree on e.g. "  5").
    """
    hf_pre = pre or _hf_pre_name(model_dir)
    if vocab_from is None:
        return None, None, []
    explicit = vocab_from != "auto"
    reference = Path(vocab_from) if explicit else DEFAULT_VOCAB_GGUF
    if not reference.exists():
        if explicit:
            raise FileNotFoundError(f"vocabulary GGUF not found: {reference}")
        return None, None, []
    fields = reference_tokenizer_fields(reference)
    if not _same_vocab(fields, model_dir, vocab_size):
        if explicit:
            raise ValueError(f"the vocabulary of {reference} differs from {model_dir / 'tokenizer.json'}")
        return None, None, []
    ref_pre = fields.get("tokenizer.ggml.pre", (None,))[0]
    if hf_pre is None or ref_pre == hf_pre:
        return reference, fields, []
    if not explicit:
        return None, None, []
    return reference, fields, [f"{reference.name} uses pre-tokenizer {ref_pre!r} but {model_dir / 'tokenizer.json'} "
                               f"describes {hf_pre!r}: llama.cpp will split some texts differently from the target"]


def convert_hf_to_gguf(model_dir: str | Path, out_path: str | Path, *, out_type: str = "f16",
                       vocab_from: str | Path | None = "auto", pre: str | None = None,
                       name: str | None = None) -> dict:
    """Write ``out_path``; returns a small report (vocabulary source, warnings, tensor counts, size).

    vocab_from: "auto" copies the tokenizer metadata from the shipped SmolLM2 GGUF when its tokens,
    merges and pre-tokenizer match tokenizer.json, and builds it from tokenizer.json otherwise; an
    explicit path is copied if its tokens and merges match (ValueError if not; a differing
    pre-tokenizer only warns); None always builds from tokenizer.json. ``pre`` forces the llama.cpp
    pre-tokenizer name in every case.
    """
    from wisp_cloud.model.loader import load_args

    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {OUT_TYPES}, got {out_type!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    args = load_args(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    _check_supported(args, config)
    reference, fields, warnings = _choose_vocab(model_dir, args.vocab_size, vocab_from, pre)
    if reference is not None and pre is not None:
        fields = {**fields, "tokenizer.ggml.pre": (pre, _gguf().GGUFValueType.STRING, None)}

    gguf = _gguf()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")  # never leave a half-written model behind
    writer = gguf.GGUFWriter(str(tmp_path), "llama")
    try:
        _add_hparams(writer, args, name or model_dir.name, out_type)
        if reference is not None:
            for key, (value, vtype, sub_type) in fields.items():
                writer.add_key_value(key, value, vtype, sub_type)
        else:
            _add_vocab_from_hf(writer, model_dir, config, args.vocab_size, pre)
        counts = _add_weights(writer, model_dir, args, out_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    tmp_path.replace(out_path)
    return {"path": str(out_path), "out_type": out_type, "vocab_source": str(reference or "tokenizer.json"),
            "warnings": warnings,
            "bytes": out_path.stat().st_size, **counts}
