"""HF -> GGUF conversion: llama.cpp runs the converted file like the torch model and tokenizes like the target.

Tiny *random* Llama checkpoints (hidden 64, 2 layers, 4 heads / 2 KV heads, FFN 128) are built with
transformers in a temporary directory, with the target's real 49,152-token vocabulary and its
tokenizer.json, so the tokenizer metadata path is the real one. Checked:

* f32 GGUF + float32 KV cache: llama.cpp's next-token logits equal the compact torch model's
  (max |diff| < 1e-3; about 5e-7 measured) along a prompt, one-token drafts, a rollback and a
  new branch; tied and untied embeddings;
* f16 and q8_0 files load, keep 1-D tensors f32, and agree with torch on the argmax;
* hyper-parameters and tokenizer metadata; llama.cpp's tokenization of the converted file equals
  models/target/tokenizer.json's on varied texts (digits after spaces included, where the shipped
  GGUF's "smollm" pre-tokenizer would differ);
* refusals: a reference GGUF with another vocabulary, a non-Llama architecture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from tools.build.convert.hf_to_gguf import (DEFAULT_VOCAB_GGUF, _pre_tokenizer_name,  # noqa: E402
                                           convert_hf_to_gguf, hf_vocab, reference_tokenizer_fields)
from wisp_cloud.model.loader import load_model  # noqa: E402
from wisp_cloud.model.transformer import RaggedBatch  # noqa: E402
from wisp_edge.drafters.llama_cpp import LlamaCppDrafter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_DIR = REPO / "models" / "target"
VOCAB = 49152
TEXTS = [
    "Hello world, I'm here. You'LL see.",
    "x = 12345 + 678;  5 apples\n\n7 pears\t 9",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "def f(a, b):\n    return a ** 2 - b  # comment\n",
    "naïve café — 日本語 テキスト 🤖🚀 Ünïcödé",
    "   leading spaces, trailing   \n\n\n",
]

if not (TARGET_DIR / "tokenizer.json").exists():
    pytest.skip(f"{TARGET_DIR / 'tokenizer.json'} missing; run `python tools/build_models.py`",
                allow_module_level=True)


def _tiny_checkpoint(out: Path, *, tied: bool, seed: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TARGET_DIR / name).exists():
            shutil.copyfile(TARGET_DIR / name, out / name)
    return out


@pytest.fixture(scope="module")
def target_tokenizer():
    return tokenizers.Tokenizer.from_file(str(TARGET_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("tied"), tied=True, seed=0)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("untied"), tied=False, seed=1)


@pytest.fixture(scope="module")
def tied_f32(tied_dir, tmp_path_factory):
    """The default conversion path (vocab_from="auto")."""
    out = tmp_path_factory.mktemp("gguf") / "tied.f32.gguf"
    return convert_hf_to_gguf(tied_dir, out, out_type="f32")


def _drafter(path) -> LlamaCppDrafter:
    # one thread: on a busy 2-core machine llama.cpp's thread pool makes each tiny eval ~100x slower
    return LlamaCppDrafter(path, n_ctx=128, n_threads=1, f32_kv=str(path).endswith("f32.gguf"))


def _walk(drafter, prompt: list[int]) -> list[tuple[list[int], np.ndarray]]:
    """Drive a drafter like a speculative round: prompt, drafts, rejection, new branch, re-read."""
    rng = np.random.default_rng(7)
    drafts, branch = rng.integers(3, VOCAB, 5).tolist(), rng.integers(3, VOCAB, 3).tolist()
    seen = []
    drafter.reset(prompt)
    seen.append((drafter.tokens, drafter.logits()))
    for token in drafts:
        drafter.append(token)
        seen.append((drafter.tokens, drafter.logits()))
    drafter.truncate(len(prompt) + 2)  # two drafts accepted, the rest rejected
    seen.append((drafter.tokens, drafter.logits()))  # rolled back onto a boundary: no new token
    for token in branch:
        drafter.append(token)
        seen.append((drafter.tokens, drafter.logits()))
    drafter.truncate(len(prompt))
    drafter.append(branch[0])
    seen.append((drafter.tokens, drafter.logits()))
    return seen


def _torch_next_logits(model, tokens: list[int]) -> np.ndarray:
    return model(RaggedBatch.single(tokens, model.new_cache()))[-1].numpy()


def _compare(model_dir: Path, gguf_path, prompt: list[int]) -> tuple[float, float]:
    """-> (max |llama.cpp - torch| over the walk, fraction of positions with the same argmax)"""
    model = load_model(model_dir)
    drafter = _drafter(gguf_path)
    try:
        seen = _walk(drafter, prompt)
    finally:
        drafter.close()
    diffs, agree = [], []
    for tokens, got in seen:
        want = _torch_next_logits(model, tokens)
        diffs.append(float(np.abs(got - want).max()))
        agree.append(int(got.argmax()) == int(want.argmax()))
    return max(diffs), float(np.mean(agree))


def test_f32_tied_matches_torch(tied_dir, tied_f32, target_tokenizer):
    prompt = target_tokenizer.encode(TEXTS[2], add_special_tokens=False).ids
    diff, agree = _compare(tied_dir, tied_f32["path"], prompt)
    print(f"\nf32 tied: max |llama.cpp - torch| = {diff:.3g}, argmax agreement {agree:.0%}")
    assert diff < 1e-3
    assert agree == 1.0


def test_f32_untied_matches_torch(untied_dir, tmp_path, target_tokenizer):
    # output.weight must be written and used: with token_embd as the head the logits would differ
    report = convert_hf_to_gguf(untied_dir, tmp_path / "untied.f32.gguf", out_type="f32", vocab_from=None)
    assert report["tensors"] == 2 + 9 * 2 + 1  # embed, output, norm + 9 per layer
    prompt = target_tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    diff, agree = _compare(untied_dir, report["path"], prompt)
    print(f"\nf32 untied: max |llama.cpp - torch| = {diff:.3g}, argmax agreement {agree:.0%}")
    assert diff < 1e-3
    assert agree == 1.0


@pytest.mark.parametrize("out_type,max_diff", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_quantized_files_load_and_agree(tied_dir, tmp_path, target_tokenizer, out_type, max_diff):
    report = convert_hf_to_gguf(tied_dir, tmp_path / f"tied.{out_type}.gguf", out_type=out_type)
    assert report["tensors"] == 1 + 9 * 2 + 1  # tied: no output.weight, llama.cpp reuses token_embd
    if out_type == "q8_0":  # (GGUFReader parses all 100k vocabulary strings: seconds, so only once)
        for tensor in gguf.GGUFReader(report["path"]).tensors:
            expected = "F32" if len(tensor.shape) == 1 else "Q8_0"  # every row here is a multiple of 32
            assert tensor.tensor_type.name == expected, tensor.name
    prompt = target_tokenizer.encode(TEXTS[1], add_special_tokens=False).ids
    diff, agree = _compare(tied_dir, report["path"], prompt)
    print(f"\n{out_type}: max |llama.cpp - torch| = {diff:.3g}, argmax agreement {agree:.0%}")
    assert agree >= 0.8
    assert diff < max_diff


def _llama_cpp_metadata(path) -> dict[str, str]:
    """The scalar metadata as llama.cpp itself reads it (values are strings)."""
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def test_metadata(tied_dir, tied_f32):
    meta = _llama_cpp_metadata(tied_f32["path"])
    expected = {
        "general.architecture": "llama", "llama.context_length": "256", "llama.embedding_length": "64",
        "llama.feed_forward_length": "128", "llama.block_count": "2", "llama.attention.head_count": "4",
        "llama.attention.head_count_kv": "2", "llama.rope.dimension_count": "16", "llama.vocab_size": str(VOCAB),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": "1", "tokenizer.ggml.eos_token_id": "2",
        "tokenizer.ggml.unknown_token_id": "0", "tokenizer.ggml.padding_token_id": "2",
        "tokenizer.ggml.add_bos_token": "false", "general.file_type": "0",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert float(meta["llama.rope.freq_base"]) == pytest.approx(10000.0)
    assert float(meta["llama.attention.layer_norm_rms_epsilon"]) == pytest.approx(1e-5)
    assert meta["tokenizer.chat_template"] == (TARGET_DIR / "chat_template.jinja").read_text()
    tokens, types, merges = hf_vocab(tied_dir, VOCAB)
    drafter = _drafter(tied_f32["path"])
    try:
        assert drafter.token_pieces() == [t.encode() for t in tokens]
    finally:
        drafter.close()
    if DEFAULT_VOCAB_GGUF.exists():  # the table built from tokenizer.json equals the shipped GGUF's
        reference = reference_tokenizer_fields(DEFAULT_VOCAB_GGUF)  # cached by the "auto" conversion
        assert [t.decode() for t in reference["tokenizer.ggml.tokens"][0]] == tokens
        assert list(reference["tokenizer.ggml.token_type"][0]) == types
        assert [m.decode() for m in reference["tokenizer.ggml.merges"][0]] == merges


def test_tokenization_equals_target(tied_f32, target_tokenizer):
    drafter = _drafter(tied_f32["path"])
    try:
        for text in TEXTS:
            want = target_tokenizer.encode(text, add_special_tokens=False).ids
            assert drafter.tokenize(text) == want, text
            assert drafter.detokenize(want) == target_tokenizer.decode(want, skip_special_tokens=False)
        pieces = drafter.token_pieces()
        assert [pieces[i] for i in (0, 1, 2, 300)] == [
            target_tokenizer.id_to_token(i).encode() for i in (0, 1, 2, 300)]
    finally:
        drafter.close()


@pytest.mark.skipif(not DEFAULT_VOCAB_GGUF.exists(), reason="shipped GGUF not built")
def test_explicit_reference_vocab_is_copied_with_warning(tied_dir, tmp_path):
    report = convert_hf_to_gguf(tied_dir, tmp_path / "ref.f32.gguf", out_type="f32", vocab_from=DEFAULT_VOCAB_GGUF)
    assert report["vocab_source"] == str(DEFAULT_VOCAB_GGUF)
    pre = _llama_cpp_metadata(report["path"])["tokenizer.ggml.pre"]
    hf_pre = _pre_tokenizer_name(json.loads((tied_dir / "tokenizer.json").read_text()))
    # today's target tokenizer.json has no Digits step ("gpt-2") while the shipped GGUF says "smollm"
    assert bool(report["warnings"]) == (pre != hf_pre)


@pytest.mark.skipif(not DEFAULT_VOCAB_GGUF.exists(), reason="shipped GGUF not built")
def test_reference_with_other_vocab_is_refused(tied_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tied_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    token = next(t for t, i in vocab.items() if i == 1000)
    vocab["zzz_not_a_token"] = vocab.pop(token)
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vocabulary"):
        convert_hf_to_gguf(other, tmp_path / "x.gguf", out_type="f32", vocab_from=DEFAULT_VOCAB_GGUF)
    assert not (tmp_path / "x.gguf").exists()


def test_non_llama_architecture_is_refused(tmp_path):
    config = {"model_type": "qwen3", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Llama"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf")
