"""Export a Llama-family checkpoint to an ONNX decoder with an explicit KV cache, for onnxruntime drafters.

The graph is written node by node with ``onnx.helper`` from the weights of the compact torch model
(``load_model``), not traced: tracing exporters change between torch releases and need extra
packages, while a hand-built graph of ~25 plain opset-17 ops per layer is small, loads in every
onnxruntime (mobile builds included), and keeps the cache interface exactly as the edge needs it:

    inputs   input_ids     int64   [1, n]                                     new tokens only
             past_keys     float32 [n_layers, n_kv_heads, past_len, head_dim]  (past_len may be 0)
             past_values   float32 [n_layers, n_kv_heads, past_len, head_dim]
    outputs  logits        float32 [1, n, vocab]   ([1, 1, vocab]: last position, the default)
             present_keys  float32 [n_layers, n_kv_heads, past_len + n, head_dim]
             present_values

Positions are past_len .. past_len + n - 1, so rollback is slicing the cache on axis 2. Weights are
used as stored ([out, in], Gemm transB=1), so a tied embedding is one initializer, not two.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from wisp_edge.drafters.onnx import ONNX_FORMAT as FORMAT  # metadata_props["wisp.format"]; the drafter checks it

OPSET = 17
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GiB: larger weights go to a side file


class _Graph:
    """A tiny node/initializer accumulator with unique names."""

    def __init__(self) -> None:
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        from onnx import helper

        self._n += 1
        names = [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _weights(model) -> dict[str, np.ndarray]:
    """The compact model's parameters as float32 numpy arrays (HF names without "model.")."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _rms_norm(g: _Graph, x: str, weight: str, eps: str) -> str:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis, as in the torch model."""
    ms = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    return g.op("Mul", g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, eps)))), weight)


def _linear(g: _Graph, x: str, w: str, b: str | None = None) -> str:
    """x [rows, in] @ w[out, in]^T (+ b) -> [rows, out]"""
    return g.op("Gemm", x, w, *([b] if b else []), transB=1)


def _rope(g: _Graph, x: str, cos: str, sin: str) -> str:
    """Rotate-half RoPE.  x: [heads, n, head_dim], cos/sin: [1, n, head_dim]"""
    first, second = g.op("Split", x, axis=2, outputs=2)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=2)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def build_onnx_model(model, *, all_logits: bool = False, source: str = ""):
    """An ``onnx.ModelProto`` computing ``model`` (a wisp_cloud Transformer) with an explicit cache."""
    import onnx
    from onnx import TensorProto, helper

    a = model.args
    L, H, KV, HD = a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim
    G = H // KV  # query heads per kv head
    w = _weights(model)
    g = _Graph()
    i64 = lambda name, *vals: g.const(name, np.array(vals, dtype=np.int64))  # noqa: E731
    eps = g.const("norm_eps", np.array(a.norm_eps, dtype=np.float32))
    embed = g.const("embed_tokens.weight", w["embed_tokens.weight"])  # [vocab, dim]
    inv_freq = g.const("inv_freq", model.inv_freq.detach().float().cpu().numpy()[None, :])  # [1, head_dim/2]

    ids = g.op("Reshape", "input_ids", i64("flat", -1))  # [n]
    x = g.op("Gather", embed, ids, axis=0)  # [n, dim]
    past_len = g.op("Squeeze", g.op("Shape", "past_keys", start=2, end=3), i64("axis0", 0))  # scalar
    n = g.op("Squeeze", g.op("Shape", ids), "axis0")  # scalar
    total = g.op("Add", past_len, n)
    one = i64("one", 1)
    one_scalar = g.const("one_scalar", np.array(1, dtype=np.int64))
    pos = g.op("Range", past_len, total, one_scalar)  # [n] int64
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=TensorProto.FLOAT), one), inv_freq)  # [n, hd/2]
    emb = g.op("Concat", freqs, freqs, axis=-1)  # [n, head_dim]
    cos = g.op("Unsqueeze", g.op("Cos", emb), "axis0")  # [1, n, head_dim]
    sin = g.op("Unsqueeze", g.op("Sin", emb), "axis0")
    # Causal mask as an additive bias: query at position p sees keys 0..p.
    key_pos = g.op("Range", g.const("zero_scalar", np.array(0, dtype=np.int64)), total, one_scalar)  # [T]
    allowed = g.op("LessOrEqual", g.op("Unsqueeze", key_pos, "axis0"), g.op("Unsqueeze", pos, one))  # [n, T]
    bias = g.op("Where", allowed, g.const("zero_f", np.array(0.0, dtype=np.float32)),
                g.const("neg_inf", np.array(-np.inf, dtype=np.float32)))  # [n, T]
    scale = g.const("attn_scale", np.array(1.0 / math.sqrt(HD), dtype=np.float32))
    heads_shape = {h: i64(f"shape_{h}_heads", 0, h, HD) for h in {H, KV}}  # [n, h*hd] -> [n, h, hd]
    group_shape = i64("shape_groups", KV, G, -1, HD)
    merge_shape = i64("shape_merge", H, -1, HD)
    flat_shape = i64("shape_flat", 0, -1)

    presents_k, presents_v = [], []
    for i in range(L):
        p = f"layers.{i}."
        c = lambda name: g.const(p + name, w[p + name])  # noqa: E731
        bias_of = lambda proj: c(f"self_attn.{proj}.bias") if a.attention_bias else None  # noqa: E731
        h = _rms_norm(g, x, c("input_layernorm.weight"), eps)
        q = g.op("Reshape", _linear(g, h, c("self_attn.q_proj.weight"), bias_of("q_proj")), heads_shape[H])
        k = g.op("Reshape", _linear(g, h, c("self_attn.k_proj.weight"), bias_of("k_proj")), heads_shape[KV])
        v = g.op("Reshape", _linear(g, h, c("self_attn.v_proj.weight"), bias_of("v_proj")), heads_shape[KV])
        if a.qk_norm:  # Qwen3: RMSNorm over each head's vector
            q = _rms_norm(g, q, c("self_attn.q_norm.weight"), eps)
            k = _rms_norm(g, k, c("self_attn.k_norm.weight"), eps)
        q = _rope(g, g.op("Transpose", q, perm=[1, 0, 2]), cos, sin)  # [H, n, hd]
        k = _rope(g, g.op("Transpose", k, perm=[1, 0, 2]), cos, sin)  # [KV, n, hd]
        v = g.op("Transpose", v, perm=[1, 0, 2])  # [KV, n, hd]
        layer = g.const(f"layer_{i}", np.array(i, dtype=np.int64))
        keys = g.op("Concat", g.op("Gather", "past_keys", layer, axis=0), k, axis=1)  # [KV, T, hd]
        values = g.op("Concat", g.op("Gather", "past_values", layer, axis=0), v, axis=1)
        presents_k.append(g.op("Unsqueeze", keys, "axis0"))
        presents_v.append(g.op("Unsqueeze", values, "axis0"))
        qg = g.op("Reshape", g.op("Mul", q, scale), group_shape)  # [KV, G, n, hd]
        kt = g.op("Unsqueeze", g.op("Transpose", keys, perm=[0, 2, 1]), one)  # [KV, 1, hd, T]
        probs = g.op("Softmax", g.op("Add", g.op("MatMul", qg, kt), bias), axis=-1)  # [KV, G, n, T]
        attn = g.op("MatMul", probs, g.op("Unsqueeze", values, one))  # [KV, G, n, hd]
        attn = g.op("Reshape", g.op("Transpose", g.op("Reshape", attn, merge_shape), perm=[1, 0, 2]),
                    flat_shape)  # [n, H*hd]
        x = g.op("Add", x, _linear(g, attn, c("self_attn.o_proj.weight")))
        h = _rms_norm(g, x, c("post_attention_layernorm.weight"), eps)
        gate = _linear(g, h, c("mlp.gate_proj.weight"))
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), _linear(g, h, c("mlp.up_proj.weight")))
        x = g.op("Add", x, _linear(g, act, c("mlp.down_proj.weight")))  # [n, dim]

    if not all_logits:  # the drafter only ever needs the next-token distribution
        x = g.op("Slice", x, i64("last", -1), i64("end", np.iinfo(np.int64).max), i64("axes0", 0))  # [1, dim]
    head = embed if a.tie_embeddings else g.const("lm_head.weight", w["lm_head.weight"])
    logits = _linear(g, _rms_norm(g, x, g.const("norm.weight", w["norm.weight"]), eps), head)
    g.nodes.append(helper.make_node("Unsqueeze", [logits, "axis0"], ["logits"]))
    g.nodes.append(helper.make_node("Concat", presents_k, ["present_keys"], axis=0))
    g.nodes.append(helper.make_node("Concat", presents_v, ["present_values"], axis=0))

    f32, cache = TensorProto.FLOAT, [L, KV, "past_len", HD]
    graph = helper.make_graph(
        g.nodes, "wisp_llama_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"]),
         helper.make_tensor_value_info("past_keys", f32, cache),
         helper.make_tensor_value_info("past_values", f32, cache)],
        [helper.make_tensor_value_info("logits", f32, [1, "n" if all_logits else 1, a.vocab_size]),
         helper.make_tensor_value_info("present_keys", f32, [L, KV, "total_len", HD]),
         helper.make_tensor_value_info("present_values", f32, [L, KV, "total_len", HD])],
        initializer=g.inits)
    # The producer keeps this module's former name: rebuilt files then match models/manifest.json's checksums.
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="wisp_cloud.convert.hf_to_onnx")
    proto.ir_version = 8  # readable by onnxruntime >= 1.10
    meta = {"wisp.format": FORMAT, "wisp.model_type": a.model_type, "wisp.max_seq_len": str(a.max_seq_len),
            "wisp.all_logits": str(int(all_logits)), "wisp.source": source}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    if _initializer_bytes(proto) < _EXTERNAL_DATA_BYTES:  # the checker cannot take a proto past 2 GiB
        onnx.checker.check_model(proto)
    return proto


def export_onnx(model_dir: str | Path, out_path: str | Path, *, all_logits: bool = False,
                copy_tokenizer: bool = True) -> Path:
    """Write the ONNX decoder for the checkpoint in ``model_dir`` (and its tokenizer.json beside it).

    The drafter looks for ``tokenizer.json`` next to the .onnx file, so one model per directory.
    """
    import shutil

    import onnx

    from wisp_cloud.model.loader import load_model

    model_dir, out_path = Path(model_dir), Path(out_path)
    proto = build_onnx_model(load_model(model_dir), all_logits=all_logits, source=model_dir.name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    large = _initializer_bytes(proto) > _EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(out_path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=out_path.name + ".data" if large else None)
    tokenizer = model_dir / "tokenizer.json"
    target = out_path.parent / "tokenizer.json"
    if copy_tokenizer and tokenizer.exists() and tokenizer.resolve() != target.resolve():
        shutil.copyfile(tokenizer, target)
    return out_path


def verify_onnx(model_dir: str | Path, onnx_path: str | Path, tokens: list[int], *, chunks: tuple[int, ...] = (),
                n_threads: int = 1) -> float:
    """Max |onnxruntime - torch| over the logits of ``tokens`` fed in ``chunks`` (rest one by one).

    Feeding a prefix, then chunks, then single tokens exercises past_len 0, n > 1 with a cache,
    and the n = 1 decode step: every shape the drafter uses.
    """
    import onnxruntime as ort

    from wisp_cloud.model.loader import load_model
    from wisp_cloud.model.transformer import RaggedBatch

    model = load_model(model_dir)
    want = model(RaggedBatch.single(list(tokens), model.new_cache())).numpy()  # [len, vocab]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    a = model.args
    keys = values = np.zeros((a.n_layers, a.n_kv_heads, 0, a.head_dim), dtype=np.float32)
    sizes = list(chunks) + [1] * (len(tokens) - sum(chunks))
    done, worst = 0, 0.0
    for size in sizes:
        ids = np.array([tokens[done:done + size]], dtype=np.int64)  # [1, size]
        logits, keys, values = session.run(None, {"input_ids": ids, "past_keys": keys, "past_values": values})
        done += size
        worst = max(worst, float(np.abs(logits[0, -1] - want[done - 1]).max()))
    return worst
