"""ONNX export with an explicit KV cache, and the onnxruntime drafter that runs it on the edge.

A tiny random Llama checkpoint (hidden 64, 2 layers, 4 heads / 2 KV heads) with the target's real
vocabulary and tokenizer.json is exported; checked:

* OnnxDrafter's next-token logits equal the compact torch model's (atol 1e-4; ~3e-7 measured)
  along a prompt, one-token drafts, rollbacks (incl. onto an evaluated boundary) and a new branch;
* the raw graph: dynamic n and past_len (empty cache, chunks, single steps), all-logits output,
  present = past + n; and other supported variants (untied MHA, Qwen2 biases, Qwen3 q/k norm with
  head_dim != hidden/heads, Llama 3 rope scaling) on a small vocabulary;
* tokenize/detokenize/token_pieces equal the target tokenizer's, and the vocabulary fingerprint
  equals the llama.cpp drafter's on the shipped GGUF;
* edge purity: importing and running wisp_edge.drafters.onnx never imports torch (subprocess);
* a missing model names the path and the build command; a foreign ONNX file is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tools.build.convert.hf_to_onnx import export_onnx, verify_onnx  # noqa: E402
from wisp_cloud.model.loader import load_model  # noqa: E402
from wisp_cloud.model.transformer import RaggedBatch  # noqa: E402
from wisp_edge.drafters.base import Drafter  # noqa: E402
from wisp_edge.drafters.onnx import OnnxDrafter  # noqa: E402
from wisp_edge.wire.vocab import fingerprint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_DIR = REPO / "models" / "target"
SHIPPED_GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
ATOL = 1e-4

if not (TARGET_DIR / "tokenizer.json").exists():
    pytest.skip(f"{TARGET_DIR / 'tokenizer.json'} missing; run `python tools/build_models.py`",
                allow_module_level=True)


def _save_tiny(out: Path, config_cls: str, model_cls: str, *, vocab: int, **kwargs) -> Path:
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **kwargs)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # larger than the default init, so attention and norms are far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def target_tokenizer():
    return tokenizers.Tokenizer.from_file(str(TARGET_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = _save_tiny(tmp_path_factory.mktemp("tiny"), "LlamaConfig", "LlamaForCausalLM", vocab=VOCAB,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    shutil.copyfile(TARGET_DIR / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def onnx_path(tiny_dir, tmp_path_factory):
    return export_onnx(tiny_dir, tmp_path_factory.mktemp("onnx") / "drafter.onnx")


@pytest.fixture(scope="module")
def drafter(onnx_path):
    return OnnxDrafter(onnx_path, n_threads=1, n_batch=8)


def test_drafter_logits_match_torch_stepwise(tiny_dir, drafter, target_tokenizer):
    assert isinstance(drafter, Drafter)
    assert drafter.vocab_size == VOCAB and drafter.n_threads == 1
    model = load_model(tiny_dir)
    prompt = target_tokenizer.encode("<|im_start|>user\nName 3 colours, briefly.<|im_end|>\n",
                                     add_special_tokens=False).ids
    assert len(prompt) > 8  # longer than n_batch: the prompt is evaluated in two chunks
    rng = np.random.default_rng(3)
    drafts, branch = rng.integers(0, VOCAB, 6).tolist(), rng.integers(0, VOCAB, 3).tolist()
    worst = 0.0

    def check():
        nonlocal worst
        want = model(RaggedBatch.single(drafter.tokens, model.new_cache()))[-1].numpy()
        got = drafter.logits()
        assert got.shape == (VOCAB,) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - want).max()))

    drafter.reset(prompt)
    check()
    check()  # nothing new: the cached logits are returned
    for token in drafts:
        drafter.append(token)
        check()
    drafter.truncate(len(prompt) + 2)  # rejection: back onto an evaluated position, no new token
    check()
    for token in branch:
        drafter.append(token)
        check()
    drafter.truncate(len(prompt) + 1)
    drafter.append(drafts[0])
    drafter.append(drafts[1])  # two tokens evaluated in one run on top of a sliced cache
    check()
    drafter.reset(prompt[:3])  # a new session drops the old cache
    check()
    print(f"\nOnnxDrafter vs torch: max |diff| = {worst:.3g}")
    assert worst < ATOL
    with pytest.raises(ValueError):
        drafter.truncate(99)


def test_graph_dynamic_shapes_and_all_logits(tiny_dir, tmp_path):
    path = export_onnx(tiny_dir, tmp_path / "all.onnx", all_logits=True, copy_tokenizer=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    empty = np.zeros((2, 2, 0, 16), dtype=np.float32)  # [layers, kv_heads, past_len, head_dim]
    logits, keys, values = session.run(None, {"input_ids": np.array([[5, 6, 7]], dtype=np.int64),
                                              "past_keys": empty, "past_values": empty})
    assert logits.shape == (1, 3, VOCAB) and keys.shape == values.shape == (2, 2, 3, 16)
    logits, keys, _ = session.run(None, {"input_ids": np.array([[8, 9]], dtype=np.int64),
                                         "past_keys": keys, "past_values": values})
    assert logits.shape == (1, 2, VOCAB) and keys.shape == (2, 2, 5, 16)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 20).tolist()
    diff = verify_onnx(tiny_dir, path, tokens, chunks=(6, 3))
    print(f"\nall-logits graph vs torch: max |diff| = {diff:.3g}")
    assert diff < ATOL


VARIANTS = {
    "llama_mha_untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qknorm_head_dim": ("Qwen3Config", "Qwen3ForCausalLM",
                              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   tie_word_embeddings=False)),
    "llama3_rope_scaling": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_attention_heads=4, num_key_value_heads=1,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_variants_match_torch(case, tmp_path):
    config_cls, model_cls, kwargs = VARIANTS[case]
    model_dir = _save_tiny(tmp_path / case, config_cls, model_cls, vocab=257, **kwargs)
    path = export_onnx(model_dir, tmp_path / "model.onnx", copy_tokenizer=False)
    tokens = np.random.default_rng(1).integers(0, 257, 40).tolist()  # positions past 32: scaled rope bands
    diff = verify_onnx(model_dir, path, tokens, chunks=(9, 4))
    assert diff < ATOL, f"{case}: {diff:.3g}"


def test_tokenizer_matches_target(drafter, target_tokenizer):
    for text in ["Hello, world! 12345  5\n\n7", "<|im_start|>user\nhi<|im_end|>\n", "日本語 🤖 naïve"]:
        want = target_tokenizer.encode(text, add_special_tokens=False).ids
        assert drafter.tokenize(text) == want
        assert drafter.detokenize(want) == text
    pieces = drafter.token_pieces()
    assert len(pieces) == VOCAB
    assert pieces[:3] == [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    assert all(pieces[i] == target_tokenizer.id_to_token(i).encode() for i in range(0, VOCAB, 97))


def test_fingerprint_equals_llama_cpp_drafter(drafter):
    llama_cpp_mod = pytest.importorskip("wisp_edge.drafters.llama_cpp")
    pytest.importorskip("llama_cpp")
    if not SHIPPED_GGUF.exists():
        pytest.skip(f"{SHIPPED_GGUF} not built")
    other = llama_cpp_mod.LlamaCppDrafter(SHIPPED_GGUF, n_ctx=64, n_threads=1)
    try:
        assert fingerprint(drafter.token_pieces()) == fingerprint(other.token_pieces())
    finally:
        other.close()


def test_edge_import_does_not_load_torch(onnx_path):
    script = (
        "import sys\n"
        "from wisp_edge.drafters.onnx import OnnxDrafter\n"
        f"d = OnnxDrafter({str(onnx_path)!r}, n_threads=1)\n"
        "d.reset(d.tokenize('Hello there')); d.append(5); assert d.logits().shape == (d.vocab_size,)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_files_name_path_and_build_command(tmp_path, onnx_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError) as info:
        OnnxDrafter(missing)
    assert str(missing) in str(info.value) and "python tools/build_models.py" in str(info.value)
    lonely = tmp_path / "lonely.onnx"
    shutil.copyfile(onnx_path, lonely)  # no tokenizer.json beside it
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        OnnxDrafter(lonely)


def test_foreign_onnx_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    shutil.copyfile(TARGET_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="export_onnx"):
        OnnxDrafter(tmp_path / "m.onnx")
